"""What `hf-sft data` prints: counts, length percentiles, padding waste, a masked preview; and the `--dump` file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hf_sft.data.collator import padded_length
from hf_sft.data.masking import IGNORE_INDEX
from hf_sft.data.splits import TokenizedSplit, plural
from hf_sft.writer import new_file

_GREEN, _DIM, _RESET = "\033[32m", "\033[2m", "\033[0m"
PERCENTILES = (50, 90, 95, 99)


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def padding_fraction(
    lengths: Sequence[int], batch_size: int, order: Sequence[int] | None = None, multiple=None
) -> float:
    """Share of the positions in padded batches that are padding.

    Args:
        lengths: tokens per example.
        batch_size: examples per batch.
        order: the order in which examples are batched (default: as given).
        multiple: `pad_to_multiple_of`, if any.

    >>> round(padding_fraction([4, 2, 3, 3], batch_size=2), 4)  # batches [4, 2] and [3, 3]: 2 of 14 positions
    0.1429
    """
    ordered = np.asarray(lengths, dtype=np.int64)  # vectorised: a report over a million examples stays small
    if order is not None:
        ordered = ordered[np.asarray(order, dtype=np.int64)]
    if not len(ordered):
        return 0.0
    starts = np.arange(0, len(ordered), batch_size)
    longest = padded_length(np.maximum.reduceat(ordered, starts), multiple)
    padded = int((longest * np.diff(starts, append=len(ordered))).sum())
    return (padded - int(ordered.sum())) / padded if padded else 0.0


def padding_report(lengths: Sequence[int], batch_size: int, seed: int = 0) -> list[tuple[str, float]]:
    """Padding waste at `batch_size`: shuffled (the Trainer default), grouped by length, and packed."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = np.asarray(lengths, dtype=np.int64)
    shuffled = np.random.default_rng(seed).permutation(len(lengths))
    grouped = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
    return [
        ("dynamic padding, shuffled", padding_fraction(lengths, batch_size, shuffled)),
        ("dynamic padding, shuffled, multiple of 8", padding_fraction(lengths, batch_size, shuffled, multiple=8)),
        ("dynamic padding, grouped by length", padding_fraction(lengths, batch_size, grouped)),
        ("padding-free packing", 0.0),
    ]


def summary_lines(split: TokenizedSplit, max_seq_len: int | None, policy: str, batch_size: int) -> list[str]:
    """The counts, length percentiles and padding figures of one split, as printable lines."""
    n_skipped = sum(split.skipped.values())
    n_records = sum(split.status.values())
    lines = [f"records: {n_records + n_skipped} read, {plural(n_skipped, 'bad record')} skipped"]
    if n_skipped:
        lines[-1] += " (" + ", ".join(f"{kind}: {n}" for kind, n in sorted(split.skipped.items())) + ")"
    dropped = split.dropped
    n_dropped = sum(dropped.values())
    limit = f"max_seq_len {max_seq_len}" if max_seq_len else "no max_seq_len"
    lines.append(f"examples: {len(split.index)} kept, {n_dropped} dropped ({limit}, length policy {policy})")
    lines += [f"  dropped, {reason}: {n}" for reason, n in dropped.items()]
    lines += [f"  kept, {status}: {n}" for status, n in sorted(split.status.items()) if status.startswith("trunc")]
    if split.lost_characters:
        shown = " ".join(repr(char) for char in split.lost_characters[:40])
        more = " ..." if len(split.lost_characters) > 40 else ""
        lines.append(
            f"warning: {plural(split.records_losing_characters, 'record')} contain characters the tokenizer cannot "
            f"represent and drops: {shown}{more}"
        )
    if not len(split.lengths):
        return lines
    ordered = np.sort(split.lengths)
    total = int(ordered.sum())
    stats = " | ".join([f"min {ordered[0]}", *(f"p{q} {percentile(ordered, q)}" for q in PERCENTILES)])
    lines.append(f"tokens per example: {stats} | max {ordered[-1]} | mean {total / len(ordered):.1f}")
    supervised = split.supervised_tokens
    lines.append(f"tokens: {total} in all, {supervised} supervised ({supervised / total:.1%}; response + EOS)")
    lines.append(f"padding waste at batch size {batch_size}:")
    lines += [f"  {name:<42} {fraction:6.1%}" for name, fraction in padding_report(split.lengths, batch_size)]
    return lines


def render_preview(tokenizer, input_ids: Sequence[int], labels: Sequence[int], color: bool = False) -> list[str]:
    """An example as text with its supervised tokens marked, and the tokens around the prompt/response boundary.

    Supervised runs are wrapped in `[[...]]` (or shown in green, the prompt dimmed, when `color`).
    """
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels, strict=True):
        supervised = label != IGNORE_INDEX
        if runs and runs[-1][0] == supervised:
            runs[-1][1].append(token)
        else:
            runs.append((supervised, [token]))
    parts = []
    for supervised, ids in runs:
        text = tokenizer.decode(ids)
        if color:
            parts.append(f"{_GREEN if supervised else _DIM}{text}{_RESET}")
        else:
            parts.append(f"[[{text}]]" if supervised else text)
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    tokens = tokenizer.convert_ids_to_tokens(list(input_ids))
    boundary = " ".join(repr(t) for t in tokens[max(0, first - 4) : first])
    boundary += " | " + " ".join(repr(t) for t in tokens[first : first + 4])
    return ["".join(parts), f"tokens at the boundary (prompt | supervised): {boundary}"]


DUMP_COMMAND = "data --dump"
# How every dump begins (`write_dump`'s first key, compact): an existing file that begins so is an earlier dump,
# rewritten without --overwrite (`hf_sft.writer.check_destination`); any other file needs it.
DUMP_MARKER = b'{"index":'


def write_dump(path: str | Path, *splits: TokenizedSplit) -> int:
    """Write `{"index", "input_ids", "labels"}` per kept example of `splits`, in input order.

    `index` is the record's 0-based position in the input; labels are unshifted, -100 where not supervised.

    Returns:
        The number of lines written.
    """
    rows = []
    for split in splits:
        columns = split.dataset.select_columns(["input_ids", "labels"])
        rows += [(index, row) for index, row in zip(split.index, columns, strict=True)]
    rows.sort(key=lambda item: item[0])
    with new_file(path) as tmp, tmp.open("w", encoding="utf-8") as out:  # never a partial file under its name
        for index, row in rows:
            record = {"index": int(index), "input_ids": row["input_ids"], "labels": row["labels"]}
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
    return len(rows)
