"""docs/scaling-out.md's several-machines launch, two machines on one host (gloo), equals one process: DDP, FSDP2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.ports import free_port
from test_training import TINY, TRAIN, subprocess_env, train, weights

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
STEPS = ["--max_iters", "6", "--save_interval", "3", "--gradient_accumulation_steps", "1"]
# engine -> (its CPU twin, model family, the engine line the log must show)
ENGINES = {
    "ddp": ("cpu_2proc.yaml", "llama", "engine DDP | world size 2"),
    "fsdp2": ("cpu_2proc_fsdp2.yaml", "nanogpt", "engine FSDP2 | world size 2 | sharding FULL_SHARD"),
}


def launch_two_machines(config: Path, out: Path, *flags: str) -> list[subprocess.CompletedProcess]:
    """`accelerate launch --num_machines 2 --machine_rank R ...` once per machine rank, both at once, one process each.

    The two "machines" share this host's file system, as nodes sharing a network file system do.
    """
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        cmd += ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
        cmd += [TRAIN, *TINY, "--batch_size", "2", "--out_dir", str(out), *flags]
        procs.append(
            subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_two_machines_equal_one_process_with_the_same_global_batch(engine, tmp_path):
    twin, family, engine_line = ENGINES[engine]
    out = tmp_path / "two_machines"
    results = launch_two_machines(CONFIGS / twin, out, "--model_family", family, *STEPS)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"machine {rank}: {result.stderr[-3000:]}"
    assert engine_line in (out / "train.log").read_text()
    assert train(tmp_path / "one", "--model_family", family, *STEPS, "--batch_size", "4") == 0
    two, one = weights(out), weights(tmp_path / "one")
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
