"""Training flags are checked before any work: one line, exit 2, and no --out_dir left behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sft.cli import main

REPO = Path(__file__).resolve().parents[1]
# Enough for a tiny run; the flags under test come after and win.
TINY = ["--demo", "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "128"]
TINY += ["--tokenizer_vocab_size", "300", "--max_seq_len", "128", "--val_split", "0", "--max_iters", "2"]


def refused(capsys, out: Path, *flags: str) -> str:
    assert main(["train", *TINY, "--out_dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    return lines[-1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
        (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (["--batch_size", "-1"], "--batch_size must be at least 1, got -1"),
        (["--per_device_train_batch_size", "-1"], "--batch_size must be at least 1, got -1"),
        (["--learning_rate", "0"], "--learning_rate must be greater than 0, got 0.0"),
        (["--max_iters", "0"], "--max_iters must be -1 (train for --num_epochs) or at least 1, got 0"),
        (["--val_split", "1"], "--val_split must be in [0, 1), got 1.0"),
        (["--max_seq_len", "0"], "--max_seq_len must be at least 1, got 0"),
        (["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
    ],
)
def test_numbers_out_of_range_exit_2_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert refused(capsys, out, *flags) == f"error: {message}"
    assert not out.exists()


def test_paths_of_the_wrong_kind_exit_2(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert refused(capsys, a_file) == f"error: --out_dir {a_file} exists and is not a folder"
    assert a_file.read_text() == "mine"
    out = tmp_path / "out"
    missing = tmp_path / "missing.json"
    assert (
        refused(capsys, out, "--tokenizer_path", str(missing))
        == f"error: --tokenizer_path {missing}: no such file or folder"
    )
    assert refused(capsys, out, "--data_path", str(tmp_path)) == (
        f"error: --data_path {tmp_path} is a folder; pass a .jsonl or .json file, a Hub dataset id or a folder "
        "written by `Dataset.save_to_disk`"
    )
    legacy = tmp_path / "base.pt"
    assert refused(capsys, out, "--pretrained_ckpt_path", str(legacy)) == (
        f"error: --pretrained_ckpt_path {legacy}: no such file"
    )
    assert not out.exists()


def test_a_run_that_fails_on_its_data_leaves_no_out_dir(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"\n')
    out = tmp_path / "out"
    assert refused(capsys, out, "--data_path", str(bad)).startswith(f"error: {bad}:1: invalid JSON")
    assert not out.exists()


@pytest.mark.slow
def test_under_accelerate_launch_our_line_ends_our_output(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | {"HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--cpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = tmp_path / "out"
    script = [str(REPO / "scripts" / "train.py"), *TINY, "--out_dir", str(out), "--batch_size", "0"]
    result = subprocess.run([*launch, *script], env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    ours = lines.index("error: --batch_size must be at least 1, got 0")
    # What follows is accelerate's own report of our status, nothing of ours.
    assert lines[ours + 1] == "Traceback (most recent call last):" and "exit status 2" in lines[-1]
    assert result.returncode == 1 and not out.exists()
