"""Back to the pretraining code's own checkpoint format, so the user's old inference scripts keep working.

- nanoGPT-style: `{"model_state_dict", "model_args"}` as `finetune_gpt.py` saves it, with nanoGPT `GPT` keys (fused
  `c_attn` = [Q; K; V], `lm_head.weight` sharing the tensor of a tied `transformer.wte.weight`).
- LLaMA-style: `{"model_state_dict", "config"}` as simple_llama's `train.py` saves it, with `LLaMaTransformer` keys
  (fused `qkv_linear` interleaved per head, q/k rows in the adjacent-pairs rotary order); `config` carries the
  `TrainingConfig` fields the model is built from, readable as attributes.

This is the exact inverse of `hf_sft.legacy`: converting the written file gives back the same model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hf_sft.configuration_hfsft_gpt import swiglu_hidden_size
from hf_sft.errors import UsageError
from hf_sft.export.targets import blockers

NANOGPT_NORM_EPS = 1e-5  # nanoGPT's LayerNorm hard-codes it


def _nanogpt_blockers(config) -> list[str]:
    found = blockers(config, "gpt2")
    if config.intermediate_size != 4 * config.hidden_size:
        found.append(
            f"an MLP of width {config.intermediate_size} (nanoGPT's is 4 x n_embd = {4 * config.hidden_size})"
        )
    if config.norm_eps != NANOGPT_NORM_EPS:
        found.append(f"norm_eps {config.norm_eps} (nanoGPT's LayerNorm uses {NANOGPT_NORM_EPS})")
    return found


def _simple_llama_blockers(config) -> list[str]:
    found = blockers(config, "llama")
    if config.use_bias:
        found.append("biases (simple_llama has none)")
    if config.num_key_value_heads != config.num_attention_heads:
        found.append("grouped-query attention (simple_llama's fused qkv has one key/value head per query head)")
    rope_type = getattr(config, "rope_parameters", {}).get("rope_type", "default")  # learned positions have none
    if rope_type != "default":
        found.append(f"{rope_type!r} rotary scaling (simple_llama has plain rotary)")
    if _multiple_of(config) is None:
        found.append(f"a SwiGLU width of {config.intermediate_size}, below simple_llama's smallest")
    return found


def legacy_layout(config, where: str | Path = "the model") -> str:
    """`"nanogpt"` or `"simple_llama"`: the legacy code that can run this model.

    Raises:
        UsageError: neither can, naming the features that prevent the layout of the model's family.
    """
    nanogpt, simple_llama = _nanogpt_blockers(config), _simple_llama_blockers(config)
    if not nanogpt:
        return "nanogpt"
    if not simple_llama:
        return "simple_llama"
    name, found = ("simple_llama", simple_llama) if config.family == "llama" else ("nanoGPT", nanogpt)
    raise UsageError(f"cannot export {where} to legacy-pt: {name}'s model has no equivalent for {', '.join(found)}")


def export_legacy(model, layout: str, out: Path, mask_buffers: bool = False) -> None:
    """Write `model` as a legacy checkpoint file (see the module docstring).

    Args:
        model: an `HfSftGPTForCausalLM`.
        layout: `legacy_layout(model.config)`.
        out: the `.pt` file to write (the temporary file `hf_sft.writer.new_file` hands out).
        mask_buffers: nanoGPT only: also write the `attn.bias` causal masks nanoGPT saves without flash attention.
    """
    if layout == "nanogpt":
        checkpoint = {"model_state_dict": nanogpt_state_dict(model, mask_buffers), "model_args": nanogpt_args(model)}
    else:
        checkpoint = {"model_state_dict": simple_llama_state_dict(model), "config": simple_llama_config(model)}
    torch.save(checkpoint, out)


def nanogpt_args(model) -> dict:
    """nanoGPT's `model_args` (the `GPTConfig` fields)."""
    config = model.config
    return {
        "n_layer": config.num_hidden_layers,
        "n_head": config.num_attention_heads,
        "n_embd": config.hidden_size,
        "block_size": config.max_position_embeddings,
        "bias": config.use_bias,
        "vocab_size": config.vocab_size,
        "dropout": config.hidden_dropout,
    }


