"""`--streaming`: train from a source read record by record as it is consumed, at constant memory.

A plain `.jsonl` file is read back by byte offset. One pass first reads the file line by line
(`hf_sft.data.line_reader`) and validates every record (the checks, the `FILE:LINE: reason` errors and the skip counts
of the map-style path: `hf_sft.data.records.RecordChecker`), keeping only the byte offset of each valid record: a
numpy `int64` array, 8 bytes per record.

Every other source the map-style path reads (`.jsonl.gz`, `.json`, `.csv`, each maybe gzip-compressed, parquet files
or a folder of shards, a `save_to_disk` folder, a Hub dataset) cannot be read back by byte offset: a compressed file
cannot seek, and a parquet file is read by row group. Those records are loaded and validated exactly as without
`--streaming` (`hf_sft.data.pipeline.load_records`: the same messages, counts and `index`), into the normalised,
memory-mapped Arrow copy in the `datasets` cache that the map-style path tokenises, and the stream reads them back by
row number (`records_source`): one pass over the source, disk rather than memory, and on resume the copy is a cache
hit, so the source is not read again. Only the tokenisation is deferred.

Each epoch then draws the permutation the map-style run's sampler draws (`torch.randperm` seeded with the data seed
plus the epoch, as accelerate's `SeedableRandomSampler` does; another 8 bytes per record), and `StreamingExamples`
reads the records in that order (`read_records`: by seeking to their offsets, or by row number), `chunk_size` at a
time, tokenises and masks each chunk (`tokenize_and_mask`, the map-style function) and applies the length policy as it
goes. Nothing else per record is kept: no token ids, no texts.

What "the same order" means: with `--val_split` the held-out records are chosen exactly as `Dataset.train_test_split`
chooses them, and the training records keep the order that split gives them; every epoch visits them in the
map-style sampler's permutation for that epoch. When no example is dropped by the length policy, the examples, their
order and so the losses equal the map-style run's step for step within an epoch. A dropped example is passed over
in the stream, whereas the map-style sampler permutes only the kept ones: with drops the streamed order is the same
permutation of the records with the dropped ones left out. The stream runs on from one epoch into the next (the map-
style run ends an epoch with a short batch instead). Length grouping needs every length before the first step and is
refused.

A `.jsonl` file's records are read back by offset and validated again there, cheaply, to normalise them.
`hf_sft.data.pipeline.build_datasets(..., streaming=True)` is the entry point: the same steps as the map-style path,
with the training split a branch of them.

Resume: `hf_sft.training`'s `StreamPositionCallback` stores, in every checkpoint's `trainer_state.json`, the epoch
and the position in that epoch's permutation of the first record not yet consumed. A resumed run starts the stream
there (Trainer's own replay of the consumed batches is switched off with `ignore_data_skip`), so nothing consumed is
read or tokenised again; the position names a record of the permutation, not a byte of the file, so it holds for
every kind of source.
"""

from __future__ import annotations

import contextlib
import logging
import math
from array import array
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_sft.data.line_reader import iter_json_lines, read_line_at
from hf_sft.data.masking import MODEL_COLUMNS, STATUS_COLUMN, Encoder, tokenize_and_mask
from hf_sft.data.records import RecordChecker, Records, check_skipped, normalised_features, validate_record
from hf_sft.data.template import DEFAULT_FORMAT, PromptFormat
from hf_sft.errors import UsageError

logger = logging.getLogger(__name__)
CHUNK_SIZE = 256  # records tokenised per call: large enough for the batched tokenizer, small next to memory
SEEKABLE_EXTENSION = ".jsonl"  # read back by byte offset; every other source by row number


@dataclass
class StreamSource:
    """The valid records of a source: byte offsets in a `.jsonl` file, or row numbers in a records dataset.

    Attributes:
        path: the file (the source as given, for a records dataset).
        offsets: byte offset of each valid record's line (`int64`), in source order; or, with `records`, its row.
        shape: `"instruction"` or `"messages"`.
        fields: the source field names per column.
        skipped: bad records skipped, by kind.
        skipped_messages: the first few of them as `FILE:LINE: reason`.
        records: the validated, normalised records (a memory-mapped `datasets.Dataset`) of a source that cannot be
            read back by byte offset; None for a `.jsonl` file.
    """

    path: Path
    offsets: np.ndarray
    shape: str
    fields: Mapping[str, tuple[str, ...]]
    skipped: Counter = field(default_factory=Counter)
    skipped_messages: list[str] = field(default_factory=list)
    records: Any = None


def seekable(path: str | Path) -> bool:
    """Whether the stream reads `path` back by byte offset: an uncompressed `.jsonl` file."""
    path = Path(path)
    return path.suffix.lower() == SEEKABLE_EXTENSION and path.is_file()


def records_source(records: Records, fields: Mapping[str, tuple[str, ...]]) -> StreamSource:
    """The stream of records loaded as the map-style path loads them (`hf_sft.data.pipeline.load_records`)."""
    dataset = records.dataset
    shape = "messages" if "messages" in dataset.column_names else "instruction"
    rows = np.arange(len(dataset), dtype=np.int64)
    return StreamSource(
        Path(records.source), rows, shape, fields, records.skipped, records.skipped_messages, records=dataset
    )


