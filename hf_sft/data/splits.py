"""A prepared split: what `build_datasets` hands to training, streamed or map-style, behind one interface.

Both kinds carry `dataset` (what `Trainer` gets), `source`, `skipped` and `skipped_messages` (bad records of the
source), `streamed` (whether `dataset` is an iterable stream without a length) and `describe(role)` (the one-line
account training logs and `hf-sft data` prints). A caller never needs to tell them apart by their attributes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


def plural(n: int, word: str) -> str:
    """`1 bad record`, `2 bad records`."""
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class TokenizedSplit:
    """One split tokenised up front (map-style), ready for `Trainer`, with its bookkeeping.

    Attributes:
        dataset: exactly the columns `input_ids`, `attention_mask`, `labels`.
        index: for each row of `dataset`, the 0-based position of its record in the source (int64 array).
        lengths: for each row of `dataset`, its length in tokens (int64 array).
        status: every record tokenised, by outcome: `ok`, `truncated_input`, `truncated`, `drop:<reason>`.
        skipped: bad records skipped in the source, by kind (with --val_split, reported on the training split).
        skipped_messages: the first few of them as `FILE:LINE: reason`.
        source: path or Hub id.
        lost_characters: characters of the records that the tokenizer cannot represent (it drops them silently).
        records_losing_characters: how many records contain at least one of them.
        supervised_tokens: labels that are not -100, over every row of `dataset`.
    """

    streamed: ClassVar[bool] = False

    dataset: Any
    index: np.ndarray
    lengths: np.ndarray
    status: Counter
    skipped: Counter = field(default_factory=Counter)
    skipped_messages: list[str] = field(default_factory=list)
    source: str = ""
    lost_characters: str = ""
    records_losing_characters: int = 0
    supervised_tokens: int = 0

    @property
    def dropped(self) -> dict[str, int]:
        """Dropped examples by reason (`too_long`, `too_long_without_input`, `no_supervised_tokens`)."""
        return {key.removeprefix("drop:"): n for key, n in sorted(self.status.items()) if key.startswith("drop:")}

    def describe(self, role: str) -> str:
        """The one-line account of the split: `train data: N examples from SOURCE; dropped: ...`."""
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items()) or "none"
        skipped = sum(self.skipped.values())
        line = f"{role} data: {len(self.index)} examples from {self.source}; dropped: {dropped}"
        return line + (f"; skipped {plural(skipped, 'bad record')}" if skipped else "")


@dataclass
class StreamedSplit:
    """The training split of a `--streaming` run: the stream and what the index pass counted.

    Attributes:
        dataset: the `hf_sft.data.stream.StreamingExamples`.
        source: the file.
        records: valid training records (the held-out ones excluded).
        skipped: bad records skipped, by kind.
        skipped_messages: the first few of them.
    """

    streamed: ClassVar[bool] = True

    dataset: Any
    source: str
    records: int
    skipped: Counter = field(default_factory=Counter)
    skipped_messages: list[str] = field(default_factory=list)

    def describe(self, role: str) -> str:
        """The one-line account of the stream (drops are counted as the stream reads, not known up front)."""
        skipped = sum(self.skipped.values())
        line = f"{role} data: streaming {self.records} records from {self.source}, tokenised as consumed"
        return line + (f"; skipped {plural(skipped, 'bad record')}" if skipped else "")


@dataclass
class SFTData:
    """The training split and the optional evaluation split (always map-style: evaluation reads it repeatedly)."""

    train: TokenizedSplit | StreamedSplit
    eval: TokenizedSplit | None = None

    def describe(self) -> list[str]:
        """The one-line accounts of the splits (`train data: ...`, `eval data: ...`): what training logs and
        `hf-sft data` prints for the same flags."""
        return [split.describe(role) for role, split in (("train", self.train), ("eval", self.eval)) if split]


def split_line(role: str, split: TokenizedSplit | StreamedSplit) -> str:
    """`split.describe(role)`: the line training logs and `hf-sft data` prints for a split of either kind."""
    return split.describe(role)
