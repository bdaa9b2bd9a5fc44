"""Records: strict validation of the source, then a `datasets.Dataset` with fixed columns.

Two shapes: instruction records (columns `instruction`, `input`, `output`) and conversations (`messages`: a list of
`{"role": "system"|"user"|"assistant", "content": ...}` turns with at least one assistant turn). A source holds one
shape; a local file that mixes them is refused at the first record of the other shape.

A local `.jsonl` (one object per line) or `.json` (an array of objects, or JSON lines) file is read record by record
(`hf_sft.data.jsonfile`) and validated here before `datasets` sees it, so that a bad record is reported as
`FILE:LINE: reason` instead of a pyarrow error. The valid records are written, normalised (`index` plus the shape's
columns), to a file in the `datasets` cache (named by a hash of the source, so a rerun reuses it and every later `map`
hits the cache) and loaded with `load_dataset("json", ...)`. `index` is the record's 0-based position in the source
(blank lines are not records). A Hub dataset id or a `save_to_disk` folder stays in Arrow
(`hf_sft.data.arrow_records`) and goes through the same validation.

Field names: `instruction`; `input` or `context`; `output` or `response` (the first one present wins); other fields
are ignored. A mapping such as `{"instruction": "question", "output": "answer"}` replaces the names of those fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_sft.data.jinja_format import ROLES
from hf_sft.data.jsonfile import DATA_EXTENSIONS, BadRecord, read_json_records
from hf_sft.errors import UsageError

RECORD_COLUMNS = ("index", "instruction", "input", "output")
SHAPES = ("instruction", "messages")
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction",),
    "input": ("input", "context"),
    "output": ("output", "response"),
}
# What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in a folder.
DATASETS_FOLDER_MARKERS = ("state.json", "dataset_dict.json")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SKIP_HINT = "pass --skip_bad_records to skip bad records"


@dataclass
class Records:
    """Valid records of one source and what was skipped.

    Attributes:
        dataset: columns `index`, `instruction`, `input`, `output`.
        source: the path or Hub id, for messages.
        skipped: bad records skipped (with `skip_bad_records`), by kind (`invalid_json`, `missing_field`, ...).
        skipped_messages: the first few skip messages (`FILE:LINE: reason`).
    """

    dataset: Any
    source: str
    skipped: Counter = field(default_factory=Counter)
    skipped_messages: list[str] = field(default_factory=list)


def resolve_fields(field_map: Mapping[str, str] | None = None) -> dict[str, tuple[str, ...]]:
    """Source field names per column: the defaults with `field_map` (column -> source name) applied.

    Raises:
        UsageError: `field_map` names a column other than `instruction`, `input`, `output`.
    """
    fields = dict(DEFAULT_FIELDS)
    for column, name in (field_map or {}).items():
        if column not in fields:
            raise UsageError(f"unknown column {column!r} in the field mapping; known: instruction, input, output")
        fields[column] = (name,)
    return fields


def parse_field_map(text: str | None) -> dict[str, str]:
    """Parse `instruction=question,output=answer` into a mapping (the CLI form)."""
    if not text:
        return {}
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[1].strip() for pair in pairs):
        raise UsageError(f"--field_map wants COLUMN=FIELD pairs separated by commas, got {text!r}")
    return {column.strip(): name.strip() for column, name in pairs}


def record_shape(obj: Any) -> str:
    """`"messages"` for an object with a `messages` field, else `"instruction"`."""
    return "messages" if isinstance(obj, dict) and "messages" in obj else "instruction"


def validate_record(obj: Any, fields: Mapping[str, tuple[str, ...]], shape: str = "instruction") -> dict[str, Any]:
    """Check one parsed record and return its normalised columns (`instruction`, `input`, `output`, or `messages`).

    Raises:
        BadRecord: not an object, a missing/non-string/empty instruction or output, a non-string input, or a
            conversation that is not a list of role/content turns with an assistant turn.
    """
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {_json_type(obj)}")
    if shape == "messages":
        return {"messages": _validate_messages(obj.get("messages"))}
    record = {}
    for column, names in fields.items():
        name = next((n for n in names if n in obj), None)
        value = obj[name] if name is not None else None
        label = " or ".join(repr(n) for n in names)
        if column == "input" and value is None:
            value = ""  # the input is optional; null means absent
        elif name is None:
            raise BadRecord("missing_field", f"missing field {label}")
        if not isinstance(value, str):
            raise BadRecord("wrong_type", f"field {name!r} must be a string, got {_json_type(value)}")
        if column != "input" and not value.strip():
            raise BadRecord("empty_field", f"field {name!r} is empty")
        record[column] = value
    return record


def _validate_messages(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise BadRecord("wrong_type", f"field 'messages' must be a non-empty array, got {_json_type(turns)}")
    clean = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise BadRecord("bad_turn", f"messages[{number}] needs a role in {', '.join(ROLES)}")
        if not isinstance(turn.get("content"), str):
            raise BadRecord("wrong_type", f"messages[{number}].content must be a string")
        clean.append({"role": turn["role"], "content": turn["content"]})
    if not any(turn["role"] == "assistant" and turn["content"].strip() for turn in clean):
        raise BadRecord("no_assistant_turn", "no assistant turn with content: nothing to learn")
    return clean


def normalised_features(shape: str):
    """The `datasets.Features` of normalised records of `shape`."""
    import datasets

    if shape == "messages":
        turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
        return datasets.Features({"index": datasets.Value("int64"), "messages": datasets.List(turn)})
    return datasets.Features(
        {"index": datasets.Value("int64"), **{c: datasets.Value("string") for c in RECORD_COLUMNS[1:]}}
    )


def load_records(
    data: str | Path,
    fields: Mapping[str, tuple[str, ...]] | None = None,
    skip_bad_records: bool = False,
    cache_dir: str | Path | None = None,
) -> Records:
    """Validate a local JSON/JSONL file (or a Hub dataset id, or a `save_to_disk` folder) and load its records.

    Args:
        data: path of a `.jsonl`/`.json` file, a Hub dataset id such as `databricks/databricks-dolly-15k`, or a
            folder written by `Dataset.save_to_disk`.
        fields: from `resolve_fields`; defaults to the standard aliases.
        skip_bad_records: skip invalid records (counted) instead of failing on the first one.
        cache_dir: `datasets` cache folder; `None` for the default.

    Returns:
        The records and the skip counts.

    Raises:
        UsageError: missing path, wrong extension, empty file, a bad record (naming file, line and reason) unless
            skipped, or no valid record at all.
    """
    fields = fields or DEFAULT_FIELDS
    path = Path(data)
    if _is_datasets_source(path, str(data)):
        return _arrow_records(str(data), fields, skip_bad_records, cache_dir)
    rows = read_json_records(path)
    records = Records(dataset=None, source=str(data))
    shape = next((record_shape(obj) for _, obj in rows if isinstance(obj, dict)), "instruction")
    good: list[dict[str, Any]] = []
    for index, (line, obj) in enumerate(rows):
        if isinstance(obj, dict) and record_shape(obj) != shape:
            raise UsageError(
                f"{path}:{line}: a {record_shape(obj)} record in a file of {shape} records; "
                "a file holds either instruction records or messages records"
            )
        try:
            if isinstance(obj, BadRecord):
                raise obj
            good.append({"index": index, **validate_record(obj, fields, shape)})
        except BadRecord as err:
            records.skipped[err.kind] += 1
            if len(records.skipped_messages) < 5:
                records.skipped_messages.append(f"{path}:{line}: {err}")
    _check_skipped(records, len(good), skip_bad_records)
    key = hashlib.sha256(path.read_bytes()).hexdigest()
    key = hashlib.sha256(f"{key}|{json.dumps(fields, sort_keys=True)}".encode()).hexdigest()[:24]
    records.dataset = _load_normalised(good, key, cache_dir, shape)
    return records


def _is_datasets_source(path: Path, name: str) -> bool:
    if path.is_dir():
        return any((path / marker).is_file() for marker in DATASETS_FOLDER_MARKERS)
    return not path.exists() and bool(_HUB_ID.match(name)) and path.suffix not in DATA_EXTENSIONS


def _arrow_records(name: str, fields, skip_bad_records: bool, cache_dir) -> Records:
    from hf_sft.data.arrow_records import load_datasets_source, skipped_counts, validate_dataset

    dataset = load_datasets_source(name, cache_dir)
    shape = "messages" if "messages" in dataset.column_names else "instruction"
    good, bad = validate_dataset(dataset, fields, shape)
    records = Records(dataset=good, source=name, skipped=skipped_counts(bad))
    records.skipped_messages = [f"{name} row {row}: {message}" for row, _, message in bad[:5]]
    _check_skipped(records, len(good), skip_bad_records)
    return records


def _check_skipped(records: Records, n_good: int, skip_bad_records: bool) -> None:
    if records.skipped and not skip_bad_records:
        extra = sum(records.skipped.values()) - 1
        more = f" (and {extra} more bad record{'s' if extra > 1 else ''})" if extra else ""
        raise UsageError(f"{records.skipped_messages[0]}{more}; {_SKIP_HINT}")
    if not n_good:
        skipped = sum(records.skipped.values())
        raise UsageError(
            f"no valid record in {records.source}: {skipped} bad record{'s' if skipped != 1 else ''} skipped"
        )


def _load_normalised(records: list[dict[str, Any]], key: str, cache_dir: str | Path | None, shape: str):
    """Write the valid records once under the `datasets` cache and load them with `load_dataset("json")`."""
    import datasets

    root = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    target = root / "hf_sft_records" / f"records-{key}.jsonl"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        with partial.open("w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, target)  # atomic: a concurrent or interrupted run never sees half a file
    features = normalised_features(shape)
    return datasets.load_dataset("json", data_files=str(target), split="train", features=features, cache_dir=str(root))


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)
