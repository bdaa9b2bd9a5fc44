"""The one line reader: line numbers and offsets, blank lines, BOM, arrays, CSV, gzip, per-line errors."""

import gzip
import json
import re

import pytest

from hf_sft.data.line_reader import BadRecord, iter_json_lines, iter_records, read_json_records, read_line_at
from hf_sft.errors import UsageError


def test_jsonl_lines_keep_their_numbers_and_bad_lines_become_bad_records(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"a": \n  \n[2]\n{"b": "caf\xe9"}\n')
    rows = read_json_records(path)
    assert [number for number, _ in rows] == [1, 3, 5, 6]  # blank lines are not records
    assert rows[0][1] == {"a": 1} and rows[2][1] == [2]
    assert isinstance(rows[1][1], BadRecord) and rows[1][1].kind == "invalid_json"
    assert isinstance(rows[3][1], BadRecord) and rows[3][1].kind == "invalid_utf8" and "0xe9" in str(rows[3][1])


def test_json_array_records_start_on_their_lines(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"a": 1}, {"b": [1, 2]}, "x"], indent=2))
    rows = read_json_records(path)
    assert [value for _, value in rows] == [{"a": 1}, {"b": [1, 2]}, "x"]
    assert [number for number, _ in rows] == [2, 5, 11]
    path.write_text('{"a": 1}\n{"a": 2}\n')  # a .json file may hold JSON lines too
    assert [value for _, value in read_json_records(path)] == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(
    "text, message",
    [
        ('[\n{"a": 1},\n]', ":3: invalid JSON: Expecting value"),
        ('[\n{"a": 1}\n{"a": 2}]', ":3: invalid JSON: expected ',' or ']'"),
        ('[{"a": 1}]\n[]', ":2: invalid JSON: extra data after the array"),
        ("[]", "is empty (an empty JSON array)"),
    ],
)
def test_json_array_syntax_errors_stop_the_file(tmp_path, text, message):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        read_json_records(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(UsageError, match="data file not found"):
        read_json_records(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="is a folder"):
        read_json_records(tmp_path)
    (tmp_path / "data.txt").write_text('{"a": 1}\n')
    with pytest.raises(UsageError, match="unsupported extension '.txt'"):
        read_json_records(tmp_path / "data.txt")
    (tmp_path / "empty.jsonl").write_bytes(b"\xef\xbb\xbf \n\n")
    with pytest.raises(UsageError, match="is empty"):
        read_json_records(tmp_path / "empty.jsonl")


def test_json_lines_offsets_read_back_the_same_records(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n{"a": \n{"b": "caf\xc3\xa9"}\n')
    rows = list(iter_json_lines(path))
    assert [(number, offset) for number, offset, _ in rows] == [(1, 0), (4, 16), (5, 23)]
    assert [value for _, value in read_json_records(path)][::2] == [value for _, _, value in rows][::2]
    with path.open("rb") as handle:
        assert read_line_at(handle, 0) == {"a": 1}  # the byte-order mark is the reader's to strip
        assert read_line_at(handle, 23) == {"b": "café"}
        assert isinstance(read_line_at(handle, 16), BadRecord)


def test_one_reader_for_every_text_kind(tmp_path):
    (tmp_path / "data.csv").write_bytes(b"\xef\xbb\xbfinstruction,output\nSay hi.,hi\n\nSay yo.,yo,extra\n")
    with gzip.open(tmp_path / "data.jsonl.gz", "wb") as out:
        out.write(b'{"instruction": "Say hi.", "output": "hi"}\n')
    rows = list(iter_records(tmp_path / "data.csv"))
    assert rows[0] == (2, {"instruction": "Say hi.", "output": "hi"})
    assert rows[1][0] == 4 and rows[1][1].kind == "extra_values"
    assert list(iter_records(tmp_path / "data.jsonl.gz")) == [(1, {"instruction": "Say hi.", "output": "hi"})]
