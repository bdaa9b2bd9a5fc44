"""Records that `datasets` holds in Arrow (a Hub dataset, a `save_to_disk` folder, parquet files, JSON lines that
`load_dataset("json")` parsed), loaded and validated without leaving Arrow.

Two checks, the same rules (`hf_sft.data.records.validate_record`):

- `normalise_in_arrow`, vectorised: the columns are picked by name and type from the schema, and each batch is
  checked with pyarrow compute (valid UTF-8 throughout, no null, no blank instruction or output). No Python object
  per record exists; it declines (returns None) whenever it cannot vouch for every record, and the caller then
  validates record by record, which names the bad ones exactly;
- `validate_dataset`, record by record through `Dataset.map`: every bad row is found, counted and named.

Either way the records never leave Arrow for a Python list or a JSONL copy, and `datasets` caches the result like any
other map. Parquet, saved and Hub sources that the vectorised check cannot vouch for are validated row by row
(messages `SOURCE row N: reason`); JSON lines go back to the line-by-line reader (`hf_sft.data.text_records`), whose
messages name the file and line.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_sft.data.line_reader import BadRecord, quiet_datasets, read_json_lines_in_arrow
from hf_sft.data.records import (
    MESSAGES_KEPT,
    Records,
    check_skipped,
    normalised_features,
    unrecognised_shape,
    validate_record,
)
from hf_sft.data.sources import DEFAULT_SPLIT, Source
from hf_sft.errors import UsageError

_CHECK_COLUMNS = ("bad_kind", "bad_message")
_STRING_TYPES = ("string", "large_string")


class NotClean(Exception):
    """A batch the vectorised check cannot vouch for: validate it record by record instead."""


def load_datasets_source(
    name: str,
    cache_dir: str | Path | None,
    *,
    config: str | None = None,
    split: str | None = None,
    revision: str | None = None,
):
    """One split of a Hub dataset id, or the dataset saved in a `save_to_disk` folder.

    Args:
        name: the Hub id or the folder.
        cache_dir: `datasets` cache folder.
        config: the Hub dataset's configuration (`--dataset_config`).
        split: the split (`--dataset_split`; default `train`).
        revision: a branch, tag or commit of the Hub dataset (`--dataset_revision`).

    Raises:
        UsageError: the source cannot be loaded (offline, unknown id, no such split or config), in one line.
    """
    import datasets

    split = split or DEFAULT_SPLIT
    try:
        if Path(name).is_dir():
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UsageError(
                        f"{name} has no split {split!r} (it has {', '.join(loaded)}); see --dataset_split"
                    )
                return loaded[split]
            return loaded
        return datasets.load_dataset(
            name, config, split=split, revision=revision, cache_dir=str(cache_dir) if cache_dir else None
        )
    except UsageError:
        raise
    except Exception as err:  # offline, unknown id, no such split: one line instead of a traceback
        raise UsageError(f"{name} is neither a local file nor a loadable Hub dataset: {err}") from None


def arrow_columns(
    features, fields: Mapping[str, tuple[str, ...]], one_name_each: bool
) -> dict[str, str | None] | None:
    """The source column of each record column when the schema alone settles it, else None.

    Args:
        features: the dataset's `Features`.
        fields: source field names per column (`hf_sft.data.records.resolve_fields`).
        one_name_each: JSON lines, where a missing key and a null are both null in Arrow: then a column may match
            only one of its names (which record has which name is known only record by record).

    Returns:
        `{column: source column}` (`input` may be None: absent everywhere), or None.
    """
    import datasets

    if "messages" in features:
        return None
    chosen: dict[str, str | None] = {}
    for column, names in fields.items():
        present = [name for name in names if name in features]
        if len(present) > 1 and one_name_each:
            return None
        if not present and column == "input":
            chosen[column] = None
            continue
        feature = features[present[0]] if present else None
        allowed = (*_STRING_TYPES, "null") if column == "input" else _STRING_TYPES
        if not isinstance(feature, datasets.Value) or feature.dtype not in allowed:
            return None
        chosen[column] = present[0]
    return chosen


def normalise_in_arrow(dataset, columns: dict[str, str | None], num_proc: int | None = None):
    """Columns `index`, `instruction`, `input`, `output` of a dataset whose every record is valid, or None.

    Args:
        dataset: the source `datasets.Dataset`.
        columns: from `arrow_columns`.
        num_proc: processes for the map.

    Returns:
        The normalised dataset, or None when some record may be invalid (null, blank): validate record by record.
    """
    digest = hashlib.sha256(f"{dataset._fingerprint}|{sorted(columns.items())}".encode())
    digest.update(Path(__file__).read_bytes())
    try:
        checked = dataset.with_format("arrow").map(
            _normalise_batch,
            batched=True,
            with_indices=True,
            fn_kwargs={"columns": columns, "blank": blank_pattern()},
            remove_columns=dataset.column_names,
            features=normalised_features("instruction"),
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            new_fingerprint=digest.hexdigest()[:32],
            desc="Validating",
        )
    except NotClean:
        return None
    return checked.with_format(None)


# The characters `str.isspace()` accepts, which `str.strip()` removes (tests/test_data_sources.py checks the list
# against the running Python).
PY_WHITESPACE = "".join(
    map(
        chr,
        (
            0x9,
            0xA,
            0xB,
            0xC,
            0xD,
            0x1C,
            0x1D,
            0x1E,
            0x1F,
            0x20,
            0x85,
            0xA0,
            0x1680,
            0x2000,
            0x2001,
            0x2002,
            0x2003,
            0x2004,
            0x2005,
            0x2006,
            0x2007,
            0x2008,
            0x2009,
            0x200A,
            0x2028,
            0x2029,
            0x202F,
            0x205F,
            0x3000,
        ),
    )
)


def blank_pattern() -> str:
    """An RE2 pattern matching exactly the strings that Python's `str.strip()` empties."""
    return "^[" + "".join(f"\\x{{{code:x}}}" for code in map(ord, PY_WHITESPACE)) + "]*$"


