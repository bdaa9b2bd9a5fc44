"""Rotary positions match stock Llama for every rope type of the installed transformers; learned ones carry none."""

import json
import logging

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
from hf_sft.export.stock import to_stock

MAX_POSITIONS, ORIGINAL = 64, 32
HEAD_DIM = 8
# Settings per rope type; a type that a newer transformers adds without an entry here runs with none and fails loudly.
SETTINGS = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 2.0, "original_max_position_embeddings": ORIGINAL},
    "llama3": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    },
    "longrope": {
        "short_factor": [1.0, 1.1, 1.3, 1.6],
        "long_factor": [1.5, 2.0, 3.0, 4.0],
        "original_max_position_embeddings": ORIGINAL,
    },
    "proportional": {"factor": 2.0},
}
ROPE_TYPES = ["default", *ROPE_INIT_FUNCTIONS]


def llama_config(rope_type: str) -> HfSftGPTConfig:
    return HfSftGPTConfig(
        family="llama",
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=32 // HEAD_DIM,
        multiple_of=16,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=500.0,
        rope_parameters={"rope_type": rope_type, **SETTINGS.get(rope_type, {})},
    )


def stock_rotary(config: HfSftGPTConfig) -> LlamaRotaryEmbedding:
    stock = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters),
    )
    return LlamaRotaryEmbedding(stock)


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_cos_sin_equal_stock_llama_including_past_the_trained_length(rope_type):
    config = llama_config(rope_type)
    ours = HfSftGPTForCausalLM(config).model.rotary_emb
    stock = stock_rotary(config)
    assert ours.attention_scaling == pytest.approx(stock.attention_scaling)
    x = torch.zeros(1, 1, dtype=torch.float32)
    # Short, then beyond max_position_embeddings (dynamic types grow), then short again (they reset).
    for length in (16, 2 * MAX_POSITIONS, 16):
        positions = torch.arange(length)[None]
        for a, b in zip(ours(x, positions), stock(x, positions), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if rope_type != "default":  # scaling really changes the tables (the bug this guards against: it was ignored)
        plain = HfSftGPTForCausalLM(llama_config("default")).model.rotary_emb
        positions = torch.arange(2 * MAX_POSITIONS)[None]
        assert not torch.equal(ours(x, positions)[0], plain(x, positions)[0])


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_logits_equal_stock_llama_built_from_the_same_config(rope_type):
    torch.manual_seed(0)
    model = HfSftGPTForCausalLM(llama_config(rope_type)).eval()
    stock = to_stock(model, "llama")
    assert stock.config.rope_parameters == model.config.rope_parameters
    input_ids = torch.randint(3, 97, (2, MAX_POSITIONS + 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, stock(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_rope_settings_survive_save_and_load(tmp_path):
    model = HfSftGPTForCausalLM(llama_config("yarn"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert saved == {"rope_type": "yarn", "rope_theta": 500.0, **SETTINGS["yarn"]}
    loaded = HfSftGPTForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert loaded.model.rotary_emb.attention_scaling == model.model.rotary_emb.attention_scaling


def test_an_unknown_rope_type_is_refused_with_the_supported_ones():
    with pytest.raises(ValueError, match=r"rope_type 'warp'.*default, linear"):
        llama_config("warp")


def test_learned_positions_carry_no_rope_settings_and_old_folders_still_load(tmp_path, caplog):
    config = HfSftGPTConfig(
        family="nanogpt", vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4
    )
    assert not hasattr(config, "rope_parameters") and not hasattr(config, "rope_theta")
    HfSftGPTForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in saved and "rope_theta" not in saved
    # Folders saved by earlier versions carry the key: they load, without it and without a word.
    saved["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING):
        loaded = HfSftGPTForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(loaded.config, "rope_parameters")
    assert not [r for r in caplog.records if "rope" in r.getMessage().lower()]
