"""The training log: Caffe's glog lines, and a progress bar on a terminal.

Lines look like Caffe's (``I1122 03:09:31.404217 10609 solver.cpp:239] Iteration 100
(...), loss = 0.0869``) so the log parsers people use with Caffe (tools/extra/parse_log.py
and friends, which read the month/day/time prefix and the text after ``] ``) keep working.
Numbers are printed as C++ streams print a float (6 significant digits, ``%g``).
Every message also goes to the ``graphc.train`` logging logger.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import sys
import time

_logger = logging.getLogger("graphc.train")


def g(x) -> str:
    """A number as ``std::ostream << float`` prints it (precision 6)."""
    return "%g" % float(x)


class TrainLog:
    """Writes glog-formatted lines to ``stream`` (None: only the logging logger) and, when
    ``progress`` is true and the stream is a terminal, keeps a progress bar on its last
    line."""

    def __init__(self, stream=None, progress: bool = False, also=None):
        self.stream = stream
        self.also = also              # a second stream (e.g. a log file), never a bar
        self.progress = bool(progress) and stream is not None and _isatty(stream)
        self._bar_shown = False
        self._bar_time = 0.0
        self._pid = os.getpid()

    def info(self, msg: str, where: str = "solver.cpp:0") -> None:
        _logger.info(msg)
        if self.stream is None and self.also is None:
            return
        now = datetime.datetime.now()
        prefix = f"I{now:%m%d %H:%M:%S}.{now.microsecond:06d} {self._pid} {where}] "
        text = "".join(prefix + line + "\n" for line in msg.split("\n"))
        if self.stream is not None:
            self._clear_bar()
            self.stream.write(text)
            self.stream.flush()
        if self.also is not None:
            self.also.write(text)
            self.also.flush()

    # ---- progress bar --------------------------------------------------------------
    def bar(self, it: int, start: int, stop: int, loss: float, rate: float,
            t0: float) -> None:
        """Draw ``[=====>    ] it/stop  loss  lr  it/s  ETA`` on the terminal's last line."""
        if not self.progress:
            return
        now = time.perf_counter()
        if now - self._bar_time < 0.1 and it < stop:     # at most ~10 redraws a second
            return
        self._bar_time = now
        done, total = it - start, max(stop - start, 1)
        elapsed = time.perf_counter() - t0
        speed = done / elapsed if elapsed > 0 else 0.0
        eta = (stop - it) / speed if speed > 0 else 0.0
        width = shutil.get_terminal_size((80, 24)).columns
        info = (f" {it}/{stop}  loss {g(loss)}  lr {g(rate)}  {speed:.1f} it/s  "
                f"ETA {datetime.timedelta(seconds=int(eta))}")
        cells = max(10, min(40, width - len(info) - 3))
        filled = int(cells * min(done / total, 1.0))
        bar = "[" + "=" * filled + (">" if filled < cells else "") + " " * max(cells - filled - 1, 0) + "]"
        self.stream.write("\r" + (bar + info)[:max(width - 1, 10)] + "\x1b[K")
        self.stream.flush()
        self._bar_shown = True

    def end_bar(self) -> None:
        self._clear_bar()

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[K")
            self._bar_shown = False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def stderr_log(progress: bool = True, also=None) -> TrainLog:
    return TrainLog(sys.stderr, progress=progress, also=also)
