"""Batching: dynamic padding, or padding-free packing. Collators only pad or concatenate; masking is done earlier.

Length grouping is the Trainer's job in transformers 5: `TrainingArguments(train_sampling_strategy="group_by_length")`
(the 4.x `group_by_length=True` is gone). Lengths come from a `length` column if the dataset has one, else from
`input_ids`; our datasets carry only the model's columns, so the sampler measures `input_ids` once at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from hf_sft.data.masking import IGNORE_INDEX


class PaddingCollator:
    """Right-pad every example to the longest in the batch (optionally rounded up to a multiple).

    Args:
        pad_token_id: id written into padded `input_ids` positions (never attended to, never supervised).
        pad_to_multiple_of: round the padded length up to this multiple (8 suits tensor cores); `None` for exact.

    >>> collate = PaddingCollator(pad_token_id=0)
    >>> batch = collate([
    ...     {"input_ids": [1, 7, 8, 2], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 8, 2]},
    ...     {"input_ids": [1, 9, 2], "attention_mask": [1, 1, 1], "labels": [-100, 9, 2]},
    ... ])
    >>> batch["input_ids"]
    tensor([[1, 7, 8, 2],
            [1, 9, 2, 0]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1, 1],
            [1, 1, 1, 0]])
    >>> batch["labels"]
    tensor([[-100, -100,    8,    2],
            [-100,    9,    2, -100]])
    >>> collate_8 = PaddingCollator(pad_token_id=0, pad_to_multiple_of=8)
    >>> collate_8([{"input_ids": [1, 2], "labels": [-100, 2]}])["input_ids"]
    tensor([[1, 2, 0, 0, 0, 0, 0, 0]])
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = padded_length(max(lengths), self.pad_to_multiple_of)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths, strict=True)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
            labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# Padding-free packing is transformers' `DataCollatorWithFlattening`: the batch's examples concatenated into one row,
# `position_ids` restarting per example, the label of each example's first token -100 (so the last token of one
# example is never trained to predict the next), and deliberately no `attention_mask` (the model derives
# per-example causal attention from `position_ids` only when the mask is absent). The name stays importable.
PackingCollator = DataCollatorWithFlattening


def make_collator(
    pad_token_id: int,
    packing: bool = False,
    pad_to_multiple_of: int | None = None,
) -> PaddingCollator | DataCollatorWithFlattening:
    """The collator for a training run.

    Args:
        pad_token_id: the tokenizer's pad id (used only without packing).
        packing: padding-free packing instead of padding.
        pad_to_multiple_of: padding granularity (ignored with packing, which has no padding).

    Returns:
        A callable turning a list of dataset rows into a batch of tensors.

    >>> batch = make_collator(pad_token_id=0, packing=True)([
    ...     {"input_ids": [1, 7, 8, 2], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 8, 2]},
    ...     {"input_ids": [1, 9, 2], "attention_mask": [1, 1, 1], "labels": [-100, 9, 2]},
    ... ])
    >>> sorted(batch)
    ['input_ids', 'labels', 'position_ids']
    >>> batch["input_ids"]
    tensor([[1, 7, 8, 2, 1, 9, 2]])
    >>> batch["position_ids"]
    tensor([[0, 1, 2, 3, 0, 1, 2]])
    >>> batch["labels"]
    tensor([[-100, -100,    8,    2, -100,    9,    2]])
    """
    if packing:
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX)
    return PaddingCollator(pad_token_id, pad_to_multiple_of)


def padded_length(length: int, multiple: int | None) -> int:
    """`length` rounded up to `multiple` (unchanged when `multiple` is None or 1)."""
    if not multiple or multiple <= 1:
        return length
    return -(-length // multiple) * multiple