def _normalise_batch(batch, indices: list[int], columns: dict[str, str | None], blank: str):
    import pyarrow as pa
    import pyarrow.compute as pc

    try:  # pyarrow's JSON reader keeps bytes that are not UTF-8, which the line-by-line reader refuses
        batch.validate(full=True)
    except pa.ArrowInvalid:
        raise NotClean from None
    out = {"index": pa.array(indices, pa.int64())}
    for column, source in columns.items():
        if source is None:
            values = pc.fill_null(pa.nulls(len(indices), pa.string()), "")
        else:
            values = batch.column(source).cast(pa.string())
            if column == "input":
                values = pc.fill_null(values, "")
            elif values.null_count or pc.any(pc.match_substring_regex(values, blank)).as_py():
                raise NotClean
        out[column] = values
    return pa.table(out)


def validate_dataset(dataset, fields: Mapping[str, tuple[str, ...]], shape: str, num_proc: int | None = None):
    """Validate and normalise every row in Arrow.

    Args:
        dataset: the source `datasets.Dataset`.
        fields: source field names per column (`hf_sft.data.records.resolve_fields`).
        shape: `"instruction"` (columns `instruction`, `input`, `output`) or `"messages"`.
        num_proc: processes for the map.

    Returns:
        `(good, skipped, examples)`: the valid rows as columns `index` + the shape's columns, the invalid rows by
        kind, and `(row, message)` of the first few invalid rows.
    """
    import datasets

    features = datasets.Features(
        {**normalised_features(shape), **{name: datasets.Value("string") for name in _CHECK_COLUMNS}}
    )

    def check(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in features}
        for row, index in enumerate(indices):
            obj: dict[str, Any] = {column: values[row] for column, values in batch.items()}
            try:
                record, kind, message = validate_record(obj, fields, shape), "", ""
            except BadRecord as err:
                record, kind, message = _empty(shape), err.kind, str(err)
            out["index"].append(index)
            for column, value in record.items():
                out[column].append(value)
            out["bad_kind"].append(kind)
            out["bad_message"].append(message)
        return out

    checked = dataset.map(
        check,
        with_indices=True,
        batched=True,
        remove_columns=dataset.column_names,
        features=features,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        desc="Validating",
    )
    import pyarrow.compute as pc

    counts = pc.value_counts(checked.data.column("bad_kind")).to_pylist()
    skipped = Counter({item["values"]: item["counts"] for item in counts if item["values"]})
    if not skipped:
        return checked.remove_columns(list(_CHECK_COLUMNS)), skipped, []
    bad_rows = checked.filter(lambda kinds: [kind != "" for kind in kinds], input_columns="bad_kind", batched=True)
    first = bad_rows.select(range(min(MESSAGES_KEPT, len(bad_rows))))
    examples = list(zip(first["index"], first["bad_message"], strict=True))
    good = checked.filter(lambda kinds: [kind == "" for kind in kinds], input_columns="bad_kind", batched=True)
    # A filtered dataset reads through an indices mapping; every later map is faster on a contiguous table.
    return good.flatten_indices().remove_columns(list(_CHECK_COLUMNS)), skipped, examples


