"""FSDP2 and DeepSpeed ZeRO-2/3 on two CPU processes (gloo, fp32) equal one process, resume exactly, save whole."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from helpers.ports import free_port
from test_training import TINY, TRAIN, subprocess_env, train, weights
from transformers import AutoModelForCausalLM

from hf_sft import MODEL_CODE_FILES
from hf_sft.cli import main
from hf_sft.training import engines
from hf_sft.training.checkpoints import COMPLETE_MARKER

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
PROBE = Path(__file__).resolve().parent / "helpers" / "rank0_logits"  # saves rank 0's logits after training
PROBE_IDS = torch.arange(3, 35).unsqueeze(0)  # the tokens the probe feeds
STEPS = ["--max_iters", "8", "--save_interval", "4", "--gradient_accumulation_steps", "1"]
# run -> (its CPU twin, extra `accelerate launch` flags, the engine line its log must show)
ENGINES = {
    "fsdp2": ("cpu_2proc_fsdp2.yaml", [], "engine FSDP2 | world size 2 | sharding FULL_SHARD | state dict SHARDED"),
    "fsdp2_full": (  # the other FSDP options users set: full state dicts, activation checkpointing through FSDP
        "cpu_2proc_fsdp2.yaml",
        ["--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_activation_checkpointing", "true"],
        "engine FSDP2 | world size 2 | sharding FULL_SHARD | state dict FULL | activation checkpointing",
    ),
    "zero2": ("cpu_2proc_zero2.yaml", [], "engine DeepSpeed ZeRO-2 | world size 2"),
    "zero3": ("cpu_2proc_zero3.yaml", [], "engine DeepSpeed ZeRO-3 | world size 2"),
}
# Both model families under every engine (llama: untied head; nanogpt: tied head). One launch each, shared by tests.
RUNS = [
    ("fsdp2", "llama"), ("fsdp2_full", "nanogpt"), ("zero2", "llama"), ("zero2", "nanogpt"), ("zero3", "llama"),
    ("zero3", "nanogpt"),
]  # fmt: skip
STOCK = {"llama": "llama", "nanogpt": "gpt2"}  # `hf-sft export --to` for each family
# The files a checkpoint needs to say which model it holds, whatever the engine wrote beside them.
MODEL_FILES = {"config.json", *MODEL_CODE_FILES, "tokenizer.json"}


def launch(
    engine: str, out: Path, *flags: str, config: Path | None = None, logits: Path | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <twin> scripts/train.py --device cpu --batch_size 2 ...`, as users run it."""
    twin, launch_flags, _ = ENGINES[engine]
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROBE), env.get("PYTHONPATH")) if p)
    if logits is not None:
        env["HF_SFT_RANK0_LOGITS"] = str(logits)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config or CONFIGS / twin)]
    cmd += [*launch_flags, "--main_process_port", str(free_port()), TRAIN, *TINY, "--batch_size", "2"]
    return subprocess.run([*cmd, "--out_dir", str(out), *flags], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run at most once per module: `runs(engine, family)` -> its output folder (engine "one": 1 process)."""
    root = tmp_path_factory.mktemp("scaleout")
    done: dict[tuple[str, str], Path] = {}

    def get(engine: str, family: str) -> Path:
        if (engine, family) not in done:
            out = root / f"{engine}-{family}"
            if engine == "one":
                assert train(out, "--model_family", family, *STEPS, "--batch_size", "4") == 0
            else:
                result = launch(engine, out, "--model_family", family, *STEPS, logits=out / "rank0_logits.pt")
                assert result.returncode == 0, result.stderr[-3000:]
            done[engine, family] = out
        return done[engine, family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "family"), RUNS)
def test_engine_on_two_processes_equals_one_process(runs, engine, family):
    out, one = runs(engine, family), runs("one", family)
    assert ENGINES[engine][2] in (out / "train.log").read_text()
    sharded, reference = weights(out), weights(one)
    assert sharded.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(sharded[name], reference[name], atol=1e-5, rtol=0, msg=name)
    for checkpoint in (out / "checkpoint-4", out / "checkpoint-8"):
        assert not list(checkpoint.glob("_fsdp*.py"))  # no torch source files copied in by FSDP2's model class
        assert MODEL_FILES <= {p.name for p in checkpoint.iterdir()}
        auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForCausalLM"] == "modeling_hfsft_gpt.HfSftGPTForCausalLM"


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "family"), RUNS)
def test_final_folder_loads_in_one_process_with_rank0_logits(runs, engine, family, tmp_path):
    out = runs(engine, family)
    assert {p.name for p in out.glob("*.py")} == set(MODEL_CODE_FILES)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # a plain process, no accelerate
    with torch.no_grad():
        logits = model(input_ids=PROBE_IDS).logits
    # The gathered weights are exact copies and the forward is the same fp32 code: equal (measured: 0.0).
    torch.testing.assert_close(logits, torch.load(out / "rank0_logits.pt"), atol=1e-6, rtol=0)
    stock = tmp_path / "stock"
    assert main(["export", str(out), "--to", STOCK[family], "--out", str(stock)]) == 0  # a finished folder
    with torch.no_grad():
        stock_logits = AutoModelForCausalLM.from_pretrained(stock)(input_ids=PROBE_IDS).logits
    torch.testing.assert_close(stock_logits, logits, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "family", "weights_files"),
    [
        ("fsdp2", "llama", "pytorch_model_fsdp_0/*.distcp"),  # sharded: one file per rank
        ("zero3", "llama", "global_step4/*_model_states.pt"),  # sharded: one file per rank
        ("fsdp2_full", "nanogpt", "pytorch_model_fsdp.bin"),  # full
    ],
)
def test_checkpoint_resumes_bit_identical(runs, engine, family, weights_files, tmp_path):
    full = runs(engine, family)
    checkpoint = full / "checkpoint-4"
    assert len(list(checkpoint.glob(weights_files))) == (1 if engine == "fsdp2_full" else 2)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-4")
    result = launch(engine, resumed, "--model_family", family, *STEPS, "--resume_from_ckpt_path", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from checkpoint-4 (step 4 of 8)" in (resumed / "train.log").read_text()
    assert (resumed / "checkpoint-8" / COMPLETE_MARKER).is_file()
    before, after = weights(full), weights(resumed)
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.slow
def test_fsdp_that_would_fall_back_to_ddp_is_refused(tmp_path):
    # hf_sft runs FSDP on CPU as FSDP2 only; stock accelerate turns this FSDP1 launch into DDP, silently.
    settings = yaml.safe_load((CONFIGS / "cpu_2proc_fsdp2.yaml").read_text())
    settings["fsdp_config"]["fsdp_version"] = 1
    config = tmp_path / "fsdp1.yaml"
    config.write_text(yaml.safe_dump(settings))
    result = launch("fsdp2", tmp_path / "out", "--max_iters", "2", config=config)
    assert result.returncode != 0
    # Each rank stops with one line; the only traceback left is the launcher's report that its workers failed.
    assert result.stderr.count("error: the launch asked for FSDP but got DDP | world size 2: not training") == 2
    assert f'File "{REPO / "hf_sft"}' not in result.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_fsdp_in_a_single_process_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert train(tmp_path / "out", "--max_iters", "2") == 2
    assert "the launch asked for FSDP but got single process | world size 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true"}, ["--use_lora"], "--use_lora is not supported under FSDP"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["--use_lora"], "--use_lora is not supported under DEEPSPEED"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
            [],
            "on CPU the weights are host memory already",
        ),
    ],
)
def test_engine_settings_that_cannot_work_are_refused_before_any_work(
    tmp_path, monkeypatch, capsys, env, flags, message
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert train(tmp_path / "out", "--max_iters", "2", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "train.log").exists()  # refused before the run started


@pytest.mark.parametrize(("use_cpu", "world_size"), [(False, 2), (True, 1)])
def test_accelerate_is_left_alone_on_gpus_and_in_one_process(monkeypatch, use_cpu, world_size):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    original = AcceleratorState.__init__
    run = SimpleNamespace(use_cpu=use_cpu, world_size=world_size, deepspeed=None, fsdp="", fsdp_config=None)
    engines.enable_on_cpu(run)
    assert AcceleratorState.__init__ is original


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_cpu_twins_have_the_engine_settings_of_their_gpu_config(engine):
    gpu = yaml.safe_load((CONFIGS / f"{engine}.yaml").read_text())
    cpu = yaml.safe_load((CONFIGS / f"cpu_2proc_{engine}.yaml").read_text())
    assert cpu["use_cpu"] is True and gpu["use_cpu"] is False
    assert cpu["distributed_type"] == gpu["distributed_type"]
    key = "fsdp_config" if engine.startswith("fsdp") else "deepspeed_config"
    # On GPUs a pretrained model is read on rank 0 only and sent to the others; on CPU that is refused.
    host_only = {"fsdp_cpu_ram_efficient_loading", "fsdp_sync_module_states"}
    assert {k: v for k, v in cpu[key].items() if k not in host_only} == {
        k: v for k, v in gpu[key].items() if k not in host_only
    }


def test_every_accelerate_config_opens_with_its_command_and_says_whether_it_is_tested():
    for path in sorted(CONFIGS.glob("*.yaml")):
        header = path.read_text().split("compute_environment")[0]
        assert f"accelerate launch --config_file configs/accelerate/{path.name} scripts/train.py" in header, path
        if path.name.startswith("cpu_2proc"):
            assert "tests/test_" in header, path  # names the test that runs it
        else:
            assert "Untested" in header, path
