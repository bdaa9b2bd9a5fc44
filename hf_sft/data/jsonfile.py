"""Reading a local `.jsonl`/`.json` file (gzip-compressed too) record by record, with the line number of each record.

JSON lines are parsed one line at a time, as the file streams by, so that one bad line is reported (or skipped) on
its own and memory does not grow with the file; blank lines are not records. A `.json` file may also hold one array
of objects, which is parsed as a whole; a syntax error there stops the whole file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hf_sft.errors import UsageError

DATA_EXTENSIONS = (".jsonl", ".json")
BOM = b"\xef\xbb\xbf"


class BadRecord(Exception):
    """One invalid record: `kind` names the category for the counts, the message says what is wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_json_records(path: Path) -> list[tuple[int, Any]]:
    """Parse every record of a local `.jsonl`/`.json` file, keeping the line where it starts.

    Args:
        path: the file.

    Returns:
        `(line number, parsed value)` per record, where the value is a `BadRecord` for a line that is not UTF-8 or
        not valid JSON (so the caller can report or skip it like any other invalid record).

    Raises:
        UsageError: missing path, a folder, wrong extension, empty file, or a syntax error inside a JSON array.
    """
    from hf_sft.data.sources import file_kind

    if not path.exists():
        raise UsageError(f"data file not found: {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder; pass a .jsonl or .json file")
    if file_kind(path) not in ("jsonl", "json"):
        raise UsageError(f"{path}: unsupported extension {path.suffix or '(none)'!r}; use .jsonl or .json")
    rows = list(iter_json_records(path))
    if not rows:
        raise UsageError(f"{path} is empty")
    return rows


def iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """`(line number, parsed value or BadRecord)` per record of a JSON lines file or a JSON array, as it is read.

    A blank file yields nothing (the caller says it is empty).

    Raises:
        UsageError: a syntax error or bytes that are not UTF-8 inside a JSON array, or an empty array.
    """
    from hf_sft.data.sources import file_kind, open_binary

    may_be_array = file_kind(path) == "json"
    with open_binary(path) as stream:
        for number, line in enumerate(stream, start=1):
            if number == 1 and line.startswith(BOM):
                line = line[len(BOM) :]  # a UTF-8 byte-order mark, as some editors write
            if not line.strip():
                continue
            if may_be_array and line.lstrip()[:1] == b"[":
                yield from _array_rows(path, line + stream.read(), first_line=number)
                return
            may_be_array = False
            yield number, parse_line(line)


def object_lines(path: Path) -> int | None:
    """The number of records of a JSON lines file if every non-blank line is shaped as one object, else None.

    A check a fast reader's rows can be held against (pyarrow reads `{..}{..}` on one line as two records, and an
    object broken over two lines as one): its rows are then the file's lines, one each, in order.
    """
    from hf_sft.data.sources import open_binary

    count, rest, first = 0, b"", True
    with open_binary(path) as stream:
        while chunk := stream.read(1 << 20):
            if first:
                chunk, first = chunk.removeprefix(BOM), False
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            shaped = [line for line in map(bytes.strip, lines) if line]
            if not all(line[:1] == b"{" and line[-1:] == b"}" for line in shaped):
                return None
            count += len(shaped)
    rest = rest.strip()
    if rest and not (rest[:1] == b"{" and rest[-1:] == b"}"):
        return None
    return count + bool(rest)


def parse_line(line: bytes) -> Any:
    """One JSON line: the parsed value, or a `BadRecord` for bytes that are not UTF-8 or not JSON."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRecord(
            "invalid_utf8", f"bytes that are not UTF-8 (byte 0x{line[err.start]:02x}, column {err.start + 1})"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return BadRecord("invalid_json", f"invalid JSON: {err.msg} (column {err.colno})")


def _array_rows(path: Path, raw: bytes, first_line: int) -> Iterator[tuple[int, Any]]:
    """Records of a JSON array, with the line where each starts; a syntax error stops the whole file."""
    offset = first_line - 1
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = offset + raw.count(b"\n", 0, err.start) + 1
        raise UsageError(f"{path}:{line}: bytes that are not UTF-8 (byte 0x{raw[err.start]:02x})") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    counted, line = 0, offset + 1  # lines are counted as the parse moves on: linear in the file's size
    found = False
    try:
        while True:
            pos = _skip_space(text, pos)
            if text.startswith("]", pos) and not found:
                break
            obj, end = decoder.raw_decode(text, pos)
            line += text.count("\n", counted, pos)
            counted = pos
            found = True
            yield line, obj
            pos = _skip_space(text, end)
            if text.startswith("]", pos):
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
            pos += 1
        if _skip_space(text, pos + 1) != len(text):
            raise json.JSONDecodeError("extra data after the array", text, _skip_space(text, pos + 1))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}:{offset + err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not found:
        raise UsageError(f"{path} is empty (an empty JSON array)")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos
