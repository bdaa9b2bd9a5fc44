"""The run's configuration is resolved once, by `resolve_run`: command line + YAML + checkpoint + machine."""

import os
import shutil

import pytest
from helpers.runs import TINY, train

from hf_sft.demo import DEMO_DATA
from hf_sft.errors import UsageError
from hf_sft.training.config import RunConfig, resolve_run
from hf_sft.training.resume import RUN_ARGS_FILE


def test_resolve_run_turns_a_command_line_into_the_arguments_the_run_uses(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "out"
    argv = [*TINY, "--out_dir", str(out), "--min_lr", "1e-4", "--save_total_limit", "2", "--hub_token", "hf_secret"]
    config = resolve_run(argv)
    assert isinstance(config, RunConfig) and config.resume is None and config.engine is None
    args = config.training
    assert args.use_cpu and not args.bf16 and not args.fp16  # the machine: CPU, fp32
    assert args.lr_scheduler_kwargs == {"min_lr_rate": pytest.approx(0.1)}  # 1e-4 of the demo's 1e-3, as a rate
    # Rotation is the run's Trainer's, once a new checkpoint is in place; the token stays off the pickled arguments.
    assert args.save_total_limit is None and config.keep_checkpoints == 2
    assert args.hub_token is None and config.hub_token == "hf_secret" and "hf_secret" not in repr(config)
    assert config.data.data_path == str(DEMO_DATA)
    assert config.record["shape"]["n_layer"] == 2 and "hub_token" not in config.record["values"]
    # Resolving writes nothing: no folder, no token in the environment.
    assert not out.exists() and "HF_TOKEN" not in os.environ


def test_resolve_run_refuses_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="--batch_size must be at least 1, got 0"):
        resolve_run([*TINY, "--out_dir", str(tmp_path / "out"), "--batch_size", "0"])
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_is_resolved_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--max_iters", "4", "--save_interval", "2", "--weight_decay", "0.05") == 0
    config = resolve_run(["--resume_from_ckpt_path", "latest", "--out_dir", str(out), "--max_iters", "6"])
    assert config.resume == str(out / "checkpoint-4") and (out / "checkpoint-4" / RUN_ARGS_FILE).is_file()
    # What the checkpoint recorded fills what the command line does not give; what it gives wins.
    assert config.training.weight_decay == 0.05 and config.model.n_layer == 2 and config.training.max_steps == 6
    shutil.rmtree(out / "checkpoint-4")
    assert resolve_run(["--resume_from_ckpt_path", "latest", "--out_dir", str(out)]).resume == str(
        out / "checkpoint-2"
    )


@pytest.mark.parametrize(
    ("flags", "examples", "warned"),
    [
        (["--batch_size", "2", "--gradient_accumulation_steps", "8", "--warmup_steps", "0"], 8, ["4 batch(es)"]),
        (["--batch_size", "2", "--gradient_accumulation_steps", "4", "--warmup_steps", "0"], 8, []),
        (["--max_iters", "5", "--warmup_steps", "20"], 100, ["run's 5 optimizer"]),
        (["--num_epochs", "2", "--batch_size", "4", "--warmup_steps", "11"], 20, ["5 batch(es)", "run's 2 optimizer"]),
        (["--max_iters", "5", "--warmup_steps", "5", "--gradient_accumulation_steps", "1"], 100, []),
        (["--max_iters", "5", "--warmup_steps", "0.5", "--gradient_accumulation_steps", "1"], 100, []),  # a ratio
    ],
)
def test_one_line_warns_when_accumulation_or_warmup_outlasts_the_data(tmp_path, caplog, flags, examples, warned):
    from hf_sft.training.arguments import parse_args
    from hf_sft.training.config import warn_about_the_schedule

    args = parse_args(["--out_dir", str(tmp_path), "--device", "cpu", *flags])[2]
    with caplog.at_level("WARNING", logger="hf_sft.train"):
        warn_about_the_schedule(args, examples)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == len(warned) and all(part in line for part, line in zip(warned, lines, strict=True)), lines


@pytest.mark.parametrize("native", [True, False])
def test_cpu_precision_is_fp32_unless_bf16_is_asked_and_warns_where_the_cpu_lacks_it(
    native, tmp_path, monkeypatch, caplog
):
    import torch

    flags = {"avx512_bf16": native, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    assert not resolve_run([*TINY, "--out_dir", str(tmp_path / "a")]).training.bf16  # never chosen by itself
    with caplog.at_level("WARNING", logger="hf_sft.train"):
        assert resolve_run([*TINY, "--out_dir", str(tmp_path / "b"), "--dtype", "bfloat16"]).training.bf16
    assert ("lacks native bf16" in caplog.text) is not native
