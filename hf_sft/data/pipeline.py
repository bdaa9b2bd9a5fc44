"""From a data source to the datasets `Trainer` gets: one straight sequence of steps, streamed or not.

1. The options are checked, once, for both branches.
2. The records are loaded and validated (`load_records`); with `streaming` a `.jsonl` training file is indexed
   instead (`hf_sft.data.stream.index_records`: the same checks and messages, a byte offset kept per valid record),
   and any other source is loaded as without it and read back by row number (`hf_sft.data.stream.records_source`).
3. The evaluation records are held out (`val_split`, as `Dataset.train_test_split` draws them in both branches) or
   loaded from `eval_data_path`.
4. The records are tokenised and masked (`tokenize_records`), misfits dropped and counted; a streamed training split
   is tokenised as it is consumed (`hf_sft.data.stream.StreamingExamples`), with the same function.

The result is an `SFTData` of prepared splits (`hf_sft.data.splits`). `build_run_datasets` is the same from a run's
`DataArguments`, and also takes a folder written by `hf-sft data --save_to` (`hf_sft.data.saved`).

How records are checked depends on where they come from (`hf_sft.data.sources`), never what is accepted:

- a source that `datasets` reads into Arrow (JSON lines, parquet, a Hub dataset, a saved folder) is first checked
  vectorised in Arrow (`hf_sft.data.arrow_records`): when every record is valid, which is the common case, no record
  ever exists as a Python object;
- otherwise, and for CSV and JSON arrays, records are validated one by one as the source streams by: local text
  files by `hf_sft.data.text_records` (messages `FILE:LINE: reason`, the valid records written to a normalised
  JSONL copy in the `datasets` cache), Arrow sources by `Dataset.map` (messages `SOURCE row N: reason`).

`index` is the record's 0-based position in the source (blank lines are not records; a folder's shards count on
from one file to the next). Several sources are concatenated or mixed by `hf_sft.data.mixture`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hf_sft.data import masking
from hf_sft.data import template as formats
from hf_sft.data.arrow_records import arrow_records, parsed_in_arrow
from hf_sft.data.masking import (
    IGNORE_INDEX,
    LOST_COLUMN,
    MODEL_COLUMNS,
    STATUS_COLUMN,
    Encoder,
    check_length_policy,
    tokenize_and_mask,
)
from hf_sft.data.mixture import load_mixture
from hf_sft.data.records import DEFAULT_FIELDS, Records, parse_field_map, resolve_fields
from hf_sft.data.saved import is_saved_dataset, load_saved
from hf_sft.data.sources import resolve_source
from hf_sft.data.splits import SFTData, StreamedSplit, TokenizedSplit
from hf_sft.data.stream import (
    StreamingExamples,
    held_out_records,
    index_records,
    records_source,
    seekable,
    split_offsets,
)
from hf_sft.data.template import DEFAULT_FORMAT, PromptFormat
from hf_sft.data.text_records import load_text_records
from hf_sft.errors import UsageError

if TYPE_CHECKING:
    from hf_sft.data.data_arguments import DataArguments
    from hf_sft.data.jinja_format import JinjaFormat

logger = logging.getLogger(__name__)


def build_datasets(
    data_path: str | Path | Sequence[str | Path],
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
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
    data_weights: Sequence[float] | None = None,
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    dataset_revision: str | None = None,
    streaming: bool = False,
    data_seed: int | None = None,
) -> SFTData:
    """Validate, load, split, tokenise and mask: the datasets for `Trainer` (see the module docstring).

    Args:
        data_path: a source (`hf_sft.data.sources`: a `.jsonl`/`.json`/`.csv`/`.parquet` file, a folder of shards,
            a `save_to_disk` folder, a Hub dataset id), or a list of sources (concatenated, or mixed by
            `data_weights`).
        tokenizer: the model's `PreTrainedTokenizerFast` (BOS/EOS set).
        template: prompt format (also install it as the chat template with `install_chat_template`).
        field_map: source field names, e.g. `{"output": "answer"}`; defaults cover input/context, output/response.
        max_seq_len: longest example in tokens; pass `resolve_max_seq_len(requested, config.max_position_embeddings)`.
        length_policy: `drop`, `truncate_input` or `truncate` (see `hf_sft.data.masking`).
        skip_bad_records: skip and count invalid records instead of failing.
        val_split: fraction of the records held out for evaluation (deterministic under `seed`); 0 for none.
        eval_data_path: a separate evaluation file (exclusive with `val_split`).
        seed: seed of the held-out split.
        num_proc: processes for validation and tokenisation; `None` or 1 for one.
        cache_dir: `datasets` cache folder; `None` for the default.
        data_weights: mixing weights, one per source of `data_path` (see `hf_sft.data.mixture`).
        dataset_config: configuration of a Hub dataset.
        dataset_split: split of a Hub dataset or a saved `DatasetDict` (default `train`).
        dataset_revision: branch, tag or commit of a Hub dataset.
        streaming: train from one source read and tokenised as it is consumed (`hf_sft.data.stream`).
        data_seed: the seed of a stream's training order (the run's `--data_seed`); `None`: `seed`.

    Returns:
        The splits: `train` a `TokenizedSplit` (a `StreamedSplit` with `streaming`), `eval` a `TokenizedSplit` or
        None; a map-style split's dataset holds only `input_ids`, `attention_mask`, `labels`.

    Raises:
        UsageError: bad input (see `load_records`), bad options, or a split left with no example to train on.
    """
    sources = [data_path] if isinstance(data_path, str | Path) else list(data_path)
    _check_options(sources, length_policy, val_split, eval_data_path, streaming, data_weights)
    fields = resolve_fields(field_map)
    options = {"num_proc": num_proc, "seed": seed}
    hub = {"dataset_config": dataset_config, "dataset_split": dataset_split, "dataset_revision": dataset_revision}
    if streaming:
        if seekable(sources[0]):
            indexed = index_records(sources[0], fields, skip_bad_records)
        else:  # compressed, CSV, JSON arrays, parquet, saved, Hub: loaded as below, read back by row number
            loaded = load_records(sources[0], fields, skip_bad_records, cache_dir, **options, **hub)
            indexed = records_source(loaded, fields)
        train_offsets, held_offsets = split_offsets(indexed.offsets, val_split, seed)
        held_out = None
        if held_offsets is not None:
            held_out = Records(held_out_records(indexed, held_offsets, cache_dir), f"{sources[0]} (held out)")
    else:
        records = load_records(data_path, fields, skip_bad_records, cache_dir, weights=data_weights, **options, **hub)
        records, held_out = _hold_out(records, val_split, seed)
    if eval_data_path:
        held_out = load_records(eval_data_path, fields, skip_bad_records, cache_dir, **options, **hub)

    encoder = Encoder.from_tokenizer(tokenizer)
    options = {"template": template, "max_seq_len": max_seq_len, "length_policy": length_policy, "num_proc": num_proc}
    if streaming:
        stream = StreamingExamples(
            dataclasses.replace(indexed, offsets=train_offsets),
            encoder,
            template,
            max_seq_len,
            length_policy,
            seed=seed if data_seed is None else data_seed,
        )
        train = StreamedSplit(stream, str(sources[0]), len(train_offsets), indexed.skipped, indexed.skipped_messages)
    else:
        train = _tokenize_split(records, "training", encoder, options)
    evaluation = None
    if held_out is not None:
        # A held-out split of a small file can land on records that are all dropped: evaluate nothing, say so.
        evaluation = _tokenize_split(held_out, "evaluation", encoder, options, required=not val_split)
    return SFTData(train, evaluation)


def build_run_datasets(
    data_args: DataArguments,
    tokenizer,
    template: PromptFormat | JinjaFormat,
    *,
    max_seq_len: int | None,
    seed: int,
    data_seed: int | None = None,
    cache_dir: str | Path | None = None,
) -> SFTData:
    """The run's datasets from its `DataArguments`: what `hf-sft train` trains on and `hf-sft data` reports.

    A folder written by `hf-sft data --save_to` is used as saved (after checking that it was tokenised as this run
    would tokenise); else `build_datasets` with the arguments' options. `data_seed` orders a stream (default: `seed`,
    which also draws the held-out split).
    """
    val_split = 0.0 if data_args.eval_data_path else data_args.val_split
    sources = data_args.data_paths()
    if len(sources) == 1 and is_saved_dataset(sources[0]):
        if data_args.streaming:
            raise UsageError(
                f"--data_path {data_args.data_path} is tokenised already and read from disk as needed: "
                "drop --streaming"
            )
        return load_saved(data_args, tokenizer, template, max_seq_len=max_seq_len, val_split=val_split, seed=seed)
    return build_datasets(
        data_args.data_path,
        tokenizer,
        template=template,
        field_map=parse_field_map(data_args.field_map),
        max_seq_len=max_seq_len,
        length_policy=data_args.length_policy,
        skip_bad_records=data_args.skip_bad_records,
        val_split=val_split,
        eval_data_path=data_args.eval_data_path,
        seed=seed,
        num_proc=data_args.num_proc,
        cache_dir=cache_dir,
        data_weights=data_args.data_weights,
        dataset_config=data_args.dataset_config,
        dataset_split=data_args.dataset_split,
        dataset_revision=data_args.dataset_revision,
        streaming=data_args.streaming,
        data_seed=data_seed,
    )


def _check_options(
    sources: list,
    length_policy: str,
    val_split: float,
    eval_data_path: str | Path | None,
    streaming: bool,
    data_weights: Sequence[float] | None,
) -> None:
    if streaming and (len(sources) > 1 or data_weights):
        raise UsageError(
            f"--streaming reads one source; --data_path names {len(sources)} sources: drop --streaming, or "
            "join them into one file"
        )
    check_length_policy(length_policy)
    if val_split and eval_data_path:
        raise UsageError("pass either --val_split or --eval_data_path, not both")
    if not 0.0 <= val_split < 1.0:
        raise UsageError(f"--val_split must be in [0, 1), got {val_split}")


def _hold_out(records: Records, val_split: float, seed: int) -> tuple[Records, Records | None]:
    """The training records and the held-out ones (`Dataset.train_test_split`), or all of them and None."""
    if not val_split:
        return records, None
    try:
        parts = records.dataset.train_test_split(test_size=val_split, seed=seed)
    except ValueError:  # too few records for one on each side
        logger.warning(
            "--val_split %s of %d records leaves no evaluation record: training on all of them, no evaluation",
            val_split,
            len(records.dataset),
        )
        return records, None
    train = Records(parts["train"], records.source, records.skipped, records.skipped_messages)
    return train, Records(parts["test"], f"{records.source} (held out)")


def load_records(
    data: str | Path | Sequence[str | Path],
    fields: Mapping[str, tuple[str, ...]] | None = None,
    skip_bad_records: bool = False,
    cache_dir: str | Path | None = None,
    *,
    weights: Sequence[float] | None = None,
    seed: int = 42,
    num_proc: int | None = None,
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    dataset_revision: str | None = None,
) -> Records:
    """Validate and load the records of a source (or of several, concatenated or mixed).

    Args:
        data: a local `.jsonl`/`.json`/`.csv` file (each optionally `.gz`), a `.parquet` file, a folder of such
            files (shards of one kind), a folder written by `Dataset.save_to_disk`, a Hub dataset id such as
            `databricks/databricks-dolly-15k`; or a list of these (see `hf_sft.data.mixture`).
        fields: from `resolve_fields`; defaults to the standard aliases.
        skip_bad_records: skip invalid records (counted) instead of failing on the first one.
        cache_dir: `datasets` cache folder; `None` for the default.
        weights: mixing weights of several sources (`--data_weights`); None concatenates them.
        seed: seed of the mixing.
        num_proc: processes for the validation maps.
        dataset_config: configuration of a Hub dataset.
        dataset_split: split of a Hub dataset or of a saved `DatasetDict` (default `train`).
        dataset_revision: branch, tag or commit of a Hub dataset.

    Returns:
        The records and the skip counts.

    Raises:
        UsageError: missing path, wrong extension, empty file, a record of no known shape, a bad record (naming
            file, line and reason) unless skipped, or no valid record at all.
    """
    fields = fields or DEFAULT_FIELDS
    hub = {"config": dataset_config, "split": dataset_split, "revision": dataset_revision}
    if not isinstance(data, str | Path):
        one = functools.partial(
            load_records,
            fields=fields,
            skip_bad_records=skip_bad_records,
            cache_dir=cache_dir,
            num_proc=num_proc,
            **{f"dataset_{name}": value for name, value in hub.items()},
        )
        return load_mixture(list(data), weights, seed, one)
    if weights is not None:
        raise UsageError("--data_weights mixes several --data_path sources; one source was given")
    source = resolve_source(data)
    if not source.is_text:
        return arrow_records(source, fields, skip_bad_records, cache_dir, num_proc, hub)
    # JSON lines are parsed by pyarrow and checked vectorised; when that cannot vouch for every record (or for CSV
    # and JSON arrays), they are read and checked one by one, which names every bad record exactly.
    records = parsed_in_arrow(source, fields, cache_dir, num_proc) if source.kind == "jsonl" else None
    return records or load_text_records(source, fields, skip_bad_records, cache_dir)


def tokenize_records(
    records,
    encoder: Encoder,
    template: PromptFormat = DEFAULT_FORMAT,
    max_seq_len: int | None = None,
    length_policy: str = "drop",
    num_proc: int | None = None,
) -> TokenizedSplit:
    """Tokenise and mask a records dataset (batched, cached by `datasets`), then drop and count misfits.

    Args:
        records: a `datasets.Dataset` with columns `index` and `instruction`, `input`, `output`, or `messages`.
        encoder: `Encoder.from_tokenizer(tokenizer)`.
        template: prompt format.
        max_seq_len: longest example in tokens, `None` for no limit.
        length_policy: see `hf_sft.data.masking`.
        num_proc: processes for `map`.

    Returns:
        The kept examples (model columns only) with their record indices, lengths and outcome counts.
    """
    import pyarrow.compute as pc

    tokenized = records.map(
        _tokenized_table,
        batched=True,
        fn_kwargs={
            "encoder": encoder,
            "template": template,
            "max_seq_len": max_seq_len,
            "length_policy": length_policy,
        },
        remove_columns=records.column_names,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        # An explicit fingerprint: hashing a tokenizer object is not stable across processes, this is.
        new_fingerprint=tokenization_fingerprint(records._fingerprint, encoder, template, max_seq_len, length_policy),
        desc="Tokenizing",
    )
    table = tokenized.data  # Arrow, memory-mapped: nothing below holds a Python object per record
    outcome = table.column(STATUS_COLUMN)
    kept_rows = np.flatnonzero(pc.invert(pc.starts_with(outcome, "drop:")).to_numpy())
    lost = table.column(LOST_COLUMN)
    losing = pc.not_equal(lost, "")
    dataset = tokenized.select_columns(list(MODEL_COLUMNS))
    if len(kept_rows) < len(tokenized):
        dataset = dataset.select(kept_rows)
    return TokenizedSplit(
        dataset=dataset,
        index=_int_array(table.column("index"))[kept_rows],
        lengths=_int_array(pc.list_value_length(table.column("input_ids")))[kept_rows],
        status=Counter({item["values"]: item["counts"] for item in pc.value_counts(outcome).to_pylist()}),
        lost_characters="".join(sorted(set("".join(pc.unique(pc.filter(lost, losing)).to_pylist())))),
        records_losing_characters=pc.sum(losing).as_py() or 0,
        supervised_tokens=pc.sum(table.column(_SUPERVISED_COLUMN)).as_py() or 0,
    )


# Columns of the tokenised dataset, with the types `datasets` itself gives them (its int optimisation for
# `input_ids` and `attention_mask`).
_TOKEN_COLUMNS = {"input_ids": np.int32, "attention_mask": np.int8, "labels": np.int64}
_SUPERVISED_COLUMN = "supervised"  # labels that are not -100, per example


def _tokenized_table(batch: dict[str, list], **options):
    """`tokenize_and_mask` of a batch as an Arrow table: the token lists go to Arrow as one flat array each, and
    `datasets` writes the table as it is (without walking every token in Python to infer types)."""
    import pyarrow as pa

    columns = tokenize_and_mask(batch, **options)
    table = {"index": pa.array(batch["index"], pa.int64())}
    flat = {name: _flat(columns[name], dtype) for name, dtype in _TOKEN_COLUMNS.items()}
    for name, (offsets, values) in flat.items():
        table[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    # Counted here, from the flat labels at hand, so that no report reads every label back from the cache file.
    offsets, labels = flat["labels"]
    counted = np.concatenate(([0], np.cumsum(labels != IGNORE_INDEX)))
    table[_SUPERVISED_COLUMN] = pa.array(counted[offsets[1:]] - counted[offsets[:-1]], pa.int64())
    return pa.table(table | {name: pa.array(columns[name], pa.string()) for name in (STATUS_COLUMN, LOST_COLUMN)})


def _flat(rows: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """The offsets and the concatenated values of lists of ints: an Arrow list column's two buffers."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, rows), dtype=np.int32, count=len(rows)), out=offsets[1:])
    return offsets, np.fromiter(chain.from_iterable(rows), dtype=dtype, count=int(offsets[-1]))


