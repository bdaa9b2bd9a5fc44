"""Which checkpoint a run resumes from.

Checkpoints are written whole (`hf_sft.training.staged_save`) and sealed with a manifest
(`hf_sft.training.checkpoint_check`). `--resume_from_ckpt_path latest` takes the newest checkpoint that verifies and
logs each newer one it skips and why; an explicit checkpoint that does not verify is refused naming the file. A
checkpoint is never modified in place: resuming from one while the run folder holds newer ones is refused, naming
them, unless `--discard_newer_checkpoints` says to delete them (and the final model, which belongs to them) first.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hf_sft.errors import UsageError
from hf_sft.training.checkpoint_check import MANIFEST, folder_step, problem

logger = logging.getLogger(__name__)

COMPLETE_MARKER = MANIFEST  # the manifest is the completion mark (older hf_sft wrote `step N` under this name)
DISCARD_FLAG = "--discard_newer_checkpoints"


def list_checkpoints(output_dir: str | Path, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders under `output_dir`, oldest step first (`complete_only`: those with a completion mark)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and folder_step(p) is not None]
    if complete_only:
        found = [p for p in found if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=folder_step)


def resolve_resume_path(
    resume: str | None, output_dir: str | Path, discard_newer: bool = False, warn: bool = True
) -> str | None:
    """`latest` -> the newest checkpoint in `output_dir` that verifies; a path must verify and be the newest.

    Args:
        resume: `--resume_from_ckpt_path` as given.
        output_dir: the run's `--out_dir`, where `latest` looks and where newer checkpoints would be replaced.
        discard_newer: `--discard_newer_checkpoints` (the newer ones are then removed by `discard_newer`).
        warn: log each checkpoint `latest` skips (once per run: the arguments are resolved twice).

    Raises:
        UsageError: no checkpoint verifies, the path does not verify (naming the file), or newer checkpoints exist
            and `discard_newer` is false (naming them).
    """
    if not resume:
        return None
    if resume == "latest":
        return str(_latest(Path(output_dir), warn))
    path = Path(resume)
    if path.is_file():
        raise UsageError(_not_a_run_checkpoint(path))
    if not (path / "trainer_state.json").is_file() and not (path / COMPLETE_MARKER).is_file():
        raise UsageError(f"--resume_from_ckpt_path {resume}: not a checkpoint folder (no trainer_state.json)")
    found = problem(path)
    if found:
        raise UsageError(
            f"--resume_from_ckpt_path {resume}: {found}; resume from another checkpoint "
            "(--resume_from_ckpt_path latest takes the newest one that verifies)"
        )
    newer = newer_checkpoints(path, output_dir)
    if newer and not discard_newer:
        names = ", ".join(p.name for p in newer)
        raise UsageError(
            f"--resume_from_ckpt_path {resume}: {output_dir} holds newer checkpoints ({names}) that this run would "
            f"replace: continue from the newest with --resume_from_ckpt_path latest, or delete them (and the final "
            f"model) and continue from {path.name} with {DISCARD_FLAG}"
        )
    return str(path)


def newer_checkpoints(checkpoint: str | Path, output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `output_dir` past `checkpoint`'s step (none if it lies in another folder)."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    step = folder_step(checkpoint)
    if step is None or not output_dir.is_dir() or checkpoint.resolve().parent != output_dir.resolve():
        return []
    return [p for p in list_checkpoints(output_dir) if folder_step(p) > step]


_WARNED: set[str] = set()


def _latest(output_dir: Path, warn: bool) -> Path:
    complete = list_checkpoints(output_dir)
    for folder in reversed(complete):
        found = problem(folder)
        if found is None:
            return folder
        if warn and str(folder) not in _WARNED:
            _WARNED.add(str(folder))
            logger.warning("--resume_from_ckpt_path latest: skipping %s: %s", folder.name, found)
    if complete:
        raise UsageError(
            f"--resume_from_ckpt_path latest: no checkpoint in {output_dir} verifies ({_skipped(complete)}); "
            f"start again with {_OVERWRITE_FLAG}"
        )
    raise UsageError(f"--resume_from_ckpt_path latest: no complete checkpoint in {output_dir}")


_OVERWRITE_FLAG = "--overwrite_output_dir"


def _skipped(folders: list[Path]) -> str:
    return "; ".join(f"{folder.name}: {problem(folder)}" for folder in folders)


def _not_a_run_checkpoint(path: Path) -> str:
    """What to do with a seed-format `.pt` given to `--resume_from_ckpt_path`."""
    from hf_sft.safe_pickle import load_checkpoint

    saved = load_checkpoint(path)
    keys = set(saved) if isinstance(saved, dict) else set()
    if "iter_num" in keys and keys & {"optimizer", "optimizer_state_dict"}:
        # finetune_gpt.py's optimizer state and data order belong to its own loop; Trainer cannot continue them.
        return (
            f"--resume_from_ckpt_path {path} is a finetune_gpt.py checkpoint (iteration {saved['iter_num']}): its "
            "optimizer state and data position cannot be continued by this trainer; fine-tune its weights further "
            f"with --pretrained_ckpt_path {path}"
        )
    return (
        f"--resume_from_ckpt_path {path} is a pretraining checkpoint, not a checkpoint folder of a fine-tuning run: "
        f"to fine-tune from it pass --pretrained_ckpt_path {path}"
    )
