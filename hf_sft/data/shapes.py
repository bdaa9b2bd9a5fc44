"""The shapes a record can have, recognised by field name: instruction records and conversations.

An instruction record names its instruction `instruction` or `prompt` (TRL's prompt/completion records), its
optional input `input` or `context`, its answer `output`, `response` or `completion`; a conversation has a
`messages` field. A source whose records have none of these names is of no known shape: its error lists the fields
found and suggests the `--field_map` that would map them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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
