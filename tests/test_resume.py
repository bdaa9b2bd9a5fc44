"""--resume_from_ckpt_path alone continues a run exactly; a flag given on resume takes effect or is refused by name."""

import json
import os
import shutil
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_sft.cli import main
from hf_sft.training.arguments import build_parser, given_fields, parse_args
from hf_sft.training.resume import RUN_ARGS_FILE
from hf_sft.training.run import run

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "scripts" / "train.py")
TOKENIZER = str(REPO / "tests" / "fixtures" / "tiny_bpe.json")
DATA = str(REPO / "hf_sft" / "demo" / "demo_sample.jsonl")
# A tiny new model: the architecture flags are given once, by the first run only.
NEW_MODEL = [
    "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "128",
    "--max_seq_len", "128", "--val_split", "0", "--learning_rate", "1e-3", "--warmup_steps", "2",
    "--log_interval", "1", "--seed", "0", "--batch_size", "4", "--gradient_accumulation_steps", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """6 steps with checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("resume") / "full"
    flags = ["--tokenizer_path", TOKENIZER, "--data_path", DATA, "--max_iters", "6", "--save_interval", "3"]
    assert main(["train", *NEW_MODEL, *flags, "--out_dir", str(out)]) == 0
    return out


def same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def resumed_from_3(full_run: Path, out: Path, *flags: str) -> Path:
    """Resume `full_run`'s checkpoint-3 (copied into `out`) to step 6 with `flags`, in this process."""
    out.mkdir()
    shutil.copytree(full_run / "checkpoint-3", out / "checkpoint-3")
    assert main(["train", "--resume_from_ckpt_path", str(out / "checkpoint-3"), *flags]) == 0
    return out


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_the_seed_resume_command_ends_bit_identical(full_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(full_run / "checkpoint-3", out / "checkpoint-3")  # a run that stopped after step 3
    command = [sys.executable, TRAIN, "--tokenizer_path", TOKENIZER, "--data_path", DATA]
    command += ["--resume_from_ckpt_path", str(out / "checkpoint-3"), "--out_dir", str(out), "--max_iters", "6"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    full, resumed = load_file(full_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    log = (out / "train.log").read_text()
    assert "resumed from checkpoint-3 (step 3 of 6)" in log
    assert "initialising a NEW" not in log  # the architecture came from the checkpoint
    saved = json.loads((out / "checkpoint-6" / RUN_ARGS_FILE).read_text())
    assert saved == json.loads((full_run / "checkpoint-6" / RUN_ARGS_FILE).read_text())


def test_a_flag_that_changes_the_shape_of_the_run_is_refused(full_run, tmp_path, capsys):
    checkpoint = full_run / "checkpoint-3"
    argv = ["train", "--resume_from_ckpt_path", str(checkpoint), "--out_dir", str(tmp_path / "out")]
    assert main([*argv, "--batch_size", "8", "--max_seq_len", "64", "--n_layer", "4"]) == 2
    assert last_error(capsys) == (
        f"error: --resume_from_ckpt_path {checkpoint}: --n_layer 4 (the checkpoint's run: 2); --max_seq_len 64 "
        "(the checkpoint's run: 128); --batch_size 8 (the checkpoint's run: 4). A resumed run keeps its model, "
        "tokenizer, data, data order, batch layout, optimizer and schedule type; to change them, start a new run "
        f"from its weights with --pretrained_ckpt_path {checkpoint}"
    )
    assert not (tmp_path / "out").exists()


def test_a_seed_pretraining_checkpoint_is_pointed_to_pretrained_ckpt_path(shared_dir, capsys):
    seed = shared_dir / "data" / "legacy_checkpoints" / "nanogpt_bias_seedformat.pt"
    assert main(["train", "--resume_from_ckpt_path", str(seed)]) == 2
    assert last_error(capsys) == (
        f"error: --resume_from_ckpt_path {seed} is a pretraining checkpoint, not a checkpoint folder of a "
        f"fine-tuning run: to fine-tune from it pass --pretrained_ckpt_path {seed}"
    )


def test_a_finetune_gpt_checkpoint_that_cannot_be_read_names_what_it_lacks(tmp_path, capsys):
    # A well-formed one is continued (tests/test_continuation.py); on main every one was refused.
    path = tmp_path / "ckpt_iter_40.pt"
    torch.save({"model_state_dict": {}, "model_args": {}, "iter_num": 40, "optimizer_state_dict": {}}, path)
    assert main(["train", "--resume_from_ckpt_path", str(path)]) == 2
    assert last_error(capsys) == f"error: {path}: model_args lacks n_layer, n_head, n_embd, block_size; found nothing"


def test_a_checkpoint_without_weights_or_config_still_rebuilds_its_model(full_run, tmp_path):
    # What a sharded checkpoint (FSDP, ZeRO-3) may look like: no model.safetensors, no config.json, no tokenizer.
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from hf_sft.tokenizer import load_tokenizer
    from hf_sft.training.checkpoints import CheckpointFiles
    from hf_sft.training.resume import load_from_checkpoint

    model = AutoModelForCausalLM.from_pretrained(full_run)
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    record = json.loads((full_run / "checkpoint-6" / RUN_ARGS_FILE).read_text())
    CheckpointFiles(record, load_tokenizer(full_run)).write(folder, model)
    assert json.loads((folder / RUN_ARGS_FILE).read_text()) == record
    no_flags = SimpleNamespace(bos_token=None, eos_token=None, pad_token=None, unk_token=None)
    rebuilt, tokenizer, base = load_from_checkpoint(folder, no_flags, use_lora=False)
    assert base == "a new model initialised from scratch"
    assert rebuilt.config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {"_name_or_path": ""}
    assert len(tokenizer) == len(load_tokenizer(full_run))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


NEW_LR = 5e-4


class SwitchPeakAtStep3(TrainerCallback):
    """The documented schedule of a new --learning_rate given on resume at step 3: from then on the run's own
    schedule (warmup, cosine, floor) with the new peak, at the same step."""

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == 3:
            lr_scheduler.base_lrs = [NEW_LR] * len(optimizer.param_groups)
            for group, fn in zip(optimizer.param_groups, lr_scheduler.lr_lambdas, strict=True):
                group["lr"] = NEW_LR * fn(lr_scheduler.last_epoch)
            lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # the rate Trainer logs


@pytest.fixture(scope="module")
def switched_run(full_run, tmp_path_factory) -> Path:
    """An uninterrupted run whose peak learning rate changes to NEW_LR after step 3."""
    out = tmp_path_factory.mktemp("switched") / "run"
    flags = ["--tokenizer_path", TOKENIZER, "--data_path", DATA, "--max_iters", "6", "--save_interval", "3"]
    assert run(*parse_args([*NEW_MODEL, *flags, "--out_dir", str(out)]), callbacks=[SwitchPeakAtStep3()]) == 0
    return out


@pytest.mark.parametrize("spelling", ["--learning_rate", "--learning-rate=", "yaml"])
def test_a_new_learning_rate_on_resume_follows_the_documented_schedule(full_run, switched_run, tmp_path, spelling):
    if spelling == "yaml":
        (tmp_path / "more.yaml").write_text(f"learning_rate: {NEW_LR}\n")
        flags = ["--config", str(tmp_path / "more.yaml")]
    else:
        flags = [f"{spelling}{NEW_LR}"] if spelling.endswith("=") else [spelling, str(NEW_LR)]
    out = resumed_from_3(full_run, tmp_path / "out", *flags)
    assert not same_weights(out, full_run)  # on main the restored optimizer won and these were equal
    assert same_weights(out, switched_run)
    assert logged_rates(out) == logged_rates(switched_run)
    assert logged_rates(out)[3] == pytest.approx(NEW_LR / 1e-3 * logged_rates(full_run)[3], rel=1e-12)  # step 4
    assert json.loads((out / "checkpoint-6" / RUN_ARGS_FILE).read_text())["values"]["learning_rate"] == NEW_LR
    assert f"| `learning_rate` | `{NEW_LR}` |" in (out / "README.md").read_text()


def logged_rates(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    return [entry["learning_rate"] for entry in history if "learning_rate" in entry]


@pytest.mark.parametrize("flags", [["--save_interval", "1"], ["--save_steps=1"], ["--save-steps", "1"]])
def test_a_new_checkpoint_interval_on_resume_takes_effect(full_run, tmp_path, flags):
    out = resumed_from_3(full_run, tmp_path / "out", *flags)
    # Trainer restores the interval from trainer_state.json: on main only checkpoint-6 was written.
    assert {"checkpoint-4", "checkpoint-5", "checkpoint-6"} <= {p.name for p in out.glob("checkpoint-*")}
    assert same_weights(out, full_run)  # the interval changes nothing else


def test_new_optimizer_settings_on_resume_reach_every_param_group(full_run, tmp_path):
    flags = ["--weight_decay", "0.3", "--beta2=0.9", "--adam_epsilon", "1e-6"]
    out = resumed_from_3(full_run, tmp_path / "out", *flags)
    groups = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)["param_groups"]
    before = torch.load(full_run / "checkpoint-6" / "optimizer.pt", weights_only=True)["param_groups"]
    assert [g["weight_decay"] for g in before] == [0.1, 0.0]  # Trainer's groups: decayed, then not decayed
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.9) and g["eps"] == 1e-6 for g in groups)
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in before]


@pytest.mark.parametrize(
    ("flags", "difference"),
    [
        (["--seed", "5"], "--seed 5 (the checkpoint's run: 0)"),
        (["--data_path", TOKENIZER], f"--data_path {TOKENIZER} (the checkpoint's run: {DATA})"),
        (["--lr_scheduler_type", "linear"], "--lr_scheduler_type linear (the checkpoint's run: cosine_with_min_lr)"),
        (["--eos_token", "[PAD]"], "--eos_token [PAD] (the checkpoint's run: None)"),
        (["--no_packing"], "--packing False (the checkpoint's run: True)"),
        (["--dropout=0.2"], "--dropout 0.2 (the checkpoint's run: 0.0)"),
    ],
)
def test_flags_a_resumed_run_keeps_are_refused_by_name(full_run, tmp_path, capsys, flags, difference):
    checkpoint = full_run / "checkpoint-3"
    out = tmp_path / "out"
    assert main(["train", "--resume_from_ckpt_path", str(checkpoint), "--out_dir", str(out), *flags]) == 2
    assert last_error(capsys) == (
        f"error: --resume_from_ckpt_path {checkpoint}: {difference}. A resumed run keeps its model, tokenizer, "
        "data, data order, batch layout, optimizer and schedule type; to change them, start a new run from its "
        f"weights with --pretrained_ckpt_path {checkpoint}"
    )
    assert not out.exists()


def test_max_iters_not_beyond_the_checkpoint_is_refused(full_run, tmp_path, capsys):
    argv = ["train", "--resume_from_ckpt_path", str(full_run / "checkpoint-3"), "--out_dir", str(tmp_path / "o")]
    assert main([*argv, "--max_iters", "3"]) == 2
    assert last_error(capsys) == "error: --max_iters 3 is not beyond the checkpoint's step 3: nothing is left to train"


def test_every_spelling_the_parser_lists_counts_as_given(tmp_path):
    """For every field, each option string `--help` lists (and `--x=v`, and a unique prefix) marks it given."""
    parser = build_parser()
    checked, yaml_only = 0, set()
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        value = [] if action.nargs == 0 else [_a_value(parser, action)]
        if value == [None]:  # a type argparse cannot build from text: the field can only be set in YAML
            yaml_only.add(action.dest)
            continue
        for option in action.option_strings:
            assert action.dest in given_fields([option, *value]), (option, value)
            if value:
                assert action.dest in given_fields([f"{option}={value[0]}"]), option
        checked += 1
    assert checked > 150  # every TrainingArguments field and ours
    assert yaml_only <= {"liger_kernel_config", "parallelism_config"}, yaml_only
    assert "learning_rate" in given_fields(["--learning_r", "1e-4"])  # argparse takes a unique prefix too
    assert given_fields(["--max_iters", "9", "--log_interval=2"]) >= {"max_steps", "logging_steps"}  # seed names
    (tmp_path / "c.yaml").write_text("max_iters: 9\nweight_decay: 0.0\n")
    assert given_fields(["--config", str(tmp_path / "c.yaml")]) >= {"config", "max_steps", "weight_decay"}


def _a_value(parser, action) -> str | None:
    """A value the flag's type accepts, or None."""
    candidates = ["1", "true", '{"a": 1}', "x"]
    if action.choices:
        candidates = [str(next(iter(action.choices)))]
    elif isinstance(action.type, type) and issubclass(action.type, Enum):
        candidates = [next(iter(action.type)).value]
    for text in candidates:
        try:
            parser.parse_known_args([action.option_strings[0], text])
            return text
        except Exception:  # noqa: BLE001 - try the next kind of value
            continue
    return None


def test_a_resumed_tied_model_reports_no_missing_head_and_saves_a_clean_tokenizer(tmp_path):
    """nanoGPT-style: the tied head is saved once, as the embedding; resuming re-ties it without a warning."""
    flags = ["--tokenizer_path", TOKENIZER, "--data_path", DATA, "--model_family", "nanogpt", "--max_iters", "4"]
    assert main(["train", *NEW_MODEL, *flags, "--save_interval", "2", "--out_dir", str(tmp_path / "full")]) == 0
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", out / "checkpoint-2")
    assert main(["train", "--resume_from_ckpt_path", str(out / "checkpoint-2")]) == 0
    log = (out / "train.log").read_text()  # transformers' warnings reach it too
    assert "resumed from checkpoint-2" in log and "missing keys" not in log
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(full[name], resumed[name]) for name in full)
    for folder in (out, out / "checkpoint-4"):  # the resumed run's tokenizer was loaded from its checkpoint
        assert not {"is_local", "local_files_only"} & json.loads((folder / "tokenizer_config.json").read_text()).keys()
