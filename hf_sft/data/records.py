"""One record: its two shapes, its field names, the check of one record, and the account of the bad ones.

Two shapes: instruction records (columns `instruction`, `input`, `output`) and conversations (`messages`: a list of
`{"role": "system"|"user"|"assistant", "content": ...}` turns with at least one assistant turn). A source holds one
shape; a local file that mixes them is refused at the first record of the other shape. The shape is recognised by
name from the first record: `messages`, else the field names below; a record with none of them is refused with the
fields it has and the `--field_map` that would map them.

Field names: `instruction` or `prompt`; `input` or `context`; `output`, `response` or `completion` (the first one
present wins); other fields are ignored. A TRL-style `prompt`/`completion` record is thus an instruction record whose
prompt is the instruction text (the prompt format still frames it). A mapping such as
`{"instruction": "question", "output": "answer"}` replaces the names of those fields.

`RecordChecker` is the one loop over parsed records that every record-by-record reader runs (the normalised copy of
`hf_sft.data.text_records`, the index of `hf_sft.data.stream`): the shape of the first record, the refusal of a
record of the other shape, the check of each record, and the skip counts with the first `MESSAGES_KEPT` messages.
Where the records come from and how each kind of source is checked is `hf_sft.data.pipeline.load_records`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_sft.data.jinja_format import ROLES
from hf_sft.data.line_reader import BadRecord
from hf_sft.errors import UsageError

RECORD_COLUMNS = ("index", "instruction", "input", "output")
MESSAGES_KEPT = 5  # bad-record messages kept for the report
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "prompt"),
    "input": ("input", "context"),
    "output": ("output", "response", "completion"),
}
# Field names other datasets use, for the --field_map suggested when a record's shape is not recognised.
_LIKELY_NAMES = {
    "instruction": ("question", "query", "problem", "task", "inputs", "text"),
    "input": ("passage", "document", "background"),
    "output": ("answer", "answers", "solution", "target", "targets", "reply", "label"),
}
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
        check_text(value, f"field {name!r}")
        if column != "input" and not value.strip():
            raise BadRecord("empty_field", f"field {name!r} is empty")
        record[column] = value
    return record


def check_text(value: str, where: str) -> None:
    """Refuse a string that is not text: a lone surrogate (a JSON `"\\ud800"` escape) has no UTF-8 form, so no
    tokenizer, Arrow column or file can take it.

    Raises:
        BadRecord: `invalid_text`, naming the field and the code point.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        point = ord(value[err.start])
        raise BadRecord("invalid_text", f"{where} holds a lone surrogate U+{point:04X} (not text)") from None


def _validate_messages(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise BadRecord("wrong_type", f"field 'messages' must be a non-empty array, got {_json_type(turns)}")
    clean = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise BadRecord("bad_turn", f"messages[{number}] needs a role in {', '.join(ROLES)}")
        if not isinstance(turn.get("content"), str):
            raise BadRecord("wrong_type", f"messages[{number}].content must be a string")
        check_text(turn["content"], f"messages[{number}].content")
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


def record_shape(obj: Any) -> str:
    """`"messages"` for an object with a `messages` field, else `"instruction"`."""
    return "messages" if isinstance(obj, dict) and "messages" in obj else "instruction"


def unrecognised_shape(names: Sequence[str], fields: Mapping[str, tuple[str, ...]]) -> str | None:
    """Why records with these field names are of no known shape (with the `--field_map` to use), or None.

    A record is recognised when it has a `messages` field, an instruction name or an output name; with neither it is
    not one bad record among good ones but a source of another shape.
    """
    names = list(names)
    if "messages" in names or any(name in names for column in ("instruction", "output") for name in fields[column]):
        return None
    label = " or ".join(repr(n) for n in fields["instruction"])
    return (
        f"missing field {label}; records have fields {', '.join(names) or '(none)'}: "
        f"map them with --field_map {_suggested_map(names)}"
    )


def _suggested_map(names: list[str]) -> str:
    chosen: dict[str, str] = {}
    for column in ("instruction", "output", "input"):
        known = _LIKELY_NAMES[column] if column == "input" else (*DEFAULT_FIELDS[column], *_LIKELY_NAMES[column])
        guess = next((n for n in known if n in names), None)
        if guess and guess not in chosen.values():
            chosen[column] = guess
    unused = iter(n for n in names if n not in chosen.values())
    for column in ("instruction", "output"):  # by order of the record's fields, when no name gives it away
        chosen.setdefault(column, next(unused, "FIELD"))
    return ",".join(f"{column}={chosen[column]}" for column in ("instruction", "input", "output") if column in chosen)


class RecordChecker:
    """Checks parsed records one by one, as a record-by-record reader meets them, and counts the bad ones.

    Args:
        fields: source field names per column (`resolve_fields`).

    Attributes:
        shape: the shape of the first record that is an object (None before it).
        skipped: bad records by kind.
        messages: the first `MESSAGES_KEPT` bad-record messages (`FILE:LINE: reason`).
    """

    def __init__(self, fields: Mapping[str, tuple[str, ...]]):
        self.fields = fields
        self.shape: str | None = None
        self.skipped: Counter = Counter()
        self.messages: list[str] = []

    def check(self, path: str | Path, line: int, obj: Any) -> dict[str, Any] | None:
        """The record's normalised columns, or None for a bad record (counted, its message kept).

        Args:
            path: the file, and `line` where the record starts: messages say `FILE:LINE: reason`.
            line: see `path`.
            obj: the parsed value, or the `BadRecord` of a line that could not be parsed.

        Raises:
            UsageError: a first record of no known shape, or a record of the other shape than the first.
        """
        if isinstance(obj, dict):
            if self.shape is None:
                problem = unrecognised_shape(list(obj), self.fields)
                if problem:
                    raise UsageError(f"{path}:{line}: {problem}")
                self.shape = record_shape(obj)
            elif record_shape(obj) != self.shape:
                raise UsageError(
                    f"{path}:{line}: a {record_shape(obj)} record in a file of {self.shape} records; "
                    "a file holds either instruction records or messages records"
                )
        try:
            if isinstance(obj, BadRecord):
                raise obj
            return validate_record(obj, self.fields, self.shape or "instruction")
        except BadRecord as err:
            self.skipped[err.kind] += 1
            if len(self.messages) < MESSAGES_KEPT:
                self.messages.append(f"{path}:{line}: {err}")
            return None


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
