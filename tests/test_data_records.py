"""Record loading: strict validation with FILE:LINE messages (exit 2, no traceback), skipping, aliases, formats."""

import json
from pathlib import Path

import pytest

from hf_sft.cli import main
from hf_sft.data import load_records, parse_field_map, resolve_fields
from hf_sft.errors import UsageError

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = str(FIXTURES / "tiny_bpe.json")
GOOD = b'{"instruction": "Name a fish.", "output": "Tope"}'

BAD_LINES = {
    "invalid_json": (b'{"instruction": "x", "output": ', "invalid JSON"),
    "not_an_object": (b'["Name a fish.", "Tope"]', "expected a JSON object, got an array"),
    "missing_instruction": (b'{"output": "Tope"}', "missing field 'instruction'"),
    "missing_response": (b'{"instruction": "x", "category": "qa"}', "missing field 'output' or 'response'"),
    "non_string_response": (b'{"instruction": "x", "response": 5}', "field 'response' must be a string, got a number"),
    "non_string_input": (b'{"instruction": "x", "context": ["a"], "output": "y"}', "'context' must be a string"),
    "null_instruction": (b'{"instruction": null, "output": "y"}', "'instruction' must be a string, got null"),
    "empty_instruction": (b'{"instruction": "  ", "output": "y"}', "field 'instruction' is empty"),
    "empty_response": (b'{"instruction": "x", "response": ""}', "field 'response' is empty"),
    "not_utf8": (b'{"instruction": "caf\xe9", "output": "y"}', "not UTF-8 (byte 0xe9"),
    # JSON escapes of half a surrogate pair: valid JSON, no text (no UTF-8 form)
    "lone_surrogate": (b'{"instruction": "x \\ud800", "output": "y"}', "'instruction' holds a lone surrogate U+D800"),
    "lone_low_surrogate": (b'{"instruction": "x", "output": "\\udc80"}', "'output' holds a lone surrogate U+DC80"),
}


def run_data(capsys, path: Path, *extra: str) -> tuple[int, str, str]:
    argv = ["data", "--data_path", str(path), "--tokenizer_path", TOKENIZER, "--cache_dir", str(path.parent / "c")]
    argv += ["--val_split", "0"]
    status = main([*argv, *extra])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_record_names_file_line_and_reason(tmp_path, capsys, case):
    line, reason = BAD_LINES[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([GOOD, GOOD, line, GOOD]) + b"\n")
    status, out, err = run_data(capsys, path)
    assert status == 2
    assert err.startswith(f"error: {path}:3: ") and reason in err, err
    assert "--skip_bad_records" in err and "Traceback" not in err + out and err.count("\n") == 1


@pytest.mark.parametrize("case", ["invalid_json", "missing_response", "not_utf8", "lone_surrogate"])
def test_skip_bad_records_reports_how_many(tmp_path, capsys, case):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([GOOD, BAD_LINES[case][0], GOOD]) + b"\n")
    status, out, err = run_data(capsys, path, "--skip_bad_records", "--dump", str(tmp_path / "dump.jsonl"))
    assert status == 0, err
    assert "skipped 1 bad record:" in out and f"{path}:2:" in out
    assert "records: 3 read, 1 bad record skipped" in out and "examples: 2 kept, 0 dropped" in out
    dumped = [json.loads(line) for line in (tmp_path / "dump.jsonl").read_text().splitlines()]
    assert [row["index"] for row in dumped] == [0, 2]  # positions in the file, the bad record included


def test_several_bad_records_are_counted_in_the_message(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([GOOD, b"{", b"[]", b"{}", GOOD]))
    status, _, err = run_data(capsys, path)
    assert status == 2 and f"{path}:2: invalid JSON" in err and "(and 2 more bad records)" in err


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("missing.jsonl", None, "data file not found"),
        ("empty.jsonl", b"", "is empty"),
        ("blank.jsonl", b"\n  \n", "is empty"),
        ("empty_array.json", b" [ ] ", "is empty"),
        ("data.txt", b"instruction,output\nx,y\n", "unsupported extension '.txt'; use .jsonl, .jsonl.gz, .json"),
        ("noext", GOOD, "unsupported extension '(none)'"),
    ],
)
def test_file_level_errors(tmp_path, capsys, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    status, out, err = run_data(capsys, path)
    assert status == 2 and str(path) in err and reason in err and "Traceback" not in err + out


def test_all_records_bad_even_when_skipping(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"{\n[]\n")
    status, _, err = run_data(capsys, path, "--skip_bad_records")
    assert status == 2 and "no valid record" in err and "2 bad records skipped" in err


def test_json_array_errors_name_the_line(tmp_path, capsys):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    status, _, err = run_data(capsys, path)
    assert status == 2 and f"{path}:3: invalid JSON" in err
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]\n')
    status, _, err = run_data(capsys, path)
    assert status == 2 and f"{path}:3: missing field 'output' or 'response'" in err


