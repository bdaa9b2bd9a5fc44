"""One rank of a tensor-parallel forward: `torchrun --nproc_per_node 2 tp_forward.py FOLDER INPUT_IDS OUT`.

Loads FOLDER with `tp_plan="auto"` (gloo on CPU), runs the saved input ids and, on rank 0, saves the logits and the
local shapes of a few sharded weights.
"""

import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_sft  # noqa: F401  (registers the model with the Auto classes)


def main(folder: str, input_path: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.load(input_path)).logits
    layer = model.model.layers[0]
    shapes = {
        name: tuple(getattr(weight, "to_local", lambda w=weight: w)().shape)
        for name, weight in (
            ("q_proj", layer.self_attn.q_proj.weight),
            ("o_proj", layer.self_attn.o_proj.weight),
            ("up_proj", layer.mlp.up_proj.weight),
            ("down_proj", layer.mlp.down_proj.weight),
        )
    }
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "shapes": shapes, "world_size": dist.get_world_size()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # As `hf-sft train` ends a launched process (hf_sft.cli): skip the C++ teardown that can abort a finished rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