def _empty(shape: str) -> dict[str, Any]:
    return {"messages": []} if shape == "messages" else {"instruction": "", "input": "", "output": ""}


def parsed_in_arrow(
    source: Source, fields: Mapping[str, tuple[str, ...]], cache_dir: str | Path | None, num_proc: int | None
) -> Records | None:
    """JSON lines parsed by pyarrow and checked in Arrow; None when the records must be read one by one."""
    with quiet_datasets():  # a check that declines only means "read it line by line": nothing to show
        loaded = read_json_lines_in_arrow(list(source.files), cache_dir)
        if loaded is None:
            return None
        columns = arrow_columns(loaded.features, fields, one_name_each=True)
        dataset = normalise_in_arrow(loaded, columns, num_proc) if columns else None
    return Records(dataset=dataset, source=source.name) if dataset is not None else None


def arrow_records(
    source: Source,
    fields: Mapping[str, tuple[str, ...]],
    skip_bad_records: bool,
    cache_dir: str | Path | None,
    num_proc: int | None,
    hub: dict,
) -> Records:
    """A parquet file or folder, a saved folder or a Hub dataset: checked in Arrow, row by row if need be."""
    import datasets

    if source.kind == "parquet":
        files = [str(path) for path in source.files]
        try:
            dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=_cache(cache_dir))
        except Exception as err:  # a file that is not parquet, or shards whose columns differ
            raise UsageError(f"{source.name}: cannot read the parquet data: {err}") from None
    else:
        dataset = load_datasets_source(source.name, cache_dir, **hub)
    shape = "messages" if "messages" in dataset.column_names else "instruction"
    problem = unrecognised_shape(dataset.column_names, fields)
    if problem:
        raise UsageError(f"{source.name}: {problem}")
    columns = arrow_columns(dataset.features, fields, one_name_each=False) if shape == "instruction" else None
    good = normalise_in_arrow(dataset, columns, num_proc) if columns else None
    if good is not None:
        return Records(dataset=good, source=source.name)
    good, skipped, examples = validate_dataset(dataset, fields, shape, num_proc)
    records = Records(dataset=good, source=source.name, skipped=skipped)
    records.skipped_messages = [f"{_row_location(source, row)}: {message}" for row, message in examples]
    check_skipped(records, len(good), skip_bad_records)
    return records


def _row_location(source: Source, row: int) -> str:
    """`SOURCE row N`; for parquet shards, the shard and the row in it."""
    if len(source.files) > 1:
        import pyarrow.parquet as pq

        for path in source.files:
            rows = pq.ParquetFile(path).metadata.num_rows
            if row < rows:
                return f"{path} row {row}"
            row -= rows
    return f"{source.files[0] if source.files else source.name} row {row}"


def _cache(cache_dir: str | Path | None) -> str | None:
    return str(cache_dir) if cache_dir else None
