"""A checkpoint knows its data: a resume on changed data is refused by name, and recorded paths are absolute."""

import json
import shutil
from pathlib import Path

import pytest

from hf_sft.cli import main
from hf_sft.training.resume import DATA_RECORD, RUN_ARGS_FILE

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "fixtures" / "tiny_bpe.json"
DATA = REPO / "hf_sft" / "demo" / "demo_sample.jsonl"
TINY = [
    "--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "64",
    "--max_seq_len", "64", "--val_split", "0", "--seed", "0", "--batch_size", "2",
    "--gradient_accumulation_steps", "1", "--warmup_steps", "0",
]  # fmt: skip


# What holds for both kinds of run is tested on the map-style one alone.
MAP_STYLE = pytest.mark.parametrize("one_step", ["map-style"], indirect=True)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module", params=["map-style", "streaming"])
def one_step(request, tmp_path_factory) -> Path:
    """A run of one step with relative paths (its folder the working directory), checkpoint-1 written."""
    root = tmp_path_factory.mktemp(request.param)
    shutil.copy(DATA, root / "data.jsonl")
    shutil.copy(TOKENIZER, root / "tok.json")
    streaming = ["--streaming"] if request.param == "streaming" else []
    flags = ["--tokenizer_path", "tok.json", "--data_path", "data.jsonl", "--out_dir", "out", *streaming]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert main(["train", *TINY, *flags, "--max_iters", "1", "--save_interval", "1"]) == 0
    return root


@pytest.fixture
def run_copy(one_step, tmp_path, monkeypatch):
    """The run's folder, put back as it was after the test (its paths are recorded absolutely, so it stays where it
    is); the working directory elsewhere."""
    backup = tmp_path / "backup"
    shutil.copytree(one_step, backup)
    monkeypatch.chdir(tmp_path)
    yield one_step
    shutil.rmtree(one_step)
    shutil.copytree(backup, one_step)


def test_the_checkpoint_records_absolute_paths_and_each_file_fingerprint(run_copy):
    record = json.loads((run_copy / "out" / "checkpoint-1" / RUN_ARGS_FILE).read_text())
    data = str((run_copy / "data.jsonl").resolve())
    assert record["values"]["data_path"] == data
    assert record["shape"]["tokenizer_path"] == str((run_copy / "tok.json").resolve())
    [source] = record[DATA_RECORD]
    assert source["path"] == data
    assert source["files"]["data.jsonl"]["size"] == (run_copy / "data.jsonl").stat().st_size
    assert len(source["files"]["data.jsonl"]["sha256"]) == 64


def appended(data: bytes) -> bytes:
    return data + data.splitlines(keepends=True)[0]


def truncated(data: bytes) -> bytes:
    return b"".join(data.splitlines(keepends=True)[:-1])


def edited(data: bytes) -> bytes:  # one character changed, same size
    at = data.index(b'"instruction": "') + len(b'"instruction": "')
    return data[:at] + (b"X" if data[at : at + 1] != b"X" else b"Y") + data[at + 1 :]


@pytest.mark.parametrize("change", [appended, truncated, edited])
@pytest.mark.parametrize("checkpoint", ["checkpoint-1", "latest"])
def test_a_resume_on_changed_data_is_refused_naming_the_source_and_the_change(run_copy, capsys, change, checkpoint):
    data = run_copy / "data.jsonl"
    before = data.stat().st_size
    data.write_bytes(change(data.read_bytes()))
    out = run_copy / "out"
    snapshot = tree(run_copy)
    resume = str(out / "checkpoint-1") if checkpoint != "latest" else "latest"
    assert main(["train", "--resume_from_ckpt_path", resume, "--out_dir", str(out), "--max_iters", "2"]) == 2
    line = last_line(capsys)
    assert "the data changed since the checkpoint was written" in line and str(data.resolve()) in line
    assert "--accept_changed_data" in line
    if change is edited:
        assert f"same size ({before} bytes), content differs" in line
    else:
        assert f"{before} bytes, now {data.stat().st_size}" in line
    assert tree(run_copy) == snapshot  # nothing written: no checkpoint, no lock, no log


@MAP_STYLE
def test_accept_changed_data_resumes_on_the_new_data(run_copy, capsys):
    data = run_copy / "data.jsonl"
    data.write_bytes(appended(data.read_bytes()))
    checkpoint = run_copy / "out" / "checkpoint-1"
    resume = ["--resume_from_ckpt_path", str(checkpoint), "--max_iters", "2", "--accept_changed_data"]
    assert main(["train", *resume]) == 0
    assert "resuming on changed data" in capsys.readouterr().err
    record = json.loads((run_copy / "out" / "checkpoint-2" / RUN_ARGS_FILE).read_text())
    assert record[DATA_RECORD][0]["files"]["data.jsonl"]["size"] == data.stat().st_size
    assert "accept_changed_data" not in record["values"]  # a decision of that resume, not of the run


@MAP_STYLE
def test_a_run_resumes_from_another_directory_with_its_paths_given_absolutely(run_copy):
    checkpoint = run_copy / "out" / "checkpoint-1"
    given = ["--data_path", str(run_copy / "data.jsonl"), "--tokenizer_path", str(run_copy / "tok.json")]
    assert main(["train", "--resume_from_ckpt_path", str(checkpoint), "--max_iters", "2", *given]) == 0
    assert (run_copy / "out" / "checkpoint-2").is_dir() and (run_copy / "out" / "model.safetensors").is_file()


@MAP_STYLE
def test_the_same_paths_given_relatively_are_the_same_paths(run_copy, monkeypatch):
    monkeypatch.chdir(run_copy)
    given = ["--data_path", "data.jsonl", "--tokenizer_path", "./tok.json", "--out_dir", "out"]
    assert main(["train", "--resume_from_ckpt_path", "latest", "--max_iters", "2", *given]) == 0


@MAP_STYLE
def test_a_checkpoint_without_a_data_fingerprint_still_resumes_saying_so(run_copy, capsys):
    checkpoint = run_copy / "out" / "checkpoint-1"
    record_file = checkpoint / RUN_ARGS_FILE
    record = json.loads(record_file.read_text())
    del record[DATA_RECORD]
    record_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    reseal(checkpoint)
    assert main(["train", "--resume_from_ckpt_path", str(checkpoint), "--max_iters", "2"]) == 0
    assert "records no fingerprint of its data" in capsys.readouterr().err


def reseal(checkpoint: Path) -> None:
    from hf_sft.training.checkpoints import MANIFEST, seal

    (checkpoint / MANIFEST).unlink()
    seal(checkpoint, 1)