def index_records(path: str | Path, fields: Mapping[str, tuple[str, ...]], skip_bad_records: bool) -> StreamSource:
    """Validate every record of a `.jsonl` file in one pass and keep the byte offset of each valid one.

    Raises:
        UsageError: not a `.jsonl` file, missing, empty, a bad record (unless skipped) or no valid record; the
            messages are the map-style path's.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file not found: {path}")
    if not seekable(path):
        raise UsageError(f"{path} is not a .jsonl file, which a stream reads back by byte offset")
    offsets = array("q")
    checker = RecordChecker(fields)
    for number, offset, obj in iter_json_lines(path):
        if checker.check(path, number, obj) is not None:
            offsets.append(offset)
    if not offsets and not checker.skipped:
        raise UsageError(f"{path} is empty")
    check_skipped(Records(None, str(path), checker.skipped, checker.messages), len(offsets), skip_bad_records)
    return StreamSource(
        path, np.frombuffer(offsets, dtype=np.int64).copy(), checker.shape, fields, checker.skipped, checker.messages
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
    """The normalised columns of the records at `offsets` (already validated), read from the open file `handle`
    (None for a records dataset, whose rows are taken from its memory-mapped Arrow table)."""
    names = [name for name in normalised_features(source.shape) if name != "index"]
    if source.records is not None:
        rows = source.records[offsets.tolist()]
        return {name: rows[name] for name in names}
    columns: dict[str, list] = {name: [] for name in names}
    for offset in offsets.tolist():
        obj = read_line_at(handle, offset)
        for name, value in validate_record(obj, source.fields, source.shape).items():
            columns[name].append(value)
    return columns


class StreamingExamples(torch.utils.data.IterableDataset):
    """Tokenised, masked examples of the training records, in the sampler's order, read as they are consumed.

    The stream never ends: epoch after epoch, each in its own permutation; Trainer stops it at `max_steps`.

    Args:
        source: the training records (`index_records`, then `split_offsets`).
        encoder: `Encoder.from_tokenizer(tokenizer)`.
        template: prompt format.
        max_seq_len: longest example in tokens, `None` for no limit.
        length_policy: see `hf_sft.data.masking`.
        seed: the data seed (`--data_seed`, else `--seed`): epoch `e` is the permutation seeded with `seed + e`.
        chunk_size: records read and tokenised per call.
        shuffle: False for the records in their order (`--train_sampling_strategy sequential`).
    """

    def __init__(
        self,
        source: StreamSource,
        encoder: Encoder,
        template: PromptFormat = DEFAULT_FORMAT,
        max_seq_len: int | None = None,
        length_policy: str = "drop",
        seed: int = 0,
        chunk_size: int = CHUNK_SIZE,
        shuffle: bool = True,
    ):
        self.source = source
        self.encoder = encoder
        self.options = {"template": template, "max_seq_len": max_seq_len, "length_policy": length_policy}
        self.seed = seed
        self.chunk_size = chunk_size
        self.shuffle = shuffle
        self.status: Counter = Counter()  # outcome of every record tokenised so far (lookahead included)
        self.tokenized = 0  # records read and tokenised so far
        # (examples handed out, epoch, position after the last of them), for the last few examples
        self._window: deque[tuple[int, int, int]] = deque(maxlen=1)
        self.resume_at(0, 0)

    def resume_at(self, epoch: int, position: int) -> None:
        """Start the stream at `position` of epoch `epoch`'s permutation (what a checkpoint recorded)."""
        self.start = (epoch, position)  # of the first record to read
        self._window.clear()
        self._window.append((0, epoch, position))

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the records in `epoch`: the map-style sampler's draw for that epoch."""
        if not self.shuffle:
            return np.arange(len(self.source.offsets))
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(len(self.source.offsets), generator=generator).numpy()

    def position_after(self, consumed: int) -> tuple[int, int]:
        """`(epoch, position)` of the first record after the `consumed`-th example this iteration handed out."""
        for count, epoch, position in self._window:
            if count == consumed:
                return epoch, position
        raise RuntimeError(f"the stream no longer knows where example {consumed} ended: its window is too short")

    def keep_positions(self, n: int) -> None:
        """Remember the positions of the last `n` examples handed out (the lookahead of the data loader and more)."""
        self._window = deque(self._window, maxlen=n)

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        epoch, position = self.start
        self.resume_at(epoch, position)
        handed_out = 0
        seeks = self.source.records is None
        with open(self.source.path, "rb") if seeks else contextlib.nullcontext() as handle:
            while True:
                order = self.permutation(epoch)
                while position < len(order):
                    rows = self.source.offsets[order[position : position + self.chunk_size]]
                    out = tokenize_and_mask(read_records(self.source, handle, rows), self.encoder, **self.options)
                    self.tokenized += len(rows)
                    self.status.update(out[STATUS_COLUMN])
                    for row, outcome in enumerate(out[STATUS_COLUMN]):
                        if outcome.startswith("drop:"):
                            continue
                        handed_out += 1
                        self._window.append((handed_out, epoch, position + row + 1))
                        yield {name: out[name][row] for name in MODEL_COLUMNS}
                    position += len(rows)
                epoch, position = epoch + 1, 0


def held_out_records(source: StreamSource, offsets: np.ndarray, cache_dir: str | Path | None = None):
    """The held-out records as a `datasets.Dataset` (map-style: evaluation reads them again at every evaluation)."""
    import datasets

    if source.records is not None:
        return source.records.select(offsets)

    def rows(path: str, offsets: np.ndarray):
        with open(path, "rb") as handle:
            for start in range(0, len(offsets), CHUNK_SIZE):
                chunk = read_records(source, handle, offsets[start : start + CHUNK_SIZE])
                for row in range(len(next(iter(chunk.values())))):
                    yield {"index": start + row, **{name: values[row] for name, values in chunk.items()}}

    return datasets.Dataset.from_generator(
        rows,
        gen_kwargs={"path": str(source.path), "offsets": offsets},
        features=normalised_features(source.shape),
        cache_dir=str(cache_dir) if cache_dir else None,
    )
