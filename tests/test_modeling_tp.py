"""Tensor parallelism through the config's `base_model_tp_plan`: two gloo processes give one process's logits."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.ports import free_port

from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM

HELPER = Path(__file__).parent / "helpers" / "tp_forward.py"
FAMILIES = {
    "nanogpt": {"family": "nanogpt"},
    "llama_gqa": {"family": "llama", "num_key_value_heads": 2, "multiple_of": 16},
}


def test_plan_names_existing_modules_and_splits_each_pair_once():
    for fields in FAMILIES.values():
        model = HfSftGPTForCausalLM(HfSftGPTConfig(vocab_size=97, hidden_size=32, num_attention_heads=4, **fields))
        names = {name for name, _ in model.model.named_modules()}
        plan = model.config.base_model_tp_plan
        for pattern, style in plan.items():
            assert style in ("colwise", "rowwise")
            assert pattern.replace("*", "0") in names, pattern
        assert ("layers.*.mlp.gate_proj" in plan) == (fields["family"] == "llama")
        assert "base_model_tp_plan" not in model.config.to_dict()
        # What a column-split layer produces, a row-split one consumes: attention and MLP each end in a rowwise.
        assert [style for key, style in plan.items() if "self_attn" in key] == ["colwise"] * 3 + ["rowwise"]
        assert plan["layers.*.mlp.down_proj"] == "rowwise"


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_two_process_tensor_parallel_forward_equals_one_process(name, tmp_path):
    torch.manual_seed(0)
    config = HfSftGPTConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **FAMILIES[name]
    )
    model = HfSftGPTForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "model")
    input_ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    port = str(free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    args = [str(HELPER), str(tmp_path / "model"), str(tmp_path / "input_ids.pt"), str(tmp_path / "out.pt")]
    proc = subprocess.run([*torchrun, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["world_size"] == 2
    assert out["shapes"]["q_proj"] == (16, 32) and out["shapes"]["o_proj"] == (32, 16)  # really split in two
    assert out["shapes"]["up_proj"][0] == config.intermediate_size // 2
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(input_ids).logits, atol=1e-5, rtol=1e-5)
    shutil.rmtree(tmp_path / "model")
