"""Checkpoints that a crash cannot spoil.

Trainer writes `checkpoint-STEP/` in place. We mark a checkpoint complete only after Trainer has finished writing it,
rotate old ones only after that mark exists, and resume only from marked checkpoints. A crash mid-write therefore
leaves an unmarked folder that resume skips, and the previous good checkpoint is still there.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from hf_sft.errors import UsageError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders under `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    if complete_only:
        found = [p for p in found if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))


def resolve_resume_path(resume: str | None, output_dir: str | Path) -> str | None:
    """`latest` -> newest complete checkpoint in `output_dir`; a path must be a complete checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        complete = list_checkpoints(output_dir)
        if not complete:
            raise UsageError(f"--resume_from_ckpt_path latest: no complete checkpoint in {output_dir}")
        incomplete = [p.name for p in list_checkpoints(output_dir, complete_only=False) if p not in complete]
        if incomplete:
            logger.warning("ignoring incomplete checkpoints: %s", ", ".join(incomplete))
        return str(complete[-1])
    path = Path(resume)
    if path.is_file():
        raise UsageError(_not_a_run_checkpoint(path))
    if not (path / "trainer_state.json").is_file():
        raise UsageError(f"--resume_from_ckpt_path {resume}: not a checkpoint folder (no trainer_state.json)")
    if not (path / COMPLETE_MARKER).is_file():
        raise UsageError(f"--resume_from_ckpt_path {resume}: this checkpoint was not completely written")
    return str(path)


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


class AtomicCheckpointCallback(TrainerCallback):
    """Marks each finished checkpoint complete, then keeps the newest `save_total_limit` complete ones.

    Give Trainer `save_total_limit=None`: its own rotation runs before our mark and could delete the last good one.
    """

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        current = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not current.is_dir():
            return
        (current / COMPLETE_MARKER).write_text(f"step {state.global_step}\n", encoding="utf-8")
        for folder in list_checkpoints(args.output_dir, complete_only=False):
            if folder != current and not (folder / COMPLETE_MARKER).is_file():
                logger.warning("removing incomplete checkpoint %s", folder)
                shutil.rmtree(folder, ignore_errors=True)
        if self.save_total_limit:
            for folder in list_checkpoints(args.output_dir)[: -self.save_total_limit]:
                shutil.rmtree(folder, ignore_errors=True)
