"""A run owns its `--out_dir`: another run's work there is refused, and a live run holds a lock on the folder.

Two steps, so that a failed run leaves nothing behind: `check_run_folder` (read-only, before any work) refuses a
folder that is a file, is locked by a live run (`hf_sft.training.run_lock`), or holds another run's checkpoints or
final model; `claim_run_folder` (once the inputs are validated) creates the folder, takes the lock, removes what a
killed run's writes left (staging folders), and clears the old run's work if asked to. `discard_newer` removes the
checkpoints past the one a run resumes from, with the final model they lead to, when the user asks for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hf_sft import MODEL_CODE_FILES
from hf_sft.errors import UsageError
from hf_sft.training.checkpoint_check import folder_step
from hf_sft.training.checkpoints import list_checkpoints
from hf_sft.training.run_lock import RunLock, in_use_message, live_holder
from hf_sft.training.run_log import RUN_LOG
from hf_sft.writer import PENDING_RECORD, incomplete, leftovers, remove, replace_files

logger = logging.getLogger("hf_sft.train")

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
    *MODEL_CODE_FILES,
    "README.md",
    "loss.png",
)
_FINAL_MODELS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
OVERWRITE_FLAG = "--overwrite_output_dir"
_HELD: list[RunLock] = []


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