def nanogpt_state_dict(model, mask_buffers: bool = False) -> dict[str, torch.Tensor]:
    """Weights under nanoGPT `GPT` names, in its `state_dict()` order."""
    config, sd = model.config, _detached(model)
    params = ("weight", "bias") if config.use_bias else ("weight",)
    block_size = config.max_position_embeddings
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"]}
    out["transformer.wpe.weight"] = sd["model.embed_positions.weight"]
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        out |= {f"{dst}ln_1.{p}": sd[f"{src}input_layernorm.{p}"] for p in params}
        if mask_buffers:
            out[f"{dst}attn.bias"] = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        for p in params:
            out[f"{dst}attn.c_attn.{p}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])
        out |= {f"{dst}attn.c_proj.{p}": sd[f"{src}self_attn.o_proj.{p}"] for p in params}
        out |= {f"{dst}ln_2.{p}": sd[f"{src}post_attention_layernorm.{p}"] for p in params}
        out |= {f"{dst}mlp.c_fc.{p}": sd[f"{src}mlp.up_proj.{p}"] for p in params}
        out |= {f"{dst}mlp.c_proj.{p}": sd[f"{src}mlp.down_proj.{p}"] for p in params}
    out |= {f"transformer.ln_f.{p}": sd[f"model.norm.{p}"] for p in params}
    # nanoGPT ties by sharing one Parameter: the saved file holds one tensor under both names.
    out["lm_head.weight"] = out["transformer.wte.weight"] if config.tie_word_embeddings else sd["lm_head.weight"]
    return out


def simple_llama_config(model) -> argparse.Namespace:
    """The simple_llama `TrainingConfig` fields that shape the model, as an attribute-access record."""
    config = model.config
    return argparse.Namespace(
        n_embd=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_layers=config.num_hidden_layers,
        multiple_of=_multiple_of(config),
        eps=config.norm_eps,
        theta=config.rope_theta,
        max_seq_len=config.max_position_embeddings,
        dropout=config.hidden_dropout,
        use_mla=False,
        vocab_size=config.vocab_size,
    )


def simple_llama_state_dict(model) -> dict[str, torch.Tensor]:
    """Weights under simple_llama `LLaMaTransformer` names, in its `state_dict()` order."""
    config, sd = model.config, _detached(model)
    out = {"embeddings.weight": sd["model.embed_tokens.weight"]}
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"decoder_blocks.{i}."
        qkv = [sd[f"{src}self_attn.{x}_proj.weight"] for x in "qkv"]
        out |= {
            f"{dst}attention.qkv_linear.weight": fuse_interleaved_qkv(*qkv, heads=config.num_attention_heads),
            f"{dst}attention.out.weight": sd[f"{src}self_attn.o_proj.weight"],
            f"{dst}ffwd.w1.weight": sd[f"{src}mlp.gate_proj.weight"],
            f"{dst}ffwd.w2.weight": sd[f"{src}mlp.down_proj.weight"],
            f"{dst}ffwd.w3.weight": sd[f"{src}mlp.up_proj.weight"],
            f"{dst}norm1.weight": sd[f"{src}input_layernorm.weight"],
            f"{dst}norm2.weight": sd[f"{src}post_attention_layernorm.weight"],
        }
    out["norm.weight"] = sd["model.norm.weight"]
    # simple_llama's head is its own Linear: a tied model gets a copy of the embedding there.
    out["final_linear.weight"] = sd["lm_head.weight"].clone()
    return out


def fuse_interleaved_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `hf_sft.legacy.split_interleaved_qkv`: q, k, v (D, D) -> simple_llama's fused (3 * D, D).

    Each head's q/k rows go from rotate-half order ([evens; odds]) back to adjacent pairs, then the rows are
    interleaved per head as [q_h; k_h; v_h].
    """
    d_in = q.shape[1]
    q, k = (t.view(heads, 2, -1, d_in).transpose(1, 2).reshape(heads, -1, d_in) for t in (q, k))  # (nh, hs, D)
    v = v.view(heads, -1, d_in)
    return torch.stack((q, k, v), dim=1).reshape(-1, d_in)  # (nh, 3, hs, D) -> (3 * D, D)


def _multiple_of(config) -> int | None:
    """A `multiple_of` for which simple_llama's rounding gives this model's SwiGLU width, if there is one."""
    width = config.intermediate_size
    for candidate in (config.multiple_of, width):
        if candidate and swiglu_hidden_size(config.hidden_size, candidate) == width:
            return candidate
    return None


def _detached(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}
