"""A run owns its `--out_dir`: another run's work there is refused, and a live run holds a lock on the folder.

Two steps, so that a failed run leaves nothing behind: `check_run_folder` (read-only, before any work) refuses a
folder that is a file, is locked by a live run (`hf_sft.training.run_lock`), or holds another run's checkpoints or
final model; `claim_run_folder` (once the inputs are validated) creates the folder, takes the lock, clears the old
run's work if asked to, and starts `train.log`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from hf_sft import MODEL_CODE_FILES
from hf_sft.errors import UsageError
from hf_sft.training.checkpoints import list_checkpoints
from hf_sft.training.run_lock import RunLock, in_use_message, live_holder
from hf_sft.training.run_log import RUN_LOG

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
    shards = sorted(p.name for p in out_dir.glob("model-*-of-*.safetensors"))  # a final model saved in shards
    for name in (*FINAL_FILES, *shards, RUN_LOG):
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            removed.append(name)
    if removed:
        logger.warning("%s: removed the previous run's %s", OVERWRITE_FLAG, ", ".join(removed))
