"""`--streaming`: train from a `.jsonl` source read record by record as it is consumed, at constant memory.

One pass first reads the file line by line and validates every record (the same `FILE:LINE: reason` errors and skip
counts as the map-style path), keeping only the byte offset of each valid record: a numpy `int64` array, 8 bytes per
record. Each epoch then draws the permutation the map-style run's sampler draws (`torch.randperm` seeded with the
data seed plus the epoch, as accelerate's `SeedableRandomSampler` does; another 8 bytes per record), and
`StreamingExamples` reads the records in that order by seeking to their offsets, `chunk_size` at a time, tokenises
and masks each chunk (`tokenize_and_mask`, the map-style function) and applies the length policy as it goes. Nothing
else per record is kept: no token ids, no texts.

What "the same order" means: with `--val_split` the held-out records are chosen exactly as `Dataset.train_test_split`
chooses them, and the training records keep the order that split gives them; every epoch visits them in the
map-style sampler's permutation for that epoch. When no example is dropped by the length policy, the examples, their
order and so the losses equal the map-style run's step for step within an epoch. A dropped example is passed over
in the stream, whereas the map-style sampler permutes only the kept ones: with drops the streamed order is the same
permutation of the records with the dropped ones left out. The stream runs on from one epoch into the next (the map-
style run ends an epoch with a short batch instead). Length grouping needs every length before the first step and is
refused.

Resume: `StreamPositionCallback` stores, in every checkpoint's `trainer_state.json`, the epoch and the position in
that epoch's permutation of the first record not yet consumed. A resumed run starts the stream there (Trainer's own
replay of the consumed batches is switched off with `ignore_data_skip`), so nothing consumed is read or tokenised
again.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hf_sft.data.lengths import check_length_policy
from hf_sft.data.masking import MODEL_COLUMNS, STATUS_COLUMN, Encoder, tokenize_and_mask
from hf_sft.data.pipeline import SFTData, _tokenize_split
from hf_sft.data.records import Records, load_records, normalised_features, resolve_fields
from hf_sft.data.stream_index import StreamSource, index_records, read_records, split_offsets
from hf_sft.data.template import DEFAULT_FORMAT, PromptFormat
from hf_sft.errors import UsageError

CHUNK_SIZE = 256  # records tokenised per call: large enough for the batched tokenizer, small next to memory


class StreamingExamples(torch.utils.data.IterableDataset):
    """Tokenised, masked examples of the training records, in the sampler's order, read as they are consumed.

    The stream never ends: epoch after epoch, each in its own permutation; Trainer stops it at `max_steps`.

    Args:
        source: the training records (`index_records`, then `split_offsets`).
        encoder: `Encoder.from_tokenizer(tokenizer)`.
        template: prompt format.
        max_seq_len: longest example in tokens, `None` for no limit.
        length_policy: see `hf_sft.data.lengths`.
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
        with open(self.source.path, "rb") as handle:
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


@dataclass
class StreamedSplit:
    """The training split of a `--streaming` run: the stream and what the index pass counted.

    Attributes:
        dataset: the `StreamingExamples`.
        source: the file.
        records: valid training records (the held-out ones excluded).
        skipped: bad records skipped, by kind.
        skipped_messages: the first few of them.
    """

    dataset: StreamingExamples
    source: str
    records: int
    skipped: Counter = field(default_factory=Counter)
    skipped_messages: list[str] = field(default_factory=list)


def build_streaming(
    data_path: str | Path,
    tokenizer,
    *,
    template: PromptFormat = DEFAULT_FORMAT,
    field_map: Mapping[str, str] | None = None,
    max_seq_len: int | None = None,
    length_policy: str = "drop",
    skip_bad_records: bool = False,
    val_split: float = 0.0,
    eval_data_path: str | Path | None = None,
    seed: int = 42,
    data_seed: int | None = None,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> SFTData:
    """`build_datasets`' twin for `--streaming`: the training split is a stream, the evaluation split map-style.

    Args:
        data_seed: the seed of the training order (the run's `--data_seed`, else `--seed`); `None`: `seed`.
        Others: as `hf_sft.data.pipeline.build_datasets`.

    Returns:
        `SFTData` whose `train` is a `StreamedSplit` and whose `eval` (held-out records or `eval_data_path`) is a
        `TokenizedSplit`, tokenised up front.

    Raises:
        UsageError: as `build_datasets`, and a source `--streaming` cannot read by offset.
    """
    check_length_policy(length_policy)
    if val_split and eval_data_path:
        raise UsageError("pass either --val_split or --eval_data_path, not both")
    fields = resolve_fields(field_map)
    source = index_records(data_path, fields, skip_bad_records)
    train_offsets, held_offsets = split_offsets(source.offsets, val_split, seed)
    encoder = Encoder.from_tokenizer(tokenizer)
    options = {"template": template, "max_seq_len": max_seq_len, "length_policy": length_policy, "num_proc": num_proc}
    evaluation = None
    if held_offsets is not None:
        held = Records(held_out_records(source, held_offsets, cache_dir), f"{data_path} (held out)")
        evaluation = _tokenize_split(held, "evaluation", encoder, options, required=False)
    elif eval_data_path:
        held = load_records(eval_data_path, fields, skip_bad_records, cache_dir)
        evaluation = _tokenize_split(held, "evaluation", encoder, options)
    stream = StreamingExamples(
        dataclasses.replace(source, offsets=train_offsets),
        encoder,
        template,
        max_seq_len,
        length_policy,
        seed=seed if data_seed is None else data_seed,
    )
    train = StreamedSplit(stream, str(data_path), len(train_offsets), source.skipped, source.skipped_messages)
    return SFTData(train, evaluation)
