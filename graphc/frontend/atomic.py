"""Atomic file writes: readers never see a half-written file, even after a crash."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from graphc.errors import FileFormatError

# the process umask, read once (os.umask can only be read by setting it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same directory, which is flushed, fsynced and
    then renamed over ``path`` (os.replace is atomic on POSIX and Windows); the directory
    is fsynced too where the OS allows, so the rename itself survives a crash.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise FileFormatError(f"cannot write here: {e.strerror or e}", where=str(path),
                              hint="check that the directory exists and is writable") from None
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file private (0600); give it the mode open() would
            mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
