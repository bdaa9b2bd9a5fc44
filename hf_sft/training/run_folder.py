"""A run owns its `--out_dir`: another run's work there is refused, and a live run holds a lock on the folder.

Two steps, so that a failed run leaves nothing behind: `check_run_folder` (read-only, before any work) refuses a
folder that is a file, is locked by a live run, or holds another run's checkpoints or final model; `claim_run_folder`
(once the inputs are validated) creates the folder, takes the lock, clears the old run's work if asked to, and
starts `train.log`. The lock is `_run.lock` holding pid and host under an exclusive `flock`: the kernel drops the
`flock` when its process dies, however it dies (SIGKILL too), so a lock file whose `flock` can be taken is stale.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from hf_sft.errors import UsageError
from hf_sft.training.checkpoints import list_checkpoints
from hf_sft.training.run_log import RUN_LOG

logger = logging.getLogger("hf_sft.train")

# Trainer's checkpoint pushes upload the output folder except `_*`: the lock stays off the Hub.
LOCK_FILE = "_run.lock"
# What a finished run leaves in its folder (hf_sft.training.output.save_final), besides checkpoints and the log.
FINAL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "configuration_hfsft_gpt.py",
    "modeling_hfsft_gpt.py",
    "README.md",
    "loss.png",
)
_FINAL_MODELS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
OVERWRITE_FLAG = "--overwrite_output_dir"
_HELD: list[RunLock] = []
_UNKNOWN = {"pid": "?", "host": "?"}  # a lock file being written this very moment


def check_run_folder(out_dir: str | Path, resume: str | None, overwrite: bool, main_process: bool = True) -> None:
    """Refuse, before any work, an out_dir this run may not use; reads only.

    Args:
        out_dir: the run's `--out_dir`.
        resume: `--resume_from_ckpt_path` as given (`latest`, a checkpoint folder, or None).
        overwrite: `--overwrite_output_dir`.
        main_process: False on the other ranks of a multi-process run: rank 0's own lock is no reason to stop.

    Raises:
        UsageError: the path is a file, a live run holds its lock, or it holds another run's work.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise UsageError(f"pass either --resume_from_ckpt_path or {OVERWRITE_FLAG}, not both")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UsageError(f"--out_dir {out_dir} exists and is not a folder")
    holder = _live_holder(out_dir / LOCK_FILE) if main_process else None
    if holder:
        raise UsageError(_in_use(out_dir, holder))
    _check_previous_work(out_dir, resume, overwrite)


def claim_run_folder(out_dir: str | Path, resume: str | None, overwrite: bool) -> RunLock:
    """Create the folder, lock it, clear the previous run's work if `overwrite`, and start `train.log` in it.

    Call on the main process only, once the inputs are validated. Returns the held lock; release it at the end.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir / LOCK_FILE)
    lock.acquire()
    try:
        _check_previous_work(out_dir, resume, overwrite)  # again, under the lock: a run may have finished meanwhile
        if overwrite:
            _clear_previous_work(out_dir)
    except BaseException:
        lock.release()
        raise
    _HELD.append(lock)
    return lock


def release_run_folders() -> None:
    """Release the locks this process holds (also done at exit, whatever ends the process short of SIGKILL)."""
    while _HELD:
        _HELD.pop().release()


def previous_work(out_dir: Path) -> list[str]:
    """What of another run lies in `out_dir`: its checkpoints and its final model, by name."""
    found = [p.name for p in list_checkpoints(out_dir, complete_only=False)]
    return found + [name for name in _FINAL_MODELS if (out_dir / name).is_file()]


def _check_previous_work(out_dir: Path, resume: str | None, overwrite: bool) -> None:
    if overwrite or (resume and (resume == "latest" or Path(resume).resolve().parent == out_dir.resolve())):
        return
    found = previous_work(out_dir)
    if found:
        what = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise UsageError(
            f"--out_dir {out_dir} already holds another run ({what}): continue it with --resume_from_ckpt_path "
            f"latest, or replace it with {OVERWRITE_FLAG} (or choose another --out_dir)"
        )


def _clear_previous_work(out_dir: Path) -> None:
    removed = [p.name for p in list_checkpoints(out_dir, complete_only=False)]
    for name in removed:
        shutil.rmtree(out_dir / name)
    for name in (*FINAL_FILES, RUN_LOG):
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            removed.append(name)
    if removed:
        logger.warning("%s: removed the previous run's %s", OVERWRITE_FLAG, ", ".join(removed))


def _in_use(out_dir: Path, holder: dict) -> str:
    return (
        f"--out_dir {out_dir} is in use by another run: pid {holder.get('pid')} on host {holder.get('host')} "
        f"(lock file {out_dir / LOCK_FILE}); wait for it to finish or choose another --out_dir"
    )


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _live_holder(path: Path) -> dict | None:
    """The lock's holder if a live process holds it; None for no lock or a stale one."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(path) or _UNKNOWN
    finally:
        os.close(fd)
    holder = _read_holder(path)
    return holder if holder and holder.get("host") != socket.gethostname() else None


class RunLock:
    """`_run.lock` in the run folder: pid and host, under an exclusive `flock` held while the run lives."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one (logged).

        Raises:
            UsageError: another live run holds it, naming its pid and host.
        """
        attempts = 0
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                attempts += 1
                if attempts < 5:  # a concurrent `check_run_folder` holds a shared lock for a moment
                    time.sleep(0.1)
                    continue
                raise UsageError(_in_use(self.path.parent, _read_holder(self.path) or _UNKNOWN)) from None
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
            raise UsageError(f"{_in_use(self.path.parent, stale)}; if that run is no longer alive, delete {self.path}")
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