def _int_array(column) -> np.ndarray:
    return np.asarray(column.to_numpy(), dtype=np.int64) if len(column) else np.zeros(0, dtype=np.int64)


def tokenization_fingerprint(
    parent: str, encoder: Encoder, template: PromptFormat, max_seq_len: int | None, length_policy: str
) -> str:
    """The `datasets` fingerprint of tokenising the dataset fingerprinted `parent`: stable across processes (hashing
    a tokenizer object is not), and new whenever the tokenizer, the format, the length settings or this code change."""
    digest = hashlib.sha256(parent.encode())
    for part in (encoder.prompt.to_str(), encoder.response.to_str(), encoder.bos_token, str(encoder.eos_token_id)):
        digest.update(part.encode())
    digest.update(repr((template, max_seq_len, length_policy)).encode())
    # A change to the masking code, or to the columns this module writes, must not reuse stale cache files.
    for source in (masking.__file__, formats.__file__, __file__):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:32]


def _tokenize_split(
    records: Records, role: str, encoder: Encoder, options: dict, required: bool = True
) -> TokenizedSplit | None:
    split = tokenize_records(records.dataset, encoder, **options)
    split.source, split.skipped, split.skipped_messages = records.source, records.skipped, records.skipped_messages
    if not len(split.index) and not required:
        logger.warning(
            "no %s example is left in %s (%s): training without evaluation",
            role,
            split.source,
            _dropped_text(split),
        )
        return None
    _check_split(split, role)
    return split


def _dropped_text(split: TokenizedSplit) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in split.dropped.items()) or "no records"


def _check_split(split: TokenizedSplit, role: str) -> None:
    if split.lost_characters:
        logger.warning(
            "%d %s records contain characters the tokenizer cannot represent and silently drops: %s",
            split.records_losing_characters,
            role,
            " ".join(repr(char) for char in split.lost_characters),
        )
    if len(split.index):
        return
    raise UsageError(
        f"no {role} example with a supervised token is left in {split.source} ({_dropped_text(split)}); "
        "raise --max_seq_len or choose another --length_policy"
    )
