"""The one reader of local text files: JSON lines, JSON arrays and CSV, each optionally gzip-compressed.

Every path that reads such a file goes through here: the exact, record-by-record validation
(`hf_sft.data.text_records`), the fast parse of JSON lines into Arrow (`read_json_lines_in_arrow`, used when every
record is valid) and the `--streaming` index and read-back (`hf_sft.data.stream`). This module alone knows the
UTF-8 byte-order mark, what a blank line is, how a line that is not UTF-8 or not JSON is reported, and where a record
starts (its line; for JSON lines also its byte offset).

- JSON lines are parsed one line at a time, as the file streams by, so that one bad line is reported (or skipped) on
  its own and memory does not grow with the file; blank lines are not records.
- A `.json` file may also hold one array of objects, which is parsed as a whole; a syntax error there stops the whole
  file.
- CSV: the first row names the fields; every later row is one record of strings (an empty cell is an empty string,
  so an empty instruction or response is reported as such). A quoted value may span lines: the record's line is the
  one its row starts on. Bytes that are not UTF-8, or a row the CSV reader cannot parse, stop the whole file with the
  line named.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from hf_sft.data.sources import file_kind, open_binary
from hf_sft.errors import UsageError

logger = logging.getLogger(__name__)
BOM = b"\xef\xbb\xbf"
# Dolly-style contexts are long; the csv module's default limit (128 KiB per value) would refuse some.
_FIELD_LIMIT = 1 << 30
# Bytes per parse of `load_dataset("json")`, whose first chunk is also parsed into Python objects (to look for mixed
# types): the default 10 MiB makes that a transient of about 50 MB of objects and several seconds.
JSON_CHUNK = 256 << 10


class BadRecord(Exception):
    """One invalid record: `kind` names the category for the counts, the message says what is wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """`(line number, parsed value or BadRecord)` per record of a JSON lines, JSON or CSV file, as it is read.

    A blank file yields nothing (the caller says it is empty).

    Raises:
        UsageError: an error that stops the whole file (a JSON array's syntax, bytes that are not UTF-8 in an array
            or a CSV file, a CSV row the reader refuses), naming the line.
    """
    if file_kind(path) == "csv":
        yield from iter_csv_records(path)
    else:
        yield from iter_json_records(path)


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

    Raises:
        UsageError: a syntax error or bytes that are not UTF-8 inside a JSON array, or an empty array.
    """
    may_be_array = file_kind(path) == "json"
    with open_binary(path) as stream:
        for number, _, line in _lines(stream):
            if may_be_array and line.lstrip()[:1] == b"[":
                yield from _array_rows(path, line + stream.read(), first_line=number)
                return
            may_be_array = False
            yield number, parse_line(line)


def iter_json_lines(path: Path) -> Iterator[tuple[int, int, Any]]:
    """`(line number, byte offset, parsed value or BadRecord)` per record of a JSON lines file, as it is read.

    The offset is where the record's line starts in the (decompressed) bytes; `read_line_at` reads it back.
    """
    with open_binary(path) as stream:
        for number, offset, line in _lines(stream):
            yield number, offset, parse_line(line)


def read_line_at(handle: IO[bytes], offset: int) -> Any:
    """The record on the line starting at byte `offset` of the open file `handle` (see `iter_json_lines`)."""
    handle.seek(offset)
    line = handle.readline()
    return parse_line(line.removeprefix(BOM) if offset == 0 else line)


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


def object_lines(path: Path) -> int | None:
    """The number of records of a JSON lines file if every non-blank line is shaped as one object, else None.

    A check a fast reader's rows can be held against (pyarrow reads `{..}{..}` on one line as two records, and an
    object broken over two lines as one): its rows are then the file's lines, one each, in order.
    """
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


def read_json_lines_in_arrow(files: list[Path], cache_dir: str | Path | None):
    """JSON lines parsed by pyarrow (`load_dataset("json")`), one row per line; None when that cannot be vouched for.

    None when pyarrow cannot parse a file, or when its rows are not the files' lines one each (the line numbers of
    later messages would not hold): the caller then reads the records one by one with `iter_records`, which says
    exactly what is wrong and where.
    """
    import datasets

    with quiet_datasets():
        try:
            loaded = datasets.load_dataset(
                "json",
                data_files=[str(path) for path in files],
                split="train",
                cache_dir=str(cache_dir) if cache_dir else None,
                chunksize=JSON_CHUNK,
            )
        except Exception:  # anything pyarrow cannot parse: the line-by-line reader says exactly what and where
            logger.debug("%s: not parsed in Arrow, reading record by record", files[0], exc_info=True)
            return None
    lines = [object_lines(path) for path in files]
    return None if None in lines or len(loaded) != sum(lines) else loaded


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bar and no parse-error log: an attempt that fails only means "read it line by line", and the
    user's one line is then the line-by-line reader's message."""
    import datasets

    json_logger = logging.getLogger("datasets.packaged_modules.json.json")
    level, bars = json_logger.level, not datasets.utils.are_progress_bars_disabled()
    json_logger.setLevel(logging.CRITICAL)
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        json_logger.setLevel(level)
        if bars:
            datasets.utils.enable_progress_bars()


def iter_csv_records(path: Path) -> Iterator[tuple[int, Any]]:
    """`(line number, record or BadRecord)` per data row of a CSV file, as it is read; nothing for a blank file.

    Raises:
        UsageError: bytes that are not UTF-8, or a row the CSV reader refuses (naming the line).
    """
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
    with open_binary(path) as stream:
        reader = csv.reader(_text_lines(path, stream))
        start = 1
        try:
            header = next(reader, None)
            while header == []:  # blank lines before the header
                start = reader.line_num + 1
                header = next(reader, None)
            if header is None:
                return
            start = reader.line_num + 1
            for row in reader:
                line, start = start, reader.line_num + 1
                if row:
                    yield line, _csv_record(header, row)
        except csv.Error as err:
            raise UsageError(f"{path}:{start}: cannot read the CSV row: {err}") from None


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """`(line number, byte offset, line)` of the non-blank lines, the byte-order mark removed."""
    offset = 0
    for number, line in enumerate(stream, start=1):
        start, offset = offset, offset + len(line)
        if number == 1 and line.startswith(BOM):
            line = line[len(BOM) :]  # a UTF-8 byte-order mark, as some editors write
        if line.strip():
            yield number, start, line


def _csv_record(header: list[str], row: list[str]) -> dict[str, str] | BadRecord:
    if len(row) > len(header):
        return BadRecord("extra_values", f"{len(row)} values for the {len(header)} columns of the header")
    return dict(zip(header, row, strict=False))  # a short row lacks its last fields


def _text_lines(path: Path, stream: IO[bytes]) -> Iterator[str]:
    for number, line in enumerate(stream, start=1):
        if number == 1 and line.startswith(BOM):
            line = line[len(BOM) :]
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(
                f"{path}:{number}: bytes that are not UTF-8 (byte 0x{line[err.start]:02x}, column {err.start + 1})"
            ) from None


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
