"""From a data source to the datasets `Trainer` gets: records -> split -> tokenise and mask -> drop and count."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from hf_sft.data import lengths, masking
from hf_sft.data import template as formats
from hf_sft.data.lengths import check_length_policy
from hf_sft.data.masking import LOST_COLUMN, MODEL_COLUMNS, STATUS_COLUMN, Encoder, tokenize_and_mask
from hf_sft.data.records import Records, load_records, resolve_fields
from hf_sft.data.template import DEFAULT_FORMAT, PromptFormat
from hf_sft.errors import UsageError

logger = logging.getLogger(__name__)


@dataclass
class TokenizedSplit:
    """One split, ready for `Trainer`, with its bookkeeping.

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
    """

    dataset: Any
    index: np.ndarray
    lengths: np.ndarray
    status: Counter
    skipped: Counter = field(default_factory=Counter)
    skipped_messages: list[str] = field(default_factory=list)
    source: str = ""
    lost_characters: str = ""
    records_losing_characters: int = 0

    @property
    def dropped(self) -> dict[str, int]:
        """Dropped examples by reason (`too_long`, `too_long_without_input`, `no_supervised_tokens`)."""
        return {key.removeprefix("drop:"): n for key, n in sorted(self.status.items()) if key.startswith("drop:")}


@dataclass
class SFTData:
    """The training split and the optional evaluation split."""

    train: TokenizedSplit
    eval: TokenizedSplit | None = None


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
) -> SFTData:
    """Validate, load, split, tokenise and mask: the datasets for `Trainer`.

    Args:
        data_path: a source (`hf_sft.data.sources`: a `.jsonl`/`.json`/`.csv`/`.parquet` file, a folder of shards,
            a `save_to_disk` folder, a Hub dataset id), or a list of sources (concatenated, or mixed by
            `data_weights`).
        tokenizer: the model's `PreTrainedTokenizerFast` (BOS/EOS set).
        template: prompt format (also install it as the chat template with `install_chat_template`).
        field_map: source field names, e.g. `{"output": "answer"}`; defaults cover input/context, output/response.
        max_seq_len: longest example in tokens; pass `resolve_max_seq_len(requested, config.max_position_embeddings)`.
        length_policy: `drop`, `truncate_input` or `truncate` (see `hf_sft.data.lengths`).
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

    Returns:
        The splits; `train.dataset` and `eval.dataset` hold only `input_ids`, `attention_mask`, `labels`.

    Raises:
        UsageError: bad input (see `load_records`), bad options, or a split left with no example to train on.
    """
    check_length_policy(length_policy)
    if val_split and eval_data_path:
        raise UsageError("pass either --val_split or --eval_data_path, not both")
    if not 0.0 <= val_split < 1.0:
        raise UsageError(f"--val_split must be in [0, 1), got {val_split}")
    fields = resolve_fields(field_map)
    options = {"num_proc": num_proc, "seed": seed}
    hub = {"dataset_config": dataset_config, "dataset_split": dataset_split, "dataset_revision": dataset_revision}
    records = load_records(data_path, fields, skip_bad_records, cache_dir, weights=data_weights, **options, **hub)
    held_out = None
    if val_split:
        try:
            parts = records.dataset.train_test_split(test_size=val_split, seed=seed)
        except ValueError:  # too few records for one on each side
            logger.warning(
                "--val_split %s of %d records leaves no evaluation record: training on all of them, no evaluation",
                val_split,
                len(records.dataset),
            )
        else:
            records = Records(parts["train"], records.source, records.skipped, records.skipped_messages)
            held_out = Records(parts["test"], f"{records.source} (held out)")
    elif eval_data_path:
        held_out = load_records(eval_data_path, fields, skip_bad_records, cache_dir, **options, **hub)

    encoder = Encoder.from_tokenizer(tokenizer)
    options = {"template": template, "max_seq_len": max_seq_len, "length_policy": length_policy, "num_proc": num_proc}
    train = _tokenize_split(records, "training", encoder, options)
    evaluation = None
    if held_out is not None:
        # A held-out split of a small file can land on records that are all dropped: evaluate nothing, say so.
        evaluation = _tokenize_split(held_out, "evaluation", encoder, options, required=not val_split)
    return SFTData(train, evaluation)


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
        length_policy: see `hf_sft.data.lengths`.
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
        new_fingerprint=_fingerprint(records._fingerprint, encoder, template, max_seq_len, length_policy),
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
    )


# Columns of the tokenised dataset, with the types `datasets` itself gives them (its int optimisation for
# `input_ids` and `attention_mask`).
_TOKEN_COLUMNS = {"input_ids": np.int32, "attention_mask": np.int8, "labels": np.int64}


def _tokenized_table(batch: dict[str, list], **options):
    """`tokenize_and_mask` of a batch as an Arrow table: the token lists go to Arrow as one flat array each, and
    `datasets` writes the table as it is (without walking every token in Python to infer types)."""
    import pyarrow as pa

    columns = tokenize_and_mask(batch, **options)
    table = {"index": pa.array(batch["index"], pa.int64())}
    for name, dtype in _TOKEN_COLUMNS.items():
        table[name] = _list_array(columns[name], dtype)
    return pa.table(table | {name: pa.array(columns[name], pa.string()) for name in (STATUS_COLUMN, LOST_COLUMN)})


def _list_array(rows: list[list[int]], dtype):
    import pyarrow as pa

    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, rows), dtype=np.int32, count=len(rows)), out=offsets[1:])
    values = np.fromiter(chain.from_iterable(rows), dtype=dtype, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _int_array(column) -> np.ndarray:
    return np.asarray(column.to_numpy(), dtype=np.int64) if len(column) else np.zeros(0, dtype=np.int64)


def _fingerprint(parent: str, encoder: Encoder, template: PromptFormat, max_seq_len, length_policy: str) -> str:
    digest = hashlib.sha256(parent.encode())
    for part in (encoder.prompt.to_str(), encoder.response.to_str(), encoder.bos_token, str(encoder.eos_token_id)):
        digest.update(part.encode())
    digest.update(repr((template, max_seq_len, length_policy)).encode())
    for module in (masking, lengths, formats):  # a change to the masking code must not reuse stale cache files
        digest.update(Path(module.__file__).read_bytes())
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
