"""The hf-sft command: help for every subcommand, exit statuses, and a bad input of every kind: exit 2, one line."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.bad_inputs import TOKENIZER, build_bad_inputs
from transformers.integrations import get_available_reporting_integrations

from hf_sft.cli import COMMANDS, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_sft.cli", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--" in out


def test_unknown_subcommand_is_bad_usage():
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_usage_errors_are_one_line_without_traceback():
    result = run_cli("convert", "--checkpoint", "/nonexistent.pt", "--tokenizer", "/nonexistent.json", "--out", "x")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")


DEMO = str(Path(__file__).resolve().parents[1] / "hf_sft" / "demo" / "demo_sample.jsonl")
TINY_RUN = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64"]
TINY_RUN += ["--max_seq_len", "64", "--val_split", "0", "--max_iters", "1", "--data_path", DEMO]
MISSING_TRACKER = next(
    t for t in ("wandb", "comet_ml", "neptune", "clearml") if t not in get_available_reporting_integrations()
)
# (argv, the error line; "..." at its end: the rest is the library's own words). {r}: the bad inputs, {out}: an
# output path that must not exist afterwards, {tok}: a good tokenizer.
BAD_INPUTS = {
    "convert: empty checkpoint": (
        ["convert", "--checkpoint", "{r}/empty.pt", "--tokenizer", "{tok}", "--out", "{out}"],
        "error: cannot read {r}/empty.pt as a torch checkpoint: EOFError",
    ),
    "convert: tokenizer not JSON": (
        ["convert", "--checkpoint", "{r}/legacy.pt", "--tokenizer", "{r}/garbage.json", "--out", "{out}"],
        "error: {r}/garbage.json is not a `tokenizers` JSON file: expected value at line 1 column 1",
    ),
    "convert: tokenizer folder with a broken config": (
        ["convert", "--checkpoint", "{r}/legacy.pt", "--tokenizer", "{r}/tokenizer_dir", "--out", "{out}"],
        "error: cannot load the tokenizer in {r}/tokenizer_dir: Expecting property name enclosed in double quotes...",
    ),
    "convert: a flag missing": (
        ["convert", "--checkpoint", "{r}/legacy.pt"],
        "error: the following arguments are required: --tokenizer, --out (see --help)",
    ),
    "train: model folder without config.json": (
        ["train", *TINY_RUN, "--pretrained_ckpt_path", "{r}/no_config", "--out_dir", "{out}"],
        "error: --pretrained_ckpt_path: {r}/no_config has no config.json: it is not a model folder (or a "
        "checkpoint-STEP folder)",
    ),
    "train: broken config.json": (
        ["train", *TINY_RUN, "--pretrained_ckpt_path", "{r}/bad_config", "--out_dir", "{out}"],
        "error: --pretrained_ckpt_path: cannot read {r}/bad_config/config.json: Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)",
    ),
    "train: config the model refuses": (
        ["train", *TINY_RUN, "--pretrained_ckpt_path", "{r}/bad_values", "--out_dir", "{out}"],
        "error: --pretrained_ckpt_path: cannot read the model configuration in {r}/bad_values: hidden_size (32) "
        "must be divisible by num_attention_heads (5)",
    ),
    "train: no weights": (
        ["train", *TINY_RUN, "--pretrained_ckpt_path", "{r}/no_weights", "--out_dir", "{out}"],
        "error: --pretrained_ckpt_path: {r}/no_weights has no weights (looked for model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin)",
    ),
    "train: weights cut short": (
        ["train", *TINY_RUN, "--pretrained_ckpt_path", "{r}/cut_weights", "--out_dir", "{out}"],
        "error: --pretrained_ckpt_path: {r}/cut_weights/model.safetensors is cut short: its safetensors header is "
        "incomplete (100 bytes)",
    ),
    "train: broken tokenizer in the model folder": (
        ["train", *TINY_RUN, "--pretrained_ckpt_path", "{r}/bad_tokenizer", "--out_dir", "{out}"],
        "error: --pretrained_ckpt_path: cannot load the tokenizer in {r}/bad_tokenizer: Expecting value: line 1 "
        "column 1 (char 0)",
    ),
    "train: no such model": (
        ["train", *TINY_RUN, "--pretrained_ckpt_path", "models/base", "--out_dir", "{out}"],
        "error: --pretrained_ckpt_path models/base: no such folder (a Hub model id needs --tokenizer_path too)",
    ),
    "train: no such path": (
        ["train", *TINY_RUN, "--pretrained_ckpt_path", "{r}/nope/base", "--out_dir", "{out}"],
        "error: --pretrained_ckpt_path {r}/nope/base: no such file or folder",
    ),
    "train: unknown LoRA targets": (
        ["train", *TINY_RUN, "--tokenizer_path", "{tok}", "--use_lora", "--lora_targets", "qkv", "--out_dir", "{out}"],
        "error: --lora_targets qkv: Target modules {{'qkv'}} not found in the base model...",
    ),
    "train: a device that is not there": (
        ["train", *TINY_RUN, "--tokenizer_path", "{tok}", "--device", "cuda:3", "--out_dir", "{out}"],
        "error: argument --device: invalid choice: 'cuda:3' (choose from 'cuda', 'cpu') (see --help)",
    ),
    "train: a device torch does not know": (
        ["train", *TINY_RUN, "--tokenizer_path", "{tok}", "--device", "tpu", "--out_dir", "{out}"],
        "error: argument --device: invalid choice: 'tpu' (choose from 'cuda', 'cpu') (see --help)",
    ),
    "train: tokenizer not JSON": (
        ["train", *TINY_RUN, "--tokenizer_path", "{r}/garbage.json", "--out_dir", "{out}"],
        "error: {r}/garbage.json is not a `tokenizers` JSON file: expected value at line 1 column 1",
    ),
    "train: a tracker that is not installed": (
        ["train", *TINY_RUN, "--tokenizer_path", "{tok}", "--report_to", MISSING_TRACKER, "--out_dir", "{out}"],
        f"error: --report_to {MISSING_TRACKER}: its package is not installed",
    ),
    "train: a tracker transformers does not know": (
        ["train", *TINY_RUN, "--tokenizer_path", "{tok}", "--report_to", "abacus", "--out_dir", "{out}"],
        "error: --report_to abacus is not a tracker transformers knows (...",
    ),
    "train: a dict flag that is not JSON": (
        ["train", *TINY_RUN, "--tokenizer_path", "{tok}", "--lr_scheduler_kwargs", "{{bad", "--out_dir", "{out}"],
        "error: --lr_scheduler_kwargs is not valid JSON: Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1)",
    ),
    "train: a float that is not a number": (
        ["train", *TINY_RUN, "--tokenizer_path", "{tok}", "--learning_rate", "fast", "--out_dir", "{out}"],
        "error: argument --learning_rate/--learning-rate: invalid float value: 'fast' (see --help)",
    ),
    "train: an unknown flag": (
        ["train", *TINY_RUN, "--tokenizer_path", "{tok}", "--learning_speed", "2", "--out_dir", "{out}"],
        "error: unknown arguments: --learning_speed 2 (see --help)",
    ),
    "data: model folder with a broken config.json": (
        ["data", "--data_path", DEMO, "--pretrained_ckpt_path", "{r}/bad_config"],
        "error: --pretrained_ckpt_path {r}/bad_config: cannot read the model configuration: ...",
    ),
    "data: tokenizer not JSON": (
        ["data", "--data_path", DEMO, "--tokenizer_path", "{r}/garbage.json"],
        "error: {r}/garbage.json is not a `tokenizers` JSON file: expected value at line 1 column 1",
    ),
    "data: a float that is not finite": (
        ["data", "--data_path", DEMO, "--tokenizer_path", "{tok}", "--val_split", "nan"],
        "error: --val_split must be a finite number, got nan",
    ),
    "generate: broken config.json": (
        ["generate", "{r}/bad_config", "--instruction", "Hi"],
        "error: cannot read {r}/bad_config/config.json: Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1)",
    ),
    "generate: no weights": (
        ["generate", "{r}/no_weights", "--instruction", "Hi"],
        "error: {r}/no_weights has no weights (looked for model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin)",
    ),
    "generate: weights cut short": (
        ["generate", "{r}/cut_weights", "--instruction", "Hi"],
        "error: {r}/cut_weights/model.safetensors is cut short: its safetensors header is incomplete (100 bytes)",
    ),
    "generate: broken tokenizer": (
        ["generate", "{r}/bad_tokenizer", "--instruction", "Hi"],
        "error: cannot load the tokenizer in {r}/bad_tokenizer: ...",
    ),
    "generate: broken tokenizer config": (
        ["generate", "{r}/bad_tokenizer_config", "--instruction", "Hi"],
        "error: cannot load the tokenizer in {r}/bad_tokenizer_config: ...",
    ),
    "generate: a device torch does not know": (
        ["generate", "{r}/model", "--instruction", "Hi", "--device", "tpu"],
        "error: --device tpu is not a device name (cpu, cuda, cuda:1, mps, ...)",
    ),
    "generate: a device that is not there": (
        ["generate", "{r}/model", "--instruction", "Hi", "--device", "cuda:99"],
        "error: --device cuda:99: this machine has ...",
    ),
    "generate: a temperature that is not finite": (
        ["generate", "{r}/model", "--instruction", "Hi", "--temperature", "inf"],
        "error: --temperature must be a finite number, got inf",
    ),
    "export: config the model refuses": (
        ["export", "{r}/bad_values", "--to", "gpt2", "--out", "{out}"],
        "error: cannot read the model configuration in {r}/bad_values: hidden_size (32) must be divisible by "
        "num_attention_heads (5)",
    ),
    "export: weights cut short": (
        ["export", "{r}/cut_weights", "--to", "gpt2", "--out", "{out}"],
        "error: {r}/cut_weights/model.safetensors is cut short: its safetensors header is incomplete (100 bytes)",
    ),
    "export: broken tokenizer": (
        ["export", "{r}/bad_tokenizer", "--to", "gpt2", "--out", "{out}"],
        "error: cannot load the tokenizer in {r}/bad_tokenizer: ...",
    ),
    "export: an unknown target": (
        ["export", "{r}/model", "--to", "onnx", "--out", "{out}"],
        "error: argument --to: invalid choice: 'onnx' (choose from ...",
    ),
    "push: broken config.json": (
        ["push", "{r}/bad_config", "--repo_id", "me/model"],
        "error: cannot read {r}/bad_config/config.json: Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1)",
    ),
    "push: not a repository id": (
        ["push", "{r}/model", "--repo_id", "me/my/model"],
        "error: --repo_id me/my/model is not a repository id: ...",
    ),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    from hf_sft.export import export_model

    root = build_bad_inputs(tmp_path_factory.mktemp("bad"))
    export_model(root / "model", "legacy-pt", root / "legacy.pt")  # a legacy checkpoint of the tiny model
    return root


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_exit_2_with_one_line(bad_inputs, tmp_path, capsys, case):
    argv, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    fill = {"r": bad_inputs, "out": out, "tok": TOKENIZER}
    assert main([arg.format(**fill) for arg in argv]) == 2
    err = capsys.readouterr().err
    # Before its inputs are all read, a training run may have logged what it is about to do; the error ends it.
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [line for line in lines if "error" in line.lower()] == lines[-1:], err
    expected = expected.format(**fill)
    if expected.endswith("..."):
        assert lines[-1].startswith(expected[:-3]), lines[-1]
    else:
        assert lines[-1] == expected
    assert not out.exists()
