"""The run folder: a run owns its `--out_dir` (claim), holds a lock on it while it lives, and logs into it.

**Claim.** Two steps, so that a failed run leaves nothing behind: `check_run_folder` (read-only, before any work)
applies the writer's rule for every destination (`hf_sft.writer.check_destination`: not an input, not a saved
dataset, nothing a run did not write unless `--overwrite_output_dir`, a folder that can be written), then refuses a
folder locked by a live run or holding another run's checkpoints or final model; `claim_run_folder` (once the inputs
are validated) creates the folder, takes the lock, marks it as a run's (`hf_sft.writer.OUTPUT_RECORD`), removes what
a killed run's writes left (staging folders), and clears the old run's work if asked to. `discard_newer` removes the
checkpoints past the one a run resumes from, with the final model they lead to, when the user asks for it.

**Lock.** `_run.lock` with pid and host, under an exclusive `flock` (`RunLock`). The kernel drops a `flock` when its
process dies, however it dies (SIGKILL too), so a lock file whose `flock` can be taken is stale and is taken over. A
lock written on another host is never taken over: a `flock` need not cross a network file system. Where the file
system has no `flock` at all, the holder's pid decides.

**Log.** `train.log` holds the whole run from its first message, though the file is only opened once the folder is
claimed. Until then (inputs still being checked) records wait in memory (`hold_run_log`): a run refused at that
stage leaves no file behind.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable
from logging.handlers import MemoryHandler
from pathlib import Path

import transformers

from hf_sft import MODEL_CODE_FILES
from hf_sft.errors import UsageError
from hf_sft.evaluation import REPORT_FILE, RESULTS_FILE
from hf_sft.training.checkpoints import folder_step, list_checkpoints
from hf_sft.writer import (
    PENDING_RECORD,
    RUN_FOLDER,
    check_destination,
    incomplete,
    leftovers,
    record_output,
    remove,
    replace_files,
    written_by,
)

logger = logging.getLogger("hf_sft.train")

FORMATTER = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
RUN_LOG = "train.log"
_MARK = "hf_sft_run_log"


# Claim

# What a finished run leaves in its folder (hf_sft.training.final_folder.save_final), besides checkpoints and the log.
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
    *MODEL_CODE_FILES,
    "README.md",
    "loss.png",
    RESULTS_FILE,
    REPORT_FILE,
)
_FINAL_MODELS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
OVERWRITE_FLAG = "--overwrite_output_dir"
_HELD: list[RunLock] = []


def check_run_folder(
    out_dir: str | Path,
    resume: str | None,
    overwrite: bool,
    main_process: bool = True,
    sources: Iterable[str | Path] = (),
) -> None:
    """Refuse, before any work, an out_dir this run may not use; reads only.

    The writer's rule first (`hf_sft.writer.check_destination`, the same for every command): an out_dir that cannot
    be created, that is one of the run's inputs, lies inside one or holds one (whatever the flags), that is a saved
    dataset, or that holds anything a run did not write (unless `--overwrite_output_dir`). Then what only a run
    folder has: a live run's lock, and another run's checkpoints or final model.

    Args:
        out_dir: the run's `--out_dir`.
        resume: `--resume_from_ckpt_path` as given (`latest`, a checkpoint folder, or None).
        overwrite: `--overwrite_output_dir`.
        main_process: False on the other ranks of a multi-process run: rank 0's own lock is no reason to stop.
        sources: the files and folders the run reads (base model, tokenizer, data, template).

    Raises:
        UsageError: as above, naming the folder and the way out (never a flag that would destroy an input).
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise UsageError(f"pass either --resume_from_ckpt_path or {OVERWRITE_FLAG}, not both")
    check_destination(
        out_dir,
        kind="folder",
        command=RUN_FOLDER,
        sources=sources,
        overwrite=overwrite,
        flag="--out_dir",
        overwrite_flag=OVERWRITE_FLAG,
        keeps=(LOCK_FILE, RUN_LOG),
        continuing=bool(resume),
    )
    if not out_dir.exists():
        return
    holder = live_holder(out_dir) if main_process else None
    if holder:
        raise UsageError(in_use_message(out_dir, holder))
    _check_previous_work(out_dir, resume, overwrite)


