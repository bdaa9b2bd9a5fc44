"""Reading a local `.csv` file (gzip-compressed too) record by record, with the line where each record starts.

The first row names the fields; every later row is one record of strings (an empty cell is an empty string, so an
empty instruction or response is reported as such). A quoted value may span lines: the record's line is the one
its row starts on. Blank lines are not records. Bytes that are not UTF-8, or a row the CSV reader cannot parse,
stop the whole file with the line named.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hf_sft.data.jsonfile import BOM, BadRecord
from hf_sft.errors import UsageError

# Dolly-style contexts are long; the csv module's default limit (128 KiB per value) would refuse some.
_FIELD_LIMIT = 1 << 30


def iter_csv_records(path: Path) -> Iterator[tuple[int, Any]]:
    """`(line number, record or BadRecord)` per data row, as the file is read; nothing for a blank file.

    Raises:
        UsageError: bytes that are not UTF-8, or a row the CSV reader refuses (naming the line).
    """
    from hf_sft.data.sources import open_binary

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
                    yield line, _record(header, row)
        except csv.Error as err:
            raise UsageError(f"{path}:{start}: cannot read the CSV row: {err}") from None


def _record(header: list[str], row: list[str]) -> dict[str, str] | BadRecord:
    if len(row) > len(header):
        return BadRecord("extra_values", f"{len(row)} values for the {len(header)} columns of the header")
    return dict(zip(header, row, strict=False))  # a short row lacks its last fields


def _text_lines(path: Path, stream) -> Iterator[str]:
    for number, line in enumerate(stream, start=1):
        if number == 1 and line.startswith(BOM):
            line = line[len(BOM) :]
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(
                f"{path}:{number}: bytes that are not UTF-8 (byte 0x{line[err.start]:02x}, column {err.start + 1})"
            ) from None
