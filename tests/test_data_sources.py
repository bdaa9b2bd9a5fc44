"""Input kinds and mixtures: each kind loads what its JSONL twin loads, errors keep file and line, weights hold."""

import gzip
import json
import random
import shutil
from pathlib import Path

import pytest

from hf_sft.cli import main
from hf_sft.data import load_records, resolve_fields
from hf_sft.data.sources import fingerprint_changes, resolve_source, source_fingerprint
from hf_sft.data.text_records import load_text_records
from hf_sft.errors import UsageError

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = str(FIXTURES / "tiny_bpe.json")
# Characters that make validation interesting: Python's str.strip() removes the odd ones too.
ODD = [" ", "\t", "\u00a0", "\u2003", "\u3000", "\x1c", "é", "中", "\\", '"', ",", "\n"]


def dolly_rows(n: int, seed: int = 0) -> list[dict]:
    """Dolly-shaped records with random texts (some with an empty context), all valid."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "w" + "".join(rng.choice([*ODD, "a", "b", "c", "d"]) for _ in range(k)) + "z"

    return [
        {"instruction": text(rng.randint(1, 20)), "context": text(8) if i % 3 else "", "response": text(12)}
        | {"category": rng.choice(["qa", "summary"])}
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def loaded(path, tmp_path: Path, **kwargs) -> list[dict]:
    return load_records(path, cache_dir=tmp_path / "cache", **kwargs).dataset.to_list()


@pytest.fixture
def twin(tmp_path) -> tuple[Path, list[dict]]:
    rows = dolly_rows(40)
    return write_jsonl(tmp_path / "dolly.jsonl", rows), rows


def test_every_input_kind_loads_the_same_examples_as_its_jsonl_twin(tmp_path, twin):
    import datasets
    import pandas as pd

    jsonl, rows = twin
    expected = loaded(jsonl, tmp_path)
    assert len(expected) == 40 and [r["index"] for r in expected] == list(range(40))
    frame = pd.DataFrame(rows)
    gz = tmp_path / "dolly.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    array = tmp_path / "dolly.json"
    array.write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
    frame.to_csv(tmp_path / "dolly.csv", index=False)
    csv_gz = tmp_path / "dolly.csv.gz"
    csv_gz.write_bytes(gzip.compress((tmp_path / "dolly.csv").read_bytes()))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "dolly.parquet"))
    shards = tmp_path / "shards"
    shards.mkdir()
    for number, start in enumerate(range(0, 40, 15)):  # 15 + 15 + 10 records, read in name order
        write_jsonl(shards / f"part-{number:05d}.jsonl", rows[start : start + 15])
    (shards / "README.md").write_text("not data")
    parquet_shards = tmp_path / "parquet_shards"
    parquet_shards.mkdir()
    for number, start in enumerate(range(0, 40, 25)):
        datasets.Dataset.from_list(rows[start : start + 25]).to_parquet(str(parquet_shards / f"{number}.parquet"))
    for source in (gz, array, tmp_path / "dolly.csv", csv_gz, tmp_path / "dolly.parquet", shards, parquet_shards):
        assert loaded(source, tmp_path) == expected, source


def test_the_arrow_check_and_the_line_by_line_check_agree(tmp_path):
    """Random valid and invalid records: the vectorised path takes a file only when it is all valid, and then
    gives exactly what the record-by-record reader gives."""
    rng = random.Random(7)
    for trial in range(6):
        rows = dolly_rows(30, seed=trial)
        if trial % 2:  # a record that only looks fine: blank in the eyes of str.strip(), or a null
            rows[rng.randrange(30)][rng.choice(["instruction", "response"])] = rng.choice(["\u3000\x1c ", None])
        path = write_jsonl(tmp_path / f"t{trial}.jsonl", rows)
        exact = load_text_records(resolve_source(path), resolve_fields(), True, tmp_path / "exact")
        fast = load_records(path, skip_bad_records=True, cache_dir=tmp_path / f"fast{trial}")
        assert fast.dataset.to_list() == exact.dataset.to_list() and fast.skipped == exact.skipped
        assert sum(fast.skipped.values()) == trial % 2
        copies = list((tmp_path / f"fast{trial}").glob("hf_sft_records/*.jsonl"))
        assert len(copies) == trial % 2  # only the file with a bad record went through the line-by-line reader


def run_data(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["data", "--tokenizer_path", TOKENIZER, "--val_split", "0", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


BAD = {"instruction": "x", "response": ""}


def test_errors_keep_file_and_line_in_every_line_based_kind(tmp_path, capsys):
    rows = dolly_rows(6)
    bad_rows = rows[:2] + [BAD] + rows[2:]
    path = write_jsonl(tmp_path / "data.jsonl", bad_rows)
    gz = tmp_path / "data.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    status, _, err = run_data(capsys, "--data_path", str(gz), "--cache_dir", str(tmp_path / "c"))
    assert status == 2 and err.startswith(f"error: {gz}:3: field 'response' is empty"), err
    # CSV: a quoted value spanning lines moves the bad row's line down: the message names where the row starts.
    csv_path = tmp_path / "data.csv"
    csv_path.write_text('instruction,context,response\n"two\nlines",,fine\nok,,\n', encoding="utf-8")
    status, _, err = run_data(capsys, "--data_path", str(csv_path), "--cache_dir", str(tmp_path / "c"))
    assert status == 2 and err.startswith(f"error: {csv_path}:4: field 'response' is empty"), err
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", rows[:3])
    write_jsonl(shards / "b.jsonl", rows[3:4] + [BAD])
    status, _, err = run_data(capsys, "--data_path", str(shards), "--cache_dir", str(tmp_path / "c"))
    assert status == 2 and err.startswith(f"error: {shards / 'b.jsonl'}:2: field 'response' is empty"), err
    status, out, _ = run_data(
        capsys, "--data_path", str(shards), "--skip_bad_records", "--cache_dir", str(tmp_path / "c")
    )
    assert status == 0 and "records: 5 read, 1 bad record skipped" in out


def test_parquet_errors_name_the_file_and_row(tmp_path):
    import datasets

    rows = dolly_rows(5)
    rows[3]["instruction"] = " "
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(UsageError, match=f"{tmp_path / 'd.parquet'} row 3: field 'instruction' is empty"):
        load_records(tmp_path / "d.parquet", cache_dir=tmp_path / "c")
    records = load_records(tmp_path / "d.parquet", skip_bad_records=True, cache_dir=tmp_path / "c")
    assert [r["index"] for r in records.dataset.to_list()] == [0, 1, 2, 4] and records.skipped == {"empty_field": 1}


def _two_kinds(folder: Path) -> Path:
    (folder / "a.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (folder / "b.csv").write_text("instruction,output\na,b\n")
    return folder


def _bz2(folder: Path) -> Path:
    (folder / "x.jsonl.bz2").write_bytes(b"")
    return folder / "x.jsonl.bz2"


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda folder: folder, "is a folder with no data file"),
        (_two_kinds, r"holds data files of several kinds \(csv, jsonl\)"),
        (_bz2, "unsupported extension '.jsonl.bz2'"),
    ],
)
def test_source_level_errors(tmp_path, make, reason):
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(UsageError, match=reason):
        load_records(make(folder), cache_dir=tmp_path / "c")


def test_concatenated_sources_count_on_from_each_other(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", dolly_rows(5, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", dolly_rows(4, seed=2)[:2] + [BAD] + dolly_rows(4, seed=2)[2:])
    records = load_records([a, b], skip_bad_records=True, cache_dir=tmp_path / "c")
    rows = records.dataset.to_list()
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4, 5, 6, 8, 9]  # b's bad record was record 7
    assert rows[5:] == [r | {"index": r["index"] + 5} for r in loaded(b, tmp_path, skip_bad_records=True)]
    assert records.skipped == {"empty_field": 1} and records.source == f"{a} + {b}"


def test_mixtures_honour_their_weights_and_the_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", dolly_rows(600, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", dolly_rows(600, seed=2))
    for weights in ([0.7, 0.3], [1, 3]):
        share_a = weights[0] / sum(weights)
        mixed = load_records([a, b], weights=weights, seed=5, cache_dir=tmp_path / "c").dataset
        first = mixed.select(range(400))["index"]  # before either source runs out
        n_a = sum(index < 600 for index in first)
        # within 4 standard deviations of the binomial share, and every record from one source once at most
        assert abs(n_a / 400 - share_a) < 4 * (share_a * (1 - share_a) / 400) ** 0.5, (weights, n_a)
        assert len(set(mixed["index"])) == len(mixed)
        again = load_records([a, b], weights=weights, seed=5, cache_dir=tmp_path / "c").dataset
        other = load_records([a, b], weights=weights, seed=6, cache_dir=tmp_path / "c").dataset
        assert again["index"] == mixed["index"] and other["index"] != mixed["index"]
    with pytest.raises(UsageError, match="gives 1 weights for 2"):
        load_records([a, b], weights=[1.0], cache_dir=tmp_path / "c")
    with pytest.raises(UsageError, match="must be positive"):
        load_records([a, b], weights=[1.0, 0.0], cache_dir=tmp_path / "c")


def test_several_sources_and_weights_from_the_command_line_and_yaml(tmp_path, capsys):
    import datasets

    from hf_sft.training.arguments import parse_args

    a = write_jsonl(tmp_path / "a.jsonl", dolly_rows(30, seed=1))
    datasets.Dataset.from_list(dolly_rows(30, seed=2)).to_parquet(str(tmp_path / "b.parquet"))
    flags = ["--data_path", str(a), str(tmp_path / "b.parquet"), "--data_weights", "0.7", "0.3"]
    status, out, err = run_data(capsys, *flags, "--cache_dir", str(tmp_path / "c"), "--dataset_num_proc", "1")
    assert status == 0, err
    assert f"data: {a} + {tmp_path / 'b.parquet'}" in out
    config = tmp_path / "run.yaml"
    config.write_text(f"data_path: [{a}, {tmp_path / 'b.parquet'}]\ndata_weights: [0.7, 0.3]\n")
    data_args = parse_args(["--config", str(config)])[1]
    assert data_args.data_path == [str(a), str(tmp_path / "b.parquet")] and data_args.data_weights == [0.7, 0.3]
    assert parse_args(["--data_path", str(a), "--dataset_num_proc", "2"])[1].num_proc == 2


def test_trl_prompt_completion_records_are_instruction_records(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Name a fish.", "completion": "Tope"}])
    assert loaded(path, tmp_path) == [{"index": 0, "instruction": "Name a fish.", "input": "", "output": "Tope"}]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_an_unrecognised_shape_names_its_fields_and_the_field_map(tmp_path, capsys, kind):
    import datasets

    rows = [{"question": "Why?", "answer": "Because.", "id": 1}] * 3
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    if kind == "parquet":
        path = tmp_path / "qa.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    status, _, err = run_data(capsys, "--data_path", str(path), "--skip_bad_records", "--cache_dir", str(tmp_path))
    assert status == 2, err  # a source of another shape, not bad records to skip
    assert (
        "records have fields question, answer, id: map them with --field_map instruction=question,output=answer" in err
    )
    status, out, err = run_data(
        capsys,
        "--data_path",
        str(path),
        "--field_map",
        "instruction=question,output=answer",
        "--cache_dir",
        str(tmp_path),
    )
    assert status == 0 and "examples: 3 kept" in out, err


def test_a_hub_dataset_with_config_split_and_revision(tmp_path, monkeypatch):
    """The Hub path of `load_records`, offline: `datasets.load_dataset` is pointed at a local folder laid out like a
    Hub dataset repository (a README whose YAML declares two configurations, parquet files per split); the
    configuration and split go to the real `load_dataset`, the revision is recorded (a local folder has none)."""
    import datasets

    repo = tmp_path / "repo"
    for config, split, rows in [
        ("en", "train", dolly_rows(4, 1)),
        ("en", "test", dolly_rows(2, 2)),
        ("de", "train", dolly_rows(3, 3)),
    ]:
        (repo / config).mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(repo / config / f"{split}.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: en\n  data_files:\n  - split: train\n    path: en/train.parquet\n"
        "  - split: test\n    path: en/test.parquet\n"
        "- config_name: de\n  data_files:\n  - split: train\n    path: de/train.parquet\n---\n"
    )
    real, calls = datasets.load_dataset, []

    def hub_stand_in(name, config=None, *, revision=None, **kwargs):
        if name != "someone/dolly-multi":
            return real(name, config, revision=revision, **kwargs)
        calls.append((config, kwargs["split"], revision))
        return real(str(repo), config, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub_stand_in)
    got = load_records(
        "someone/dolly-multi",
        cache_dir=tmp_path / "c",
        dataset_config="en",
        dataset_split="test",
        dataset_revision="v1",
    )
    assert len(got.dataset) == 2 and calls[-1] == ("en", "test", "v1")
    assert len(load_records("someone/dolly-multi", cache_dir=tmp_path / "c", dataset_config="de").dataset) == 3
    assert calls[-1] == ("de", "train", None)


def test_hf_sft_data_without_a_model_applies_no_limit(tmp_path, capsys):
    long = {"instruction": "Repeat.", "response": " ".join(["tope"] * 400)}  # far beyond the demo model's 256
    path = write_jsonl(tmp_path / "long.jsonl", [long, {"instruction": "Hi", "response": "Hello"}])
    status, out, err = run_data(capsys, "--data_path", str(path), "--cache_dir", str(tmp_path / "c"))
    assert status == 0, err
    assert "no model named: no model limit applied" in out and "examples: 2 kept, 0 dropped (no max_seq_len" in out
    status, out, err = run_data(
        capsys, "--data_path", str(path), "--max_seq_len", "2048", "--cache_dir", str(tmp_path)
    )
    assert status == 0 and "--max_seq_len 2048 as given" in out and "examples: 2 kept" in out, err
    status, out, _ = run_data(capsys, "--data_path", str(path), "--block_size", "64", "--cache_dir", str(tmp_path))
    assert status == 0 and "examples: 1 kept, 1 dropped (max_seq_len 64" in out  # a new model named by its size


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_memory_stays_flat_in_the_number_of_records(tmp_path, kind):
    """Python allocations while loading 2k and 20k records (the old reader held every record: ~3 KB each)."""
    import tracemalloc

    import pandas as pd

    peaks = []
    for n in (2000, 20000):
        rows = [{"instruction": f"Say {i}.", "context": "", "response": f"{i} " * 8} for i in range(n)]
        path = write_jsonl(tmp_path / f"{n}.jsonl", rows)
        if kind == "csv":
            path = tmp_path / f"{n}.csv"
            pd.DataFrame(rows).to_csv(path, index=False)
        tracemalloc.start()
        load_records(path, cache_dir=tmp_path / f"c{n}")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] - peaks[0] < 4 << 20, peaks  # 18k more records; a list of them would add about 50 MB


def test_source_kinds(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"")
    assert resolve_source(tmp_path / "x.parquet").kind == "parquet"
    assert resolve_source("owner/name").kind == "hub"
    shutil.copy(FIXTURES / "tiny_sft.jsonl", tmp_path / "t.JSONL")
    assert resolve_source(tmp_path / "t.JSONL").kind == "jsonl"
    with pytest.raises(UsageError, match=r"several kinds \(jsonl, parquet\)"):
        resolve_source(tmp_path)
    with pytest.raises(UsageError, match="data file not found"):
        resolve_source(tmp_path / "owner" / "missing.jsonl")


def test_the_arrow_blank_check_is_pythons_strip():
    """The vectorised check treats as blank exactly what `str.strip()` empties, character by character."""
    import sys

    import pyarrow as pa
    import pyarrow.compute as pc

    from hf_sft.data.arrow_records import PY_WHITESPACE, blank_pattern

    assert PY_WHITESPACE == "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
    rng = random.Random(3)
    texts = ["", " ", "a", "\u3000\x1c\t", "\u200b", " x ", *("".join(rng.choices(ODD, k=4)) for _ in range(200))]
    blank = pc.match_substring_regex(pa.array(texts), blank_pattern()).to_pylist()
    assert blank == [not text.strip() for text in texts]


@pytest.mark.parametrize(
    "line, reason",
    [
        (b'{"instruction": "a", "response": "b"}{"instruction": "c", "response": "d"}', "invalid JSON: Extra data"),
        (b'{"instruction": "a",\n "response": "b"}', "invalid JSON"),
    ],
)
def test_lines_pyarrow_reads_differently_are_judged_line_by_line(tmp_path, capsys, line, reason):
    """pyarrow reads two objects on one line as two records and an object broken over lines as one."""
    good = b'{"instruction": "x", "response": "y"}'
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([good, line, good]) + b"\n")
    status, _, err = run_data(capsys, "--data_path", str(path), "--cache_dir", str(tmp_path / "c"))
    assert status == 2 and err.startswith(f"error: {path}:2: {reason}"), err


def test_a_folder_of_shards_is_fingerprinted_file_by_file(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    (folder / "README.md").write_text("not data")
    before = [source_fingerprint(folder)]
    assert before[0]["path"] == str(folder.resolve()) and list(before[0]["files"]) == ["a.jsonl"]
    (folder / "README.md").write_text("edited: still not data")
    assert fingerprint_changes(before, [source_fingerprint(folder)]) == []
    (folder / "b.jsonl").write_text('{"instruction": "z", "output": "w"}\n')
    assert fingerprint_changes(before, [source_fingerprint(folder)]) == [f"{folder.resolve()}/b.jsonl was added"]


def test_hub_revisions_compare_only_as_commits():
    old, new = "a" * 40, "b" * 40
    hub = [{"path": "owner/data", "revision": old}]
    assert fingerprint_changes(hub, [{"path": "owner/data", "revision": new}]) == [
        f"owner/data: revision {old} is now {new}"
    ]
    assert fingerprint_changes(hub, [{"path": "owner/data", "revision": None}]) == []  # offline: nothing to compare
