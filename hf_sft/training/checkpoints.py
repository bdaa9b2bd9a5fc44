"""Checkpoints that a crash cannot spoil, and a clean stop on SIGTERM/SIGINT.

Trainer writes `checkpoint-STEP/` in place. We mark a checkpoint complete only after Trainer has finished writing it,
rotate old ones only after that mark exists, and resume only from marked checkpoints. A crash mid-write therefore
leaves an unmarked folder that resume skips, and the previous good checkpoint is still there.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from hf_sft.errors import RunInterrupted, UsageError

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


class PreemptionCallback(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current optimizer step, save a checkpoint, stop training.

    Stopping only between optimizer steps keeps the checkpoint's data position exact. Under several processes the
    stop request is shared (an all-reduce per step), so every rank stops at the same step.
    """

    def __init__(self):
        self.requested: str | None = None
        self.signal = signal.SIGTERM  # what another rank's request counts as
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: the user means it
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)
        self.requested = self.signal.name
        logger.warning("%s received: saving a checkpoint after this step, then stopping", self.requested)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(stop)], device=args.device)
            dist.all_reduce(flag)
            stop = bool(flag.item())
        if stop:
            self.requested = self.requested or "a signal on another rank"
            control.should_save = True
            control.should_training_stop = True
        return control


def interruption(preemption: PreemptionCallback, checkpoint: Path, main_process: bool) -> RunInterrupted:
    """The exit of a run stopped by a signal: status 128 + signal, and a last line that says how to resume.

    The resume command needs no other flag: the checkpoint holds the run's arguments (`hf_sft.training.resume`).
    """
    if not main_process:
        return RunInterrupted("", 128 + preemption.signal)
    command = ["--resume_from_ckpt_path", str(checkpoint)]
    if Path(sys.argv[0]).name == "train.py":  # scripts/train.py, maybe under accelerate launch
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        launcher = ["python"] if processes == 1 else ["accelerate", "launch", "--num_processes", str(processes)]
        command = [*launcher, sys.argv[0], *command]
    else:
        command = ["hf-sft", "train", *command]
    return RunInterrupted(
        f"stopped by {preemption.requested} at step {checkpoint.name.split('-')[-1]}: checkpoint saved in "
        f"{checkpoint}; resume with: {shlex.join(command)}",
        128 + preemption.signal,
    )
