"""Checkpoints written whole: staged beside the run, sealed with a manifest, renamed into place, then rotated.

Trainer writes `checkpoint-STEP/` where `_get_output_dir` says. For the length of each save that is a staging folder
of the run's (`out_dir/.hf_sft-tmp-checkpoint-STEP/checkpoint-STEP/`, the same name on every process), so every
process writes its part there: weights, optimizer and scheduler, RNG state, `trainer_state.json`. The main process
adds hf_sft's files (`hf_sft.training.checkpoint_files`), and once every process is done seals the folder
(`hf_sft.training.checkpoint_check.seal`) and renames it into place through `hf_sft.writer`. A checkpoint under its
own name is therefore always complete; a crash leaves only the staging folder, which the next save of that step and
the next run in the folder remove. Old checkpoints are rotated (`save_total_limit`) only after the new one is in
place. A write the system refuses (a full disk, say) removes the staging folder and stops the run with one line
naming the path, the cause and the newest checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_sft.errors import WriteFailed
from hf_sft.training.checkpoint_check import MANIFEST, seal
from hf_sft.training.checkpoint_files import CheckpointFiles
from hf_sft.training.checkpoints import list_checkpoints
from hf_sft.writer import new_folder, remove, shared_temp, user_error

logger = logging.getLogger("hf_sft.train")


class StagedCheckpoints:
    """Trainer mixin (list it before the Trainer class): every checkpoint is staged, sealed, then renamed into place.

    Give Trainer `save_total_limit=None`: its own rotation would run before the new checkpoint is in place.

    Args:
        checkpoint_files: what hf_sft adds to each checkpoint (None: nothing).
        keep_checkpoints: the newest complete checkpoints to keep (`--save_total_limit`; None: all).
    """

    _staging_root: Path | None = None
    _push_deferred = False

    def __init__(
        self, *args, checkpoint_files: CheckpointFiles | None = None, keep_checkpoints: int | None = None, **kwargs
    ):
        self.checkpoint_files = checkpoint_files
        self.keep_checkpoints = keep_checkpoints
        super().__init__(*args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        root = shared_temp(final)
        main = self.is_world_process_zero()
        if main:
            remove(root)  # what a killed save of this step left
        try:
            with new_folder(final, temp=root / final.name) if main else contextlib.nullcontext() as staged:
                self.accelerator.wait_for_everyone()  # the staging folder exists before anyone writes into it
                self._staging_root = root
                self._push_deferred = True
                try:
                    super()._save_checkpoint(model, trial)
                finally:
                    self._staging_root = None
                    self._push_deferred = False
                if main and self.checkpoint_files is not None:
                    self.checkpoint_files.write(staged, self.model)
                self.accelerator.wait_for_everyone()  # every process's files are in
                if main:
                    seal(staged, self.state.global_step)
        except WriteFailed as err:  # named after the checkpoint, not the staged file that failed
            cause = user_error(err.__cause__) or "no space left on device"
            raise WriteFailed(f"cannot write {final}: {cause}; {_way_forward(run_dir)}") from err.__cause__
        finally:
            if main:
                remove(root)
        if main:
            self._fix_best_checkpoint(root, final)
            rotate_checkpoints(run_dir, final, self.keep_checkpoints)
        self.accelerator.wait_for_everyone()  # the checkpoint is in place before anyone goes on
        if self.args.push_to_hub:
            super()._push_from_checkpoint(str(final))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer pushes from inside its save: the run folder then holds our staging folder, which its upload would
        # list and then lose mid-upload. Push once the checkpoint is in place instead.
        if not self._push_deferred:
            super()._push_from_checkpoint(checkpoint_folder)

    def _fix_best_checkpoint(self, root: Path, final: Path) -> None:
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == root:
            self.state.best_model_checkpoint = str(final)


def rotate_checkpoints(run_dir: Path, current: Path, keep: int | None) -> None:
    """Remove folders without a completion mark, then all but the newest `keep` complete checkpoints (not `current`).

    Folders without a mark are what an older hf_sft left when a write was cut short.
    """
    for folder in list_checkpoints(run_dir, complete_only=False):
        if folder != current and not (folder / MANIFEST).is_file():
            logger.warning("removing incomplete checkpoint %s", folder)
            remove(folder)
    if keep:
        for folder in list_checkpoints(run_dir)[:-keep]:
            if folder != current:
                remove(folder)


def _way_forward(run_dir: Path) -> str:
    complete = list_checkpoints(run_dir)  # a failed save leaves its destination as it was
    if not complete:
        return "no checkpoint was written before it: make room, then run the same command again"
    return (
        f"the newest complete checkpoint is {complete[-1].name}: make room, then continue with "
        "--resume_from_ckpt_path latest"
    )