def test_aliases_extra_fields_and_index(tmp_path):
    records = load_records(FIXTURES / "tiny_sft.jsonl", cache_dir=tmp_path)
    rows = records.dataset.to_list()
    assert records.dataset.column_names == ["index", "instruction", "input", "output"]
    assert [row["index"] for row in rows] == list(range(6))
    assert rows[1] == {"index": 1, "instruction": "Which is a fish?", "input": "Tope or Rope", "output": "Tope"}
    assert rows[3]["input"] == "" and rows[4]["input"] == "" and rows[5]["input"] == "  "  # absent, null, blank


def test_field_map(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Why?", "answer": "Because.", "instruction": "ignored"}) + "\n")
    fields = resolve_fields(parse_field_map("instruction=question,output=answer"))
    rows = load_records(path, fields, cache_dir=tmp_path).dataset.to_list()
    assert rows == [{"index": 0, "instruction": "Why?", "input": "", "output": "Because."}]
    with pytest.raises(UsageError, match="tiny_sft.jsonl:1: missing field 'question'"):
        load_records(FIXTURES / "tiny_sft.jsonl", fields, cache_dir=tmp_path)
    with pytest.raises(UsageError, match="unknown column 'prompt'"):
        resolve_fields({"prompt": "x"})
    with pytest.raises(UsageError, match="COLUMN=FIELD"):
        parse_field_map("instruction")


def test_normalised_copy_is_reused(tmp_path):
    first = load_records(FIXTURES / "tiny_sft.jsonl", cache_dir=tmp_path)
    second = load_records(FIXTURES / "tiny_sft.jsonl", cache_dir=tmp_path)
    assert first.dataset._fingerprint == second.dataset._fingerprint
    assert len(list((tmp_path / "hf_sft_records").glob("*.jsonl"))) == 1


def test_a_jsonl_file_starting_with_an_array_is_still_json_lines(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([BAD_LINES["not_an_object"][0], GOOD]))
    status, _, err = run_data(capsys, path)
    assert status == 2 and f"{path}:1: expected a JSON object, got an array" in err


def test_hub_dataset_goes_through_the_same_validation(tmp_path, monkeypatch):
    import datasets

    real_load_dataset = datasets.load_dataset
    rows = [
        {"instruction": "Name a fish.", "context": "", "response": "Tope", "category": "qa"},
        {"instruction": "", "context": "", "response": "x", "category": "qa"},
    ]

    def fake_load_dataset(name, *args, **kwargs):
        if name == "someone/dolly":
            return datasets.Dataset.from_list(rows)
        return real_load_dataset(name, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(UsageError, match="someone/dolly row 1: field 'instruction' is empty"):
        load_records("someone/dolly", cache_dir=tmp_path)
    records = load_records("someone/dolly", skip_bad_records=True, cache_dir=tmp_path)
    assert records.dataset.to_list() == [{"index": 0, "instruction": "Name a fish.", "input": "", "output": "Tope"}]
    assert records.skipped == {"empty_field": 1}


def test_unreachable_hub_id_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="neither a local file nor a loadable Hub dataset"):
        load_records("nobody-here/no-such-dataset", cache_dir=tmp_path)


def test_a_saved_datasets_object_stays_in_arrow(tmp_path):
    """A `save_to_disk` folder (as a Hub download is) is validated and mapped in Arrow: no JSONL copy is written."""
    import datasets

    rows = [
        {"instruction": "Name a fish.", "context": "", "response": "Tope", "category": "qa"},
        {"instruction": "Pick one.", "context": "Tope or Rope", "response": "Tope", "category": "qa"},
        {"instruction": "  ", "context": "", "response": "x", "category": "qa"},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "dolly"))
    with pytest.raises(UsageError, match=r"dolly row 2: field 'instruction' is empty; pass --skip_bad_records"):
        load_records(tmp_path / "dolly", cache_dir=tmp_path / "cache")
    records = load_records(tmp_path / "dolly", skip_bad_records=True, cache_dir=tmp_path / "cache")
    assert records.dataset.to_list() == [
        {"index": 0, "instruction": "Name a fish.", "input": "", "output": "Tope"},
        {"index": 1, "instruction": "Pick one.", "input": "Tope or Rope", "output": "Tope"},
    ]
    assert records.skipped == {"empty_field": 1}
    assert not (tmp_path / "cache" / "hf_sft_records").exists()  # no JSONL round trip
    assert all(Path(f["filename"]).is_relative_to(tmp_path / "dolly") for f in records.dataset.cache_files)


