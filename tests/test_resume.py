"""--resume_from_ckpt_path alone continues a run exactly; shape changes and seed-format files get one clear line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_sft.cli import main
from hf_sft.training.resume import RUN_ARGS_FILE

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
        "max_seq_len and batch layout; to change them, start a new run with --pretrained_ckpt_path"
    )
    assert not (tmp_path / "out").exists()


def test_a_seed_pretraining_checkpoint_is_pointed_to_pretrained_ckpt_path(shared_dir, capsys):
    seed = shared_dir / "data" / "legacy_checkpoints" / "nanogpt_bias_seedformat.pt"
    assert main(["train", "--resume_from_ckpt_path", str(seed)]) == 2
    assert last_error(capsys) == (
        f"error: --resume_from_ckpt_path {seed} is a pretraining checkpoint, not a checkpoint folder of a "
        f"fine-tuning run: to fine-tune from it pass --pretrained_ckpt_path {seed}"
    )


def test_a_finetune_gpt_checkpoint_with_optimizer_state_is_explained(tmp_path, capsys):
    path = tmp_path / "ckpt_iter_40.pt"
    torch.save({"model_state_dict": {}, "model_args": {}, "iter_num": 40, "optimizer_state_dict": {}}, path)
    assert main(["train", "--resume_from_ckpt_path", str(path)]) == 2
    assert last_error(capsys) == (
        f"error: --resume_from_ckpt_path {path} is a finetune_gpt.py checkpoint (iteration 40): its optimizer "
        "state and data position cannot be continued by this trainer; fine-tune its weights further with "
        f"--pretrained_ckpt_path {path}"
    )


def test_a_checkpoint_without_weights_or_config_still_rebuilds_its_model(full_run, tmp_path):
    # What a sharded checkpoint (FSDP, ZeRO-3) may look like: no model.safetensors, no config.json, no tokenizer.
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from hf_sft.tokenizer import load_tokenizer
    from hf_sft.training.resume import RunRecordCallback, load_from_checkpoint

    model = AutoModelForCausalLM.from_pretrained(full_run)
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    record = json.loads((full_run / "checkpoint-6" / RUN_ARGS_FILE).read_text())
    state = SimpleNamespace(global_step=7, is_world_process_zero=True)
    RunRecordCallback(record).on_save(
        SimpleNamespace(output_dir=str(tmp_path)), state, None, model=model, processing_class=load_tokenizer(full_run)
    )
    assert json.loads((folder / RUN_ARGS_FILE).read_text()) == record
    no_flags = SimpleNamespace(bos_token=None, eos_token=None, pad_token=None, unk_token=None)
    rebuilt, tokenizer, base = load_from_checkpoint(folder, no_flags, use_lora=False)
    assert base == "a new model initialised from scratch"
    assert rebuilt.config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {"_name_or_path": ""}
    assert len(tokenizer) == len(load_tokenizer(full_run))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


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
