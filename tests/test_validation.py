"""Training flags are checked before any work: finite, in range, consistent; one line, exit 2, no --out_dir left."""

import dataclasses
import os
import subprocess
import sys
from math import nan
from pathlib import Path

import pytest

from hf_sft.cli import main
from hf_sft.errors import UsageError
from hf_sft.training.arguments import build_parser, flag, parse_args
from hf_sft.training.validation import validate_arguments

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
        # each flag named as the command line spells it (the seed name or the TrainingArguments one)
        (["--per_device_train_batch_size", "-1"], "--per_device_train_batch_size must be at least 1, got -1"),
        (["--max_grad_norm", "-1"], "--max_grad_norm must not be negative, got -1.0"),
        (["--grad_clip", "-1"], "--grad_clip must not be negative, got -1.0"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number, got nan"),
        (["--log_interval", "1.5"], "--log_interval must be an integer if bigger than 1: 1.5"),
        (["--logging_steps", "1.5"], "--logging_steps must be an integer if bigger than 1: 1.5"),
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
    assert refused(capsys, out, "--data_path", str(tmp_path)).startswith(
        f"error: --data_path {tmp_path} is a folder with no data file (.jsonl, .jsonl.gz, .json, .json.gz, .csv, "
        ".csv.gz, .parquet) and no dataset written by `Dataset.save_to_disk`"
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
    # What follows is accelerate's own report of our status, nothing of ours: no log line, no frame of our code. Its
    # wording is accelerate's and changes between releases (1.16 repeats our line inside a RuntimeError first).
    after = lines[ours + 1 :]
    assert not [line for line in after if line.startswith(("INFO ", "WARNING ", "ERROR "))]
    assert not [line for line in after if line.strip().startswith('File "') and "/hf_sft/" in line]
    assert any("exit status 2" in line for line in after)
    assert result.returncode == 1 and not out.exists()


FLOAT_FLAGS = sorted(
    flag(action.dest) for action in build_parser()._actions if getattr(action.type, "__name__", "") == "float"
)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_every_float_flag_refuses_a_value_that_is_not_finite(tmp_path, capsys, value):
    assert len(FLOAT_FLAGS) > 15  # ours and every float field of TrainingArguments
    shown = {"1e999": "inf"}.get(value, value)
    out = tmp_path / "out"
    for name in FLOAT_FLAGS:
        assert refused(capsys, out, f"{name}={value}") == f"error: {name} must be a finite number, got {shown}", name
    assert not out.exists()


def test_a_yaml_float_that_is_not_finite_is_refused_too(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("learning_rate: .inf\nsave_interval: .nan\n")
    out = tmp_path / "out"
    assert refused(capsys, out, "--config", str(tmp_path / "run.yaml")) == (
        "error: --learning_rate must be a finite number, got inf"
    )
    # Arguments built in code (the benchmarks call run() directly) go through the same check.
    model_args, data_args, args = parse_args([*TINY, "--out_dir", str(out)])
    with pytest.raises(UsageError, match=r"^--lr_scheduler_kwargs num_cycles must be a finite number, got nan$"):
        validate_arguments(model_args, data_args, dataclasses.replace(args, lr_scheduler_kwargs={"num_cycles": nan}))
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--min_lr", "1e-3", "--learning_rate", "1e-4"],
            "--min_lr must not be above --learning_rate: got 0.001 > 0.0001",
        ),
        (
            ["--lr_scheduler_kwargs", '{"min_lr": 1.0}'],
            "--lr_scheduler_kwargs min_lr must be in [0, --learning_rate 0.001], got 1.0",
        ),
        (
            ["--lr_scheduler_kwargs", '{"min_lr_rate": 2}'],
            "--lr_scheduler_kwargs min_lr_rate must be in [0, 1], got 2",
        ),
        (["--seed", "4294967296"], "--seed must be in [0, 4294967295], got 4294967296"),
        (["--save_steps", "inf"], "--save_steps must be a finite number, got inf"),  # OverflowError on main
        (["--batch_size", str(2**63)], f"--batch_size must fit in 64 bits (at most {2**63 - 1}), got {2**63}"),
        (  # Trainer's own SIGTERM handler would replace the run's one handler
            ["--enable_jit_checkpoint"],
            "--enable_jit_checkpoint is not needed: SIGTERM and SIGINT save a checkpoint and stop anyway",
        ),
    ],
)
def test_values_that_would_fail_or_diverge_later_exit_2_first(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert refused(capsys, out, *flags) == f"error: {message}"
    assert not out.exists()
