"""The prefetching thread: same order as reading directly, errors delivered in place,
bounded read-ahead, clean stop."""
import gc
import threading
import time

import h5py
import numpy as np
import pytest

from graphc.data.prefetch import Prefetcher
from graphc.data.sources import HDF5Source


def test_prefetched_order_equals_direct_order(tmp_path, rng):
    data = rng.standard_normal((9, 3)).astype(np.float32)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["data"] = data
    (tmp_path / "l.txt").write_text("d.h5\n")

    def source():
        return HDF5Source("l.txt", ["data"], 4, shuffle=True, rng=np.random.default_rng(3),
                          source_dir=str(tmp_path))
    direct = source()
    want = [direct.next_batch()[0] for _ in range(10)]
    with Prefetcher(source().next_batch, depth=2) as p:
        got = [p.next()[0] for _ in range(10)]
    assert all(np.array_equal(a, b) for a, b in zip(want, got))


def test_read_ahead_is_bounded_and_close_stops_thread():
    made = []

    def produce():
        made.append(len(made))
        return made[-1]
    p = Prefetcher(produce, depth=3)
    assert p.next() == 0
    time.sleep(0.2)
    assert len(made) <= 1 + 3 + 1          # the one consumed, a full queue, one waiting to go in
    p.close()
    p._thread.join(2)
    assert not p._thread.is_alive() and p.closed
    p.close()                              # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        p.next()


def test_error_is_raised_at_its_batch_and_after():
    def produce(state={"n": 0}):
        state["n"] += 1
        if state["n"] == 3:
            raise ValueError("disk on fire")
        return state["n"]
    p = Prefetcher(produce, depth=4)
    assert [p.next(), p.next()] == [1, 2]
    for _ in range(2):
        with pytest.raises(ValueError, match="disk on fire"):
            p.next()


def test_garbage_collected_prefetcher_stops_its_thread():
    exited = threading.Event()
    p = Prefetcher(lambda: np.zeros(3), depth=2, on_exit=exited.set)
    p.next()
    del p
    gc.collect()
    assert exited.wait(3)
