"""Training runs end to end on CPU: exact resume, accumulation and 2-process equivalence, preemption, final folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.ports import free_port
from helpers.runs import TINY, train
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sft import MODEL_CODE_FILES
from hf_sft.cli import main
from hf_sft.errors import UsageError
from hf_sft.training.checkpoints import COMPLETE_MARKER
from hf_sft.training.config import check_world_size

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "scripts" / "train.py")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path):
    flags = ["--max_iters", "8", "--save_interval", "4", "--batch_size", "2", "--gradient_accumulation_steps", "2"]
    assert train(tmp_path / "full", *flags) == 0
    assert (tmp_path / "full" / "checkpoint-4" / COMPLETE_MARKER).is_file()
    resume_from = str(tmp_path / "full" / "checkpoint-4")
    assert train(tmp_path / "resumed", *flags, "--resume_from_ckpt_path", resume_from) == 0
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    before = weights(tmp_path / "full" / "checkpoint-4")
    assert any(not torch.equal(before[n], full[n]) for n in full)  # steps 5-8 did change the weights


def test_accumulation_equals_one_large_batch_on_dolly(tmp_path, shared_dir):
    data = ["--data_path", str(shared_dir / "data/dolly/dolly_sample.jsonl"), "--max_seq_len", "256"]
    data += ["--tokenizer_path", str(shared_dir / "data/tokenizers/dolly_bpe_4k.json"), "--block_size", "256"]
    common = [*data, "--max_iters", "8", "--learning_rate", "1e-3", "--save_interval", "100"]
    assert train(tmp_path / "accum", *common, "--batch_size", "2", "--gradient_accumulation_steps", "2") == 0
    assert train(tmp_path / "large", *common, "--batch_size", "4", "--gradient_accumulation_steps", "1") == 0
    accum, large = weights(tmp_path / "accum"), weights(tmp_path / "large")
    for name in accum:
        torch.testing.assert_close(accum[name], large[name], atol=2e-5, rtol=0, msg=name)


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    flags = [*TINY, "--max_iters", "6", "--save_interval", "100", "--gradient_accumulation_steps", "1"]
    config = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"  # the config alone: no environment variable needed
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launch += ["--main_process_port", str(free_port())]
    two = subprocess.run(
        [*launch, TRAIN, *flags, "--batch_size", "2", "--out_dir", str(tmp_path / "two")],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "engine DDP | world size 2" in (tmp_path / "two" / "train.log").read_text()
    assert train(tmp_path / "one", "--max_iters", "6", "--save_interval", "100", "--gradient_accumulation_steps", "1",
                 "--batch_size", "4") == 0  # fmt: skip
    one, two_w = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(one[name], two_w[name], atol=1e-5, rtol=0, msg=name)


def test_processes_that_do_not_form_one_group_are_refused(monkeypatch):
    # What TrainingArguments reports when a launcher started 2 processes that did not join one process group.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="would train separately"):
        check_world_size(SimpleNamespace(world_size=1))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_world_size(SimpleNamespace(world_size=1))


def _start_long_run(out: Path, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, TRAIN, *TINY, "--out_dir", str(out), "--max_iters", "100000", *flags]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _logged_steps(out: Path) -> int:
    log = out / "train.log"
    steps = [int(line.split()[1].rstrip(":")) for line in log.read_text().splitlines() if line.startswith("step ")]
    return max(steps, default=0) if log.is_file() else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_exits_with_128_plus_the_signal(tmp_path, sig):
    out = tmp_path / "run"
    proc = _start_long_run(out, "--save_interval", "100000")
    try:
        _wait_for(lambda: (out / "train.log").is_file() and _logged_steps(out) >= 3)
        sent = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert time.monotonic() - sent < 60
    finally:
        proc.kill()
    stderr = proc.stderr.read()
    assert proc.returncode == 128 + sig, stderr[-2000:]  # 143 / 130: never mistaken for success
    checkpoints = [p for p in out.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    step = state["global_step"]
    assert step >= 3 and checkpoints[0].name == f"checkpoint-{step}"
    assert stderr.strip().splitlines()[-1] == (
        f"stopped by {sig.name} at step {step}: checkpoint saved in {checkpoints[0]}; "
        f"resume with: python {TRAIN} --resume_from_ckpt_path {checkpoints[0]}"
    )
    if sig == signal.SIGTERM:  # the printed command's flags (with a nearer end) continue the run
        python, script, *flags = stderr.strip().splitlines()[-1].split("resume with: ")[1].split()
        assert (python, script) == ("python", TRAIN)
        assert main(["train", *flags, "--max_iters", str(step + 2)]) == 0
        assert f"resumed from checkpoint-{step} (step {step} of {step + 2})" in (out / "train.log").read_text()


def test_sigkill_then_resume_latest_uses_newest_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start_long_run(out, "--save_interval", "2")
    try:
        _wait_for(lambda: len(list(out.glob(f"checkpoint-*/{COMPLETE_MARKER}"))) >= 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    complete = sorted(int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoint-*/{COMPLETE_MARKER}"))
    # A checkpoint that a crash interrupted mid-write: it has files but no completion mark.
    torn = out / "checkpoint-99999"
    torn.mkdir()
    (torn / "trainer_state.json").write_text("{")
    newest = complete[-1]
    log_before = len((out / "train.log").read_text())
    assert train(out, "--save_interval", "2", "--max_iters", str(newest + 2), "--resume_from_ckpt_path", "latest") == 0
    resumed_log = (out / "train.log").read_text()[log_before:]
    steps = [int(line.split()[1].rstrip(":")) for line in resumed_log.splitlines() if line.startswith("step ")]
    first_step = steps[0]
    assert first_step == newest + 1  # continued after the newest complete checkpoint, not from scratch
    state = json.loads((out / f"checkpoint-{newest + 2}" / "trainer_state.json").read_text())
    assert state["global_step"] == newest + 2
    assert not torn.exists()  # the torn checkpoint was cleaned away once a newer complete one existed


def test_final_folder_is_complete_and_loads_anywhere(tmp_path):
    out = tmp_path / "final"
    assert train(out, "--max_iters", "6", "--val_split", "0.1", "--eval_interval", "3", "--save_interval", "100") == 0
    expected = {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        *MODEL_CODE_FILES, "README.md", "loss.png", "train.log",
    }  # fmt: skip
    assert expected <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "final eval loss" in card and "n/a" not in card.split("## Results")[1].split("##")[0]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.generation_config.eos_token_id == model.config.eos_token_id
    assert json.loads((out / "config.json").read_text())["use_cache"] is True  # set for inference
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hi")["input_ids"][:1] == [tokenizer.bos_token_id]  # the seed format starts with BOS
    assert "## Prompt format" in card and "seed" in card
    log = (out / "train.log").read_text()
    assert "eval_loss" in log and "sample @ step" in log and "tokens_per_second" in log


def test_lora_run_saves_a_merged_plain_model(tmp_path):
    out = tmp_path / "lora"
    assert train(out, "--max_iters", "4", "--use_lora", "--lora_r", "4", "--save_interval", "100") == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_legacy_checkpoint_is_converted_on_the_fly(tmp_path, shared_dir):
    legacy = shared_dir / "data/legacy_checkpoints/nanogpt_bias_seedformat.pt"
    tokenizer = shared_dir / "data/tokenizers/dolly_bpe_4k.json"
    flags = ["--pretrained_ckpt_path", str(legacy), "--tokenizer_path", str(tokenizer), "--max_iters", "2"]
    assert train(tmp_path / "ft", *flags, "--save_interval", "100") == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    assert model.config.family == "nanogpt" and model.config.vocab_size == 4096


def test_bad_data_stops_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a"\n')
    assert train(tmp_path / "out", "--data_path", str(bad), "--max_iters", "2") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: invalid JSON" in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_bad_tokenizer_stops_before_training(tmp_path, capsys):
    bad = tmp_path / "tok.json"
    bad.write_text("{not json")
    assert train(tmp_path / "out", "--tokenizer_path", str(bad), "--max_iters", "2") == 2
    assert "tok.json" in capsys.readouterr().err


def test_field_map_reads_other_field_names(tmp_path):
    demo = Path(__file__).resolve().parents[1] / "hf_sft" / "demo" / "demo_sample.jsonl"
    renamed = tmp_path / "qa.jsonl"
    with renamed.open("w") as out:
        for line in demo.read_text().splitlines():
            record = json.loads(line)
            out.write(json.dumps({"question": record.pop("instruction"), "answer": record.pop("response")}) + "\n")
    flags = ["--data_path", str(renamed), "--max_iters", "1", "--save_interval", "100"]
    assert train(tmp_path / "unmapped", *flags) == 2  # no `instruction` field: refused before training
    assert train(tmp_path / "mapped", *flags, "--field_map", "instruction=question,output=answer") == 0
    assert (tmp_path / "mapped" / "model.safetensors").is_file()
