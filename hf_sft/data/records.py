"""Records: strict validation of a source, then a `datasets.Dataset` with fixed columns, at flat memory.

Two shapes: instruction records (columns `instruction`, `input`, `output`) and conversations (`messages`: a list of
`{"role": "system"|"user"|"assistant", "content": ...}` turns with at least one assistant turn). A source holds one
shape; a local file that mixes them is refused at the first record of the other shape. The shape is recognised by
name from the first record: `messages`, else the field names below; a record with none of them is refused with the
fields it has and the `--field_map` that would map them.

Where the records come from (`hf_sft.data.sources`: files, shard folders, `save_to_disk` folders, Hub ids) decides
how they are checked, never what is accepted:

- a source that `datasets` reads into Arrow (JSON lines, parquet, a Hub dataset, a saved folder) is first checked
  vectorised in Arrow (`hf_sft.data.arrow_records.normalise_in_arrow`): when every record is valid, which is the
  common case, no record ever exists as a Python object;
- otherwise, and for CSV and JSON arrays, records are validated one by one as the source streams by: local text
  files by `hf_sft.data.text_records` (messages `FILE:LINE: reason`, the valid records written to a normalised
  JSONL copy in the `datasets` cache), Arrow sources by `Dataset.map` (messages `SOURCE row N: reason`).

`index` is the record's 0-based position in the source (blank lines are not records; a folder's shards count on
from one file to the next). Several sources are concatenated or mixed by `hf_sft.data.mixture`.

Field names: `instruction` or `prompt`; `input` or `context`; `output`, `response` or `completion` (the first one
present wins); other fields are ignored. A TRL-style `prompt`/`completion` record is thus an instruction record whose
prompt is the instruction text (the prompt format still frames it). A mapping such as
`{"instruction": "question", "output": "answer"}` replaces the names of those fields.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_sft.data.jinja_format import ROLES
from hf_sft.data.jsonfile import BadRecord
from hf_sft.data.shapes import DEFAULT_FIELDS, record_shape
from hf_sft.data.sources import DATASETS_FOLDER_MARKERS, resolve_source
from hf_sft.errors import UsageError

RECORD_COLUMNS = ("index", "instruction", "input", "output")
SHAPES = ("instruction", "messages")
_SKIP_HINT = "pass --skip_bad_records to skip bad records"
__all__ = [
    "DATASETS_FOLDER_MARKERS",
    "DEFAULT_FIELDS",
    "Records",
    "load_records",
    "parse_field_map",
    "record_shape",
    "resolve_fields",
    "validate_record",
]


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
        from hf_sft.data.mixture import load_mixture

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
    from hf_sft.data.arrow_sources import arrow_records, parsed_in_arrow
    from hf_sft.data.text_records import load_text_records

    source = resolve_source(data)
    if not source.is_text:
        return arrow_records(source, fields, skip_bad_records, cache_dir, num_proc, hub)
    # JSON lines are parsed by pyarrow and checked vectorised; when that cannot vouch for every record (or for CSV
    # and JSON arrays), they are read and checked one by one, which names every bad record exactly.
    records = parsed_in_arrow(source, fields, cache_dir, num_proc) if source.kind == "jsonl" else None
    return records or load_text_records(source, fields, skip_bad_records, cache_dir)


def check_skipped(records: Records, n_good: int, skip_bad_records: bool) -> None:
    """Refuse bad records unless skipped (naming the first and counting the rest), and a source with no good one."""
    if records.skipped and not skip_bad_records:
        extra = sum(records.skipped.values()) - 1
        more = f" (and {extra} more bad record{'s' if extra > 1 else ''})" if extra else ""
        raise UsageError(f"{records.skipped_messages[0]}{more}; {_SKIP_HINT}")
    if not n_good:
        skipped = sum(records.skipped.values())
        raise UsageError(
            f"no valid record in {records.source}: {skipped} bad record{'s' if skipped != 1 else ''} skipped"
        )


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
