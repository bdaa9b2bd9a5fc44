"""The one pass of `--streaming` over a `.jsonl` file: every record validated, the byte offset of each valid one kept.

The offsets are a numpy `int64` array (8 bytes per record): the only thing per record a streaming run holds. The
records are read back by seeking to their offsets (`read_records`) and validated again there, cheaply, to normalise
them. See `hf_sft.data.streaming`.
"""

from __future__ import annotations

import logging
import math
from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_sft.data.jsonfile import BadRecord, parse_line
from hf_sft.data.records import Records, check_skipped, normalised_features, record_shape, validate_record
from hf_sft.errors import UsageError

logger = logging.getLogger(__name__)

STREAM_EXTENSIONS = (".jsonl",)
_BOM = b"\xef\xbb\xbf"


@dataclass
class StreamSource:
    """The valid records of a `.jsonl` file, as byte offsets.

    Attributes:
        path: the file.
        offsets: byte offset of each valid record's line (`int64`), in source order.
        shape: `"instruction"` or `"messages"`.
        fields: the source field names per column.
        skipped: bad records skipped, by kind.
        skipped_messages: the first few of them as `FILE:LINE: reason`.
    """

    path: Path
    offsets: np.ndarray
    shape: str
    fields: Mapping[str, tuple[str, ...]]
    skipped: Counter = field(default_factory=Counter)
    skipped_messages: list[str] = field(default_factory=list)


def index_records(path: str | Path, fields: Mapping[str, tuple[str, ...]], skip_bad_records: bool) -> StreamSource:
    """Validate every record of a `.jsonl` file in one pass and keep the byte offset of each valid one.

    Raises:
        UsageError: not a `.jsonl` file, missing, empty, a bad record (unless skipped) or no valid record; the
            messages are the map-style path's.
    """
    path = Path(path)
    if path.suffix.lower() not in STREAM_EXTENSIONS or path.is_dir():
        raise UsageError(
            f"--streaming reads a .jsonl file (one record per line, read back by byte offset); {path} is not one: "
            "train without --streaming, or tokenise it once with `hf-sft data --save_to DIR`"
        )
    if not path.exists():
        raise UsageError(f"data file not found: {path}")
    offsets = array("q")
    records = Records(dataset=None, source=str(path))
    shape = None
    with path.open("rb") as source:
        offset = 0
        for number, line in enumerate(source, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            obj = parse_line(line[3:] if start == 0 and line.startswith(_BOM) else line)
            if shape is None and isinstance(obj, dict):
                shape = record_shape(obj)
            try:
                if isinstance(obj, BadRecord):
                    raise obj
                if isinstance(obj, dict) and record_shape(obj) != shape:
                    raise UsageError(
                        f"{path}:{number}: a {record_shape(obj)} record in a file of {shape} records; "
                        "a file holds either instruction records or messages records"
                    )
                validate_record(obj, fields, shape or "instruction")
                offsets.append(start)
            except BadRecord as err:
                records.skipped[err.kind] += 1
                if len(records.skipped_messages) < 5:
                    records.skipped_messages.append(f"{path}:{number}: {err}")
    if not offsets and not records.skipped:
        raise UsageError(f"{path} is empty")
    check_skipped(records, len(offsets), skip_bad_records)
    return StreamSource(
        path, np.frombuffer(offsets, dtype=np.int64).copy(), shape, fields, records.skipped, records.skipped_messages
    )


def split_offsets(offsets: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The training and held-out records, chosen as `Dataset.train_test_split(test_size=val_split, seed=seed)` does.

    Returns:
        `(train, held_out)` offsets; `held_out` is None when `val_split` is 0 or leaves one side empty.
    """
    n = len(offsets)
    n_test = math.ceil(val_split * n)
    if not val_split:
        return offsets, None
    if n_test == 0 or n_test >= n:
        logger.warning(
            "--val_split %s of %d records leaves no evaluation record: training on all of them, no evaluation",
            val_split,
            n,
        )
        return offsets, None
    permutation = np.random.default_rng(seed).permutation(n)
    return offsets[permutation[n_test:]], offsets[permutation[:n_test]]


def read_records(source: StreamSource, handle, offsets: np.ndarray) -> dict[str, list]:
    """The normalised columns of the records at `offsets` (already validated), read from the open file `handle`."""
    columns: dict[str, list] = {name: [] for name in normalised_features(source.shape) if name != "index"}
    for offset in offsets.tolist():
        handle.seek(offset)
        line = handle.readline()
        obj = parse_line(line[3:] if offset == 0 and line.startswith(_BOM) else line)
        for name, value in validate_record(obj, source.fields, source.shape).items():
            columns[name].append(value)
    return columns
