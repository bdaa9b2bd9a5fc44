"""The run's one Trainer subclass: every override of `transformers.Trainer` side by side.

Callbacks are the extension point, and everything that a callback can do is done by one (`hf_sft.training.callbacks`).
What follows cannot be: each override names the Trainer API it relies on and why it is needed. Private ones
(`_save_checkpoint`, `_get_output_dir`, `_push_from_checkpoint`, `_get_grad_norm`) can change between transformers
releases: `tests/test_trainer.py` fails if one of them is renamed, and the tests of what each does are named beside
it.

- **Checkpoints written whole** (`_save_checkpoint`, `_get_output_dir`, `_push_from_checkpoint`): every checkpoint is
  staged, sealed, renamed into place and only then rotated and pushed (`hf_sft.training.checkpoints`). Give Trainer
  `save_total_limit=None`: its own rotation would run before the new checkpoint is in place.
- **The numeric guard's view** (`training_step`, `_get_grad_norm`): each micro-step's loss and each optimizer step's
  gradient norm are shown to `hf_sft.training.callbacks.NumericGuard`, on the device.
- **One compiled graph for every length** (`__init__`): under `--torch_compile`, accelerate's dynamo plugin is asked
  for dynamic shapes, so that packed rows of any length reuse the first graph.
- **Token-budget micro-batches** (`get_batch_samples`, `training_step`): with padding-free packing the examples of
  one optimizer step are repacked into as few rows as fit a budget.

Token-budget micro-batches in detail.

Trainer draws `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` examples per optimizer
step. With padding-free packing each is one short row (two Dolly examples: a few hundred tokens), so the matmuls are
small and every step pays the per-forward overhead `gradient_accumulation_steps` times. The budget is what a padded
micro-batch already reserves, `per_device_train_batch_size x max_seq_len` tokens: first-fit packing of the step's
examples into rows of at most that many tokens needs at most `gradient_accumulation_steps` rows (a new row opens only
when every open row holds `per_device_train_batch_size` examples), so memory stays bounded and there are fewer,
larger forwards.

Trainer's loop counts micro-batches, not examples: it syncs, steps the optimizer and advances the epoch every
`gradient_accumulation_steps` of them. So the step keeps that many slots, the slots freed by packing come first as
empty (zero-token) micro-batches that cost nothing, and the last slot, where DDP/FSDP synchronise gradients, is a
real row. The loss normalisation is unchanged: Trainer counts `num_items_in_batch` over the original micro-batches
(the same supervised labels), and each row's loss is its summed token loss divided by that count.

That loop structure is why this is an override and not a callback: callbacks cannot change micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_sft.heads_hfsft_gpt import next_token_labels, supervised_positions
from hf_sft.training.callbacks import NumericGuard
from hf_sft.training.checkpoints import CheckpointFiles, rotate_checkpoints, staged_checkpoint

PACKED_KEYS = ("input_ids", "labels", "position_ids")
# The batch key, and the causal LM's forward argument, of the positions the LM head scores in supervised-only mode:
# counted on the host where the batch is built, so that the forward has no data-dependent shape to find.
SUPERVISED_POSITIONS = "supervised_positions"


class WithSupervisedPositions:
    """Another collator's batches with `supervised_positions`: the flat (B * T) indices of the positions whose next
    token is supervised, what the LM head reads in supervised-only mode.

    >>> from hf_sft.data import make_collator
    >>> collate = WithSupervisedPositions(make_collator(pad_token_id=0))
    >>> collate([
    ...     {"input_ids": [1, 7, 8, 2], "labels": [-100, -100, 8, 2]},
    ...     {"input_ids": [1, 9, 2], "labels": [-100, 9, 2]},
    ... ])["supervised_positions"]
    tensor([1, 2, 4, 5])
    """

    def __init__(self, collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]):
        self.collate = collate

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(features)
        batch[SUPERVISED_POSITIONS] = supervised_positions(next_token_labels(batch["labels"]))
        return batch


def first_fit_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Example indices per row: each example goes into the first row it fits (an oversized one gets a row alone).

    >>> first_fit_rows([300, 500, 200, 400, 100], budget=800)
    [[0, 1], [2, 3, 4]]
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        fit = next((row for row, free in enumerate(room) if length <= free), None)
        if fit is None:
            rows.append([])
            room.append(budget)
            fit = len(rows) - 1
        rows[fit].append(index)
        room[fit] -= length
    return rows


def repack_micro_batches(micro_batches: list[dict], budget: int) -> list[dict]:
    """The same examples as `micro_batches` (packed rows) in first-fit rows of at most `budget` tokens.

    Returns as many micro-batches as were given: the empty ones (zero tokens) first, then the rows. Batches that are
    not single packed rows (padded batches, extra keys) are returned unchanged. Batches that carry
    `supervised_positions` get them counted again for their new rows.
    """
    keys = set(PACKED_KEYS)
    if micro_batches and SUPERVISED_POSITIONS in micro_batches[0]:
        keys.add(SUPERVISED_POSITIONS)
    packed = all(set(batch) == keys and len(batch["input_ids"]) == 1 for batch in micro_batches)
    if not micro_batches or not packed:
        return micro_batches
    step = {key: torch.cat([batch[key] for batch in micro_batches], dim=1) for key in PACKED_KEYS}  # (1, S)
    # One host read per optimizer step: the example boundaries, and the labels when the positions are recounted.
    host = torch.cat([step["position_ids"], step["labels"]]).cpu()  # (2, S)
    positions, labels = host[0], host[1:]
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return micro_batches
    bounds = list(zip(starts, starts[1:] + [positions.shape[0]], strict=True))
    rows = first_fit_rows([end - start for start, end in bounds], budget)
    device = step["input_ids"].device
    repacked = []
    for row in rows:
        index = torch.cat([torch.arange(*bounds[example]) for example in row])
        batch = {key: value.index_select(1, index.to(device)) for key, value in step.items()}
        if SUPERVISED_POSITIONS in keys:
            batch[SUPERVISED_POSITIONS] = supervised_positions(next_token_labels(labels[:, index])).to(device)
        repacked.append(batch)
    empty = {key: value[:, :0] for key, value in step.items()}
    if SUPERVISED_POSITIONS in keys:
        empty[SUPERVISED_POSITIONS] = torch.zeros(0, dtype=torch.long, device=device)
    return [empty] * (len(micro_batches) - len(repacked)) + repacked


class RunTrainer(Trainer):
    """`Trainer` whose checkpoints are written whole, whose steps are shown to the numeric guard, and whose packed
    micro-batches are repacked per optimizer step into rows of at most `token_budget` tokens.

    Args:
        numeric_guard: the run's `NumericGuard` (registered as the last callback); None: no guard.
        checkpoint_files: what hf_sft adds to each checkpoint (None: nothing).
        keep_checkpoints: the newest complete checkpoints to keep (`--save_total_limit`; None: all).
        token_budget: tokens per row, `per_device_train_batch_size x max_seq_len`; None trains as `Trainer` does.
        *args, **kwargs: `Trainer`'s.
    """

    _staging_root: Path | None = None
    _push_deferred = False

    def __init__(
        self,
        *args,
        numeric_guard: NumericGuard | None = None,
        checkpoint_files: CheckpointFiles | None = None,
        keep_checkpoints: int | None = None,
        token_budget: int | None = None,
        **kwargs,
    ):
        self.checkpoint_files = checkpoint_files
        self.keep_checkpoints = keep_checkpoints
        super().__init__(*args, **kwargs)
        if self.args.torch_compile:
            # Packed rows change length at every micro-batch: one graph for every length from the start. Left to
            # dynamo, a static graph for the first length would be compiled, then replaced at the second.
            self.accelerator.state.dynamo_plugin.dynamic = True
        self.token_budget = token_budget
        self.numeric_guard = numeric_guard
        if numeric_guard is not None:
            numeric_guard.accelerator = self.accelerator  # whether the grad scaler skipped a step

    # --- checkpoints written whole ---

    def _get_output_dir(self, trial) -> str:
        # Private `Trainer._get_output_dir`: where `Trainer._save_checkpoint` puts `checkpoint-STEP/`. During our save
        # it is the staging root (tests/test_staged_save.py fails if Trainer stops asking it).
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        # Private `Trainer._save_checkpoint`: the one call that writes a whole checkpoint (weights, optimizer,
        # scheduler, RNG state, trainer state) on every process; wrapped so that it lands in a staging folder that is
        # sealed and renamed into place (tests/test_staged_save.py, tests/test_signals.py).
        run_dir = Path(self._get_output_dir(trial))
        main = self.is_world_process_zero()
        step = self.state.global_step
        with staged_checkpoint(run_dir, step, main, self.accelerator.wait_for_everyone) as (root, staged):
            self._staging_root = root
            self._push_deferred = True
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
                self._push_deferred = False
            if main and self.checkpoint_files is not None:
                self.checkpoint_files.write(staged, self.model)
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if main:
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == root:
                self.state.best_model_checkpoint = str(final)
            rotate_checkpoints(run_dir, final, self.keep_checkpoints)
        self.accelerator.wait_for_everyone()  # the checkpoint is in place before anyone goes on
        if self.args.push_to_hub:
            super()._push_from_checkpoint(str(final))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Private `Trainer._push_from_checkpoint`: Trainer pushes from inside its save, when the run folder holds our
        # staging folder, which its upload would list and then lose mid-upload. `_save_checkpoint` above pushes once
        # the checkpoint is in place instead (tests/test_hub.py).
        if not self._push_deferred:
            super()._push_from_checkpoint(checkpoint_folder)

    # --- the numeric guard's view, and token-budget micro-batches ---

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, object]:
        # Public `Trainer.get_batch_samples`: the micro-batches of one optimizer step, with `num_items_in_batch`
        # counted over them; the one place where a step's examples can be regrouped.
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._repacks(num_items_in_batch):
            batch_samples = repack_micro_batches(batch_samples, self.token_budget)
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        # Public `Trainer.training_step`: one micro-batch's forward and backward. A slot emptied by repacking costs
        # nothing; every real micro-step's loss is shown to the guard (kept on the device: no host sync).
        if inputs.get("input_ids") is not None and inputs["input_ids"].numel() == 0:
            return torch.zeros((), device=self.args.device)  # a slot whose examples went into a fuller row
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.numeric_guard is not None:
            self.numeric_guard.record_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Private `Trainer._get_grad_norm`: Trainer's own pre-clip norm of the step, whatever the engine
        # (tests/test_trainer.py fails if it is renamed).
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.numeric_guard is not None:
            self.numeric_guard.record_grad_norm(grad_norm)
        return grad_norm

    def _repacks(self, num_items_in_batch) -> bool:
        """Only where the loss is normalised by `num_items_in_batch` (else Trainer averages per micro-batch) and the
        engine neither counts micro-batches itself (DeepSpeed steps on its own count of backward calls) nor runs a
        collective in every forward (FSDP gathers parameters: ranks with different numbers of real rows would
        wait on each other forever)."""
        from accelerate.utils import DistributedType

        return (
            self.token_budget is not None
            and num_items_in_batch is not None
            and self.model_accepts_loss_kwargs
            and self.accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        )
