"""The lock a live run holds on its folder: `_run.lock` with pid and host, under an exclusive `flock`.

The kernel drops a `flock` when its process dies, however it dies (SIGKILL too), so a lock file whose `flock` can be
taken is stale and is taken over. A lock written on another host is never taken over: a `flock` need not cross a
network file system. Where the file system has no `flock` at all, the holder's pid decides.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from hf_sft.errors import UsageError

logger = logging.getLogger("hf_sft.train")

# Trainer's checkpoint pushes upload the output folder except `_*`: the lock stays off the Hub.
LOCK_FILE = "_run.lock"
_UNKNOWN = {"pid": "?", "host": "?"}  # a lock file being written this very moment


def in_use_message(out_dir: Path, holder: dict) -> str:
    """The refusal naming the holder of `out_dir`'s lock."""
    return (
        f"--out_dir {out_dir} is in use by another run: pid {holder.get('pid')} on host {holder.get('host')} "
        f"(lock file {out_dir / LOCK_FILE}); wait for it to finish or choose another --out_dir"
    )


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def live_holder(folder: Path) -> dict | None:
    """The holder of `folder`'s lock if a live process holds it; None for no lock or a stale one."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        taken = _try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)
    holder = _read_holder(path)
    if taken is False:
        return holder or _UNKNOWN
    return (
        holder if holder and (holder.get("host") != socket.gethostname() or taken is None and _alive(holder)) else None
    )


def _try_flock(fd: int, mode: int) -> bool | None:
    """True: taken; False: another process holds it; None: this file system does not support `flock`."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. Lustre mounted without flock
            return None
        raise
    return True


def _alive(holder: dict) -> bool:
    """Without `flock`, whether the holder's pid runs on this host (pid reuse aside)."""
    try:
        os.kill(int(holder.get("pid")), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    except (TypeError, ValueError):
        return False
    return holder.get("pid") != os.getpid()


class RunLock:
    """`_run.lock` in the run folder: pid and host, under an exclusive `flock` held while the run lives."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one (logged).

        Raises:
            UsageError: another live run holds it, naming its pid and host.
        """
        attempts = 0
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            taken = _try_flock(fd, fcntl.LOCK_EX)
            if taken is False:
                os.close(fd)
                attempts += 1
                if attempts < 5:  # a concurrent `check_run_folder` holds a shared lock for a moment
                    time.sleep(0.1)
                    continue
                raise UsageError(in_use_message(self.path.parent, _read_holder(self.path) or _UNKNOWN)) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # else its holder removed it between our open and our flock: try again
                break
            os.close(fd)
        stale = _read_holder(self.path)
        if stale and stale.get("host") != socket.gethostname():
            os.close(fd)  # a lock of another machine: its flock may not reach us through a network file system
            raise UsageError(
                f"{in_use_message(self.path.parent, stale)}; if that run is no longer alive, delete {self.path}"
            )
        if stale and taken is None and _alive(stale):
            os.close(fd)
            raise UsageError(in_use_message(self.path.parent, stale))
        if stale:
            logger.warning(
                "taking over the stale lock of pid %s on host %s: that run is no longer alive",
                stale.get("pid"),
                stale.get("host"),
            )
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder + b"\n", 0)
        self._fd = fd
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the lock file and drop the lock; safe to call twice."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
