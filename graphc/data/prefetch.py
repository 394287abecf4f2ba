"""Prefetching: batches are read on a background thread into a bounded queue.

Like Caffe's BasePrefetchingDataLayer (``prefetch``, default 4 batches), one daemon thread
calls ``produce()`` ahead of the consumer, so the compute does not wait on the disk when
the reader keeps up.  A single producer keeps the order exactly that of calling
``produce()`` directly.  An exception in the reader is raised by the ``next()`` call that
would have returned that batch (and by every later call).  ``close()`` stops the thread;
it also runs when the Prefetcher is garbage collected (the thread holds no reference to
it).
"""
from __future__ import annotations

import queue
import threading
import weakref
from typing import Callable


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _work(produce: Callable, q: queue.Queue, stop: threading.Event, on_exit) -> None:
    try:
        while not stop.is_set():
            try:
                item = produce()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = _Failure(e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return
    finally:
        if on_exit is not None:
            on_exit()


def _shutdown(q: queue.Queue, stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
    if thread is not threading.current_thread():
        thread.join(timeout=5.0)


class Prefetcher:
    def __init__(self, produce: Callable[[], object], depth: int = 4,
                 on_exit: Callable[[], None] | None = None, name: str = "graphc-prefetch"):
        """``produce()`` makes one batch; ``on_exit`` runs on the thread when it ends
        (e.g. to close the reader's files)."""
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=_work, name=name, daemon=True,
                                        args=(produce, self._queue, self._stop, on_exit))
        self._thread.start()
        self._close = weakref.finalize(self, _shutdown, self._queue, self._stop, self._thread)

    def next(self):
        """The next batch, in order (blocks until the thread has it ready)."""
        if self._failed is not None:
            raise self._failed
        if not self._close.alive:
            raise RuntimeError("the prefetcher is closed")
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._failed = item.exc
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the thread (idempotent)."""
        self._close()

    @property
    def closed(self) -> bool:
        return not self._close.alive

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
