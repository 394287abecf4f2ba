"""SIGINT / SIGHUP while training, as ``caffe train`` handles them.

Caffe's defaults (``-sigint_effect stop -sighup_effect snapshot``): Ctrl-C asks the solver
to stop after the current iteration (``Solve`` then writes the final snapshot because of
``snapshot_after_train``); SIGHUP (the terminal went away) writes a snapshot and keeps
training.  Each effect is one of "stop", "snapshot" or "none".  The handlers only set a
flag; the solver polls it between iterations (and between test batches).  A second
Ctrl-C while a stop is pending raises KeyboardInterrupt (quit now; snapshots are written
atomically, so nothing half-written is left behind).
"""
from __future__ import annotations

import signal

NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"
EFFECTS = (STOP, SNAPSHOT, NONE)


class SignalHandler:
    def __init__(self, sigint_effect: str = STOP, sighup_effect: str = SNAPSHOT):
        self.sigint_effect = sigint_effect
        self.sighup_effect = sighup_effect
        self._got_sigint = False
        self._got_sighup = False
        self._stop_pending = False
        self._old = {}

    def __enter__(self) -> "SignalHandler":
        self._install(signal.SIGINT, self._on_sigint)
        if hasattr(signal, "SIGHUP"):
            self._install(signal.SIGHUP, self._on_sighup)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _install(self, sig, handler) -> None:
        try:
            self._old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def _on_sigint(self, signum, frame) -> None:
        if self._stop_pending and self.sigint_effect == STOP:
            raise KeyboardInterrupt
        self._got_sigint = True
        if self.sigint_effect == STOP:
            self._stop_pending = True

    def _on_sighup(self, signum, frame) -> None:
        self._got_sighup = True

    def action(self) -> str:
        """The requested action (clearing the request): SIGHUP's effect first, as Caffe's
        SignalHandler::CheckForSignals does, then SIGINT's; "none" without a signal."""
        if self._got_sighup:
            self._got_sighup = False
            return self.sighup_effect
        if self._got_sigint:
            self._got_sigint = False
            return self.sigint_effect
        return NONE
