"""Records of a `datasets` object (a Hub dataset id, or a folder written by `save_to_disk`), validated in Arrow.

The rows are checked by the same `validate_record` as local files, but through `Dataset.map(with_indices=True)` and
`Dataset.filter`, so they never leave Arrow for a Python list or a JSONL copy, and `datasets` caches the result
like any other map. A bad row is reported as `SOURCE row N: reason`, N being its 0-based position.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_sft.data.jsonfile import BadRecord
from hf_sft.errors import UsageError

_CHECK_COLUMNS = ("bad_kind", "bad_message")


def load_datasets_source(name: str, cache_dir: str | Path | None):
    """The `train` split of a Hub dataset id, or the dataset saved in a `save_to_disk` folder.

    Raises:
        UsageError: the source cannot be loaded (offline, unknown id, no train split), in one line.
    """
    import datasets

    try:
        if Path(name).is_dir():
            loaded = datasets.load_from_disk(name)
            return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(name, split="train", cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # offline, unknown id, no train split: one line instead of a traceback
        raise UsageError(f"{name} is neither a local file nor a loadable Hub dataset: {err}") from None


def validate_dataset(dataset, fields: Mapping[str, tuple[str, ...]], shape: str, num_proc: int | None = None):
    """Validate and normalise every row in Arrow.

    Args:
        dataset: the source `datasets.Dataset`.
        fields: source field names per column (`hf_sft.data.records.resolve_fields`).
        shape: `"instruction"` (columns `instruction`, `input`, `output`) or `"messages"`.
        num_proc: processes for the map.

    Returns:
        `(good, bad)`: the valid rows as columns `index` + the shape's columns, and `(row, kind, message)` of each
        invalid row.
    """
    import datasets

    from hf_sft.data.records import normalised_features, validate_record

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

    if not pc.any(pc.not_equal(checked.data.column("bad_kind"), "")).as_py():
        return checked.remove_columns(list(_CHECK_COLUMNS)), []
    bad_rows = checked.filter(lambda kinds: [kind != "" for kind in kinds], input_columns="bad_kind", batched=True)
    bad = list(zip(bad_rows["index"], bad_rows["bad_kind"], bad_rows["bad_message"], strict=True))
    good = checked.filter(lambda kinds: [kind == "" for kind in kinds], input_columns="bad_kind", batched=True)
    # A filtered dataset reads through an indices mapping; every later map is faster on a contiguous table.
    return good.flatten_indices().remove_columns(list(_CHECK_COLUMNS)), bad


def skipped_counts(bad: list[tuple[int, str, str]]) -> Counter:
    """Bad rows by kind."""
    return Counter(kind for _, kind, _ in bad)


def _empty(shape: str) -> dict[str, Any]:
    return {"messages": []} if shape == "messages" else {"instruction": "", "input": "", "output": ""}