def claim_run_folder(out_dir: str | Path, resume: str | None, overwrite: bool) -> RunLock:
    """Create the folder, lock it, clear the previous run's work if `overwrite`, and start `train.log` in it.

    Call on the main process only, once the inputs are validated. Returns the held lock; release it at the end.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir)
    lock.acquire()
    try:
        _check_previous_work(out_dir, resume, overwrite)  # again, under the lock: a run may have finished meanwhile
        stale = leftovers(out_dir)  # under the lock no writer is alive: these are a killed run's
        if stale:
            logger.warning("removing what an interrupted write left: %s", ", ".join(p.name for p in stale))
            for path in stale:
                remove(path)
        if overwrite:
            _clear_previous_work(out_dir)
        if written_by(out_dir) != RUN_FOLDER:  # the writer's mark: what makes the folder a run's, to every command
            record_output(out_dir, RUN_FOLDER)
    except BaseException:
        lock.release()
        raise
    _HELD.append(lock)
    return lock


def release_run_folders() -> None:
    """Release the locks this process holds (also done at exit, whatever ends the process short of SIGKILL)."""
    while _HELD:
        _HELD.pop().release()


def discard_newer(out_dir: str | Path, checkpoint: str | Path) -> None:
    """Remove the checkpoints in `out_dir` past `checkpoint`'s step, and the final model (it came after them).

    Call on the main process, under the lock, before training (`--discard_newer_checkpoints`).
    """
    out_dir, step = Path(out_dir), folder_step(checkpoint)
    if step is None or Path(checkpoint).resolve().parent != out_dir.resolve():
        return  # a checkpoint of another folder: nothing here is newer than it
    newer = [p for p in list_checkpoints(out_dir, complete_only=False) if folder_step(p) > step]
    final = final_files(out_dir) if newer else []
    if final:  # first, and as one change: never a final model without the checkpoints it came from
        note = f"--discard_newer_checkpoints was interrupted: resume from {Path(checkpoint)} with it again"
        with replace_files(out_dir, replaces=final, note=note):
            pass
    for path in newer:
        remove(path)
    if newer:
        what = ", ".join(p.name for p in newer) + (" and the final model" if final else "")
        logger.warning("--discard_newer_checkpoints: removed %s (resuming from %s)", what, Path(checkpoint).name)


def final_files(out_dir: Path) -> list[str]:
    """The names of the final model's files in `out_dir` (`FINAL_FILES`, shards, an unfinished swap's record)."""
    shards = sorted(p.name for p in out_dir.glob("model-*-of-*.safetensors"))  # a final model saved in shards
    return [name for name in (*FINAL_FILES, *shards, PENDING_RECORD) if (out_dir / name).is_file()]


def previous_work(out_dir: Path) -> list[str]:
    """What of another run lies in `out_dir`: its checkpoints and its final model, by name."""
    found = [p.name for p in list_checkpoints(out_dir, complete_only=False)]
    found += [name for name in _FINAL_MODELS if (out_dir / name).is_file()]
    return found + (["an unfinished final model"] if incomplete(out_dir) is not None else [])


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
    removed += final_files(out_dir) + ([RUN_LOG] if (out_dir / RUN_LOG).is_file() else [])
    for name in removed:
        remove(out_dir / name)
    if removed:
        logger.warning("%s: removed the previous run's %s", OVERWRITE_FLAG, ", ".join(removed))


# Lock

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


# Log


class ConsoleHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each message.

    A handler bound to the stream of the process's first run would write into a closed stream once a test harness
    (or an application running several trainings) has swapped `sys.stderr` in between.
    """

    def __init__(self):
        super().__init__()
        self.setFormatter(FORMATTER)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def start_logging(process_index: int) -> None:
    """hf_sft's messages on stderr and, on rank 0, held for `<output_dir>/train.log` until the folder is claimed."""
    hf_sft_logger = logging.getLogger("hf_sft")
    hf_sft_logger.setLevel(logging.INFO if process_index == 0 else logging.ERROR)
    if not any(isinstance(h, ConsoleHandler) for h in hf_sft_logger.handlers):
        hf_sft_logger.addHandler(ConsoleHandler())
    transformers.utils.logging.set_verbosity_warning()
    if process_index == 0:
        hold_run_log()


def hold_run_log() -> None:
    """Keep the run's log records (hf_sft's and transformers' warnings) in memory until `start_run_log`."""
    _install(MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1))  # flushes only when told


def start_run_log(output_dir: str | Path) -> None:
    """Open `<output_dir>/train.log` (appending), write the records held so far, and log there from now on."""
    handler = logging.FileHandler(Path(output_dir) / RUN_LOG, encoding="utf-8")
    handler.setFormatter(FORMATTER)
    for held in _marked():
        if isinstance(held, MemoryHandler):
            held.setTarget(handler)
            held.flush()
            break
    _install(handler)


def _owners() -> tuple[logging.Logger, logging.Logger]:
    return logging.getLogger("hf_sft"), transformers.utils.logging.get_logger()


def _marked() -> list[logging.Handler]:
    return [h for owner in _owners() for h in owner.handlers if getattr(h, _MARK, False)]


def _install(handler: logging.Handler) -> None:
    # A second run in the same process logs to its own file: drop the previous run's handlers first.
    for owner in _owners():
        for old in [h for h in owner.handlers if getattr(h, _MARK, False)]:
            owner.removeHandler(old)
            if old is not handler:
                old.close()
    setattr(handler, _MARK, True)
    for owner in _owners():
        owner.addHandler(handler)
