"""What sealing and verifying a checkpoint cost for a GPT-2-small-sized model (124M parameters, nanoGPT family).

Writes a checkpoint folder the way Trainer does (safetensors weights, AdamW state after one step, scheduler, RNG
state, trainer state), then times `seal` (hashes every file) and `problem` (every check a resume makes, the hashes
and the state files' pickle scan included), each read twice: once right after writing (page cache warm, as when
the run seals its own checkpoint), once more. Prints one line per figure and a last line of key=value fields.

    python3 scripts/benchmark_checkpoint_verify.py [--work /tmp/ckpt-bench]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
from hf_sft.training.checkpoints import problem, seal


def write_checkpoint(folder: Path) -> int:
    config = HfSftGPTConfig(
        family="nanogpt", vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=1024,
    )  # fmt: skip
    model = HfSftGPTForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(
        torch.randint(0, config.vocab_size, (1, 16)), labels=torch.randint(0, config.vocab_size, (1, 16))
    ).loss.backward()
    optimizer.step()
    scheduler.step()
    folder.mkdir(parents=True)
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(weights, folder / "model.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    torch.save(rng, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    return sum(p.numel() for p in model.parameters())


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf_sft_checkpoint_bench"))
    work = parser.parse_args().work
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "checkpoint-1"
    parameters = write_checkpoint(folder)
    size = sum(p.stat().st_size for p in folder.iterdir())
    seal_s = timed(lambda: seal(folder, 1))
    verify_s = [timed(lambda: problem(folder)) for _ in range(2)]
    assert problem(folder) is None
    print(f"parameters {parameters / 1e6:.1f}M | checkpoint {size / 2**20:.0f} MiB")
    print(f"seal (hash every file) {seal_s:.2f} s | verify {verify_s[0]:.2f} s, again {verify_s[1]:.2f} s")
    rate = size / 2**20 / min(verify_s)
    fields = {"params_m": f"{parameters / 1e6:.1f}", "size_mib": f"{size / 2**20:.0f}", "seal_s": f"{seal_s:.2f}"}
    fields |= {"verify_s": f"{min(verify_s):.2f}", "mib_per_s": f"{rate:.0f}"}
    print(" ".join(f"{key}={value}" for key, value in fields.items()))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