def test_messages_records_local_and_in_arrow(tmp_path):
    import datasets

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "name": "bot"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": t, "id": i}) for i, t in enumerate([turns, turns[:1]])) + "\n")
    with pytest.raises(UsageError, match="chat.jsonl:2: no assistant turn with content"):
        load_records(path, cache_dir=tmp_path / "cache")
    local = load_records(path, skip_bad_records=True, cache_dir=tmp_path / "cache").dataset
    expected = [
        {"index": 0, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    ]
    assert local.column_names == ["index", "messages"] and local.to_list() == expected
    datasets.Dataset.from_list([{"messages": turns}]).save_to_disk(str(tmp_path / "chat"))
    assert load_records(tmp_path / "chat", cache_dir=tmp_path / "cache").dataset.to_list() == expected


def test_a_file_mixing_shapes_is_refused_at_the_line(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    chat = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    path.write_text("\n".join([GOOD.decode(), GOOD.decode(), chat]) + "\n")
    status, _, err = run_data(capsys, path, "--skip_bad_records")  # not a bad record to skip: the file is wrong
    assert status == 2 and f"{path}:3: a messages record in a file of instruction records" in err


def _damage_cut_at_a_line(copy: Path) -> None:
    lines = copy.read_bytes().splitlines(keepends=True)
    copy.write_bytes(b"".join(lines[: len(lines) // 4]))


def _damage_mid_line(copy: Path) -> None:
    data = bytearray(copy.read_bytes())
    middle = data.index(b'"output"', len(data) // 2)
    data[middle : middle + 8] = b"\x00{]}\xff:,x"  # the same size: only the content tells
    copy.write_bytes(bytes(data))


def _damage_summary(copy: Path) -> None:
    copy.with_suffix(".summary.json").write_text('{"shape": "instruction", "good": ')


@pytest.mark.parametrize(
    "damage", [_damage_cut_at_a_line, _damage_mid_line, _damage_summary], ids=["cut_at_a_line", "mid_line", "summary"]
)
def test_a_records_cache_that_does_not_verify_is_rebuilt_from_the_source(tmp_path, capsys, caplog, damage):
    """A normalised copy cut at a line boundary was used as it was ("50 read" of 198), one damaged mid-line failed
    with a raw JSONDecodeError: the copy carries its size and sha256 and is rebuilt when it does not verify."""
    path = tmp_path / "data.csv"
    rows = [f'"Name fish number {i}.","","Fish {i}, a ""tope""."' for i in range(40)]
    path.write_text("instruction,input,output\n" + "\n".join(rows) + "\n")
    status, first, err = run_data(capsys, path)
    assert status == 0, err
    assert "records: 40 read" in first
    (copy,) = (tmp_path / "c" / "hf_sft_records").glob("*.jsonl")
    whole = copy.read_bytes()
    damage(copy)
    status, again, err = run_data(capsys, path)
    assert status == 0 and "Traceback" not in err, err
    assert again == first
    assert copy.read_bytes() == whole
    assert f"the records cache {copy} does not verify" in caplog.text


@pytest.mark.parametrize("skip", [False, True])
def test_a_lone_surrogate_under_streaming_never_reaches_training(tmp_path, capsys, skip):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([GOOD, BAD_LINES["lone_surrogate"][0], GOOD, GOOD]) + b"\n")
    out = tmp_path / "out"
    argv = ["train", "--data_path", str(path), "--tokenizer_path", TOKENIZER, "--streaming", "--device", "cpu"]
    argv += ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "64", "--val_split", "0"]
    argv += ["--max_iters", "1", "--batch_size", "2", "--gradient_accumulation_steps", "1", "--out_dir", str(out)]
    status = main([*argv, *(["--skip_bad_records"] if skip else [])])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if skip:
        assert status == 0 and (out / "model.safetensors").is_file()
    else:
        assert status == 2 and err.strip().splitlines()[-1].startswith(f"error: {path}:2: field 'instruction' holds")
        assert not out.exists()


def test_export_check_data_leaves_a_bad_record_out_with_a_note(tmp_path):
    from hf_sft.export.gguf_check import records_for_check

    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([GOOD, BAD_LINES["lone_surrogate"][0], GOOD]) + b"\n")
    records, note = records_for_check(path)
    assert len(records) == 2 and records[0]["instruction"] == "Name a fish."
    assert note.startswith(f"--check_data {path}: 1 bad record left out of the check (first: {path}:2: field")
    assert "--skip_bad_records" not in note  # export takes no such flag
    path.write_bytes(GOOD + b"\n")
    assert records_for_check(path) == ([{"instruction": "Name a fish.", "input": "", "output": "Tope"}], None)
