"""Token-budget micro-batches: the examples of one optimizer step repacked into as few packed rows as fit a budget.

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

That loop structure is why this is a `Trainer` subclass and not a callback: callbacks cannot change micro-batches.
"""

from __future__ import annotations

import torch
from transformers import Trainer

PACKED_KEYS = ("input_ids", "labels", "position_ids")


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
    not single packed rows (padded batches, extra keys) are returned unchanged.
    """
    packed = all(set(batch) == set(PACKED_KEYS) and len(batch["input_ids"]) == 1 for batch in micro_batches)
    if not micro_batches or not packed:
        return micro_batches
    step = {key: torch.cat([batch[key] for batch in micro_batches], dim=1) for key in PACKED_KEYS}  # (1, S)
    positions = step["position_ids"][0].cpu()  # one host read per optimizer step
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return micro_batches
    bounds = list(zip(starts, starts[1:] + [positions.shape[0]], strict=True))
    rows = first_fit_rows([end - start for start, end in bounds], budget)
    repacked = []
    for row in rows:
        index = torch.cat([torch.arange(*bounds[example]) for example in row]).to(step["input_ids"].device)
        repacked.append({key: value.index_select(1, index) for key, value in step.items()})
    empty = {key: value[:, :0] for key, value in step.items()}
    return [empty] * (len(micro_batches) - len(repacked)) + repacked


class TokenBudgetTrainer(Trainer):
    """`Trainer` whose packed micro-batches are repacked per optimizer step into rows of at most `token_budget` tokens.

    Args:
        token_budget: tokens per row, `per_device_train_batch_size x max_seq_len`; None trains as `Trainer` does.
        *args, **kwargs: `Trainer`'s.
    """

    def __init__(self, *args, token_budget: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_budget = token_budget

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, object]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._repacks(num_items_in_batch):
            batch_samples = repack_micro_batches(batch_samples, self.token_budget)
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        if inputs.get("input_ids") is not None and inputs["input_ids"].numel() == 0:
            return torch.zeros((), device=self.args.device)  # a slot whose examples went into a fuller row
        return super().training_step(model, inputs, num_items_in_batch)

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
