"""Which weight of a legacy checkpoint becomes which of ours: one explicit plan per family.

Each plan lists checkpoint key -> model keys and how to split or permute the tensor, so that a missing key, a
left-over key or a wrong shape is reported under the checkpoint's own name before anything is loaded, and so that
tensors shaped like the weights (AdamW's moments) follow the same map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
from hf_sft.errors import UsageError
from hf_sft.legacy_checkpoint import LegacyCheckpoint, describe
from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM

# (checkpoint key, model keys, transform of the checkpoint tensor into the model tensors)
Plan = list[tuple[str, tuple[str, ...], Callable[[torch.Tensor], tuple[torch.Tensor, ...]]]]


def convert_state_dict(checkpoint: LegacyCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under `HfSftGPTForCausalLM` names, fused projections split, in float32.

    Raises:
        UsageError: naming the checkpoint keys that are missing, left over, or of the wrong shape.
    """
    config, state_dict = checkpoint.config, checkpoint.state_dict
    plan = _plan(checkpoint)
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {k: tuple(v.shape) for k, v in HfSftGPTForCausalLM(config).state_dict().items()}
    planned = {src for src, _, _ in plan}
    missing = [src for src, _, _ in plan if src not in state_dict]
    unexpected = [k for k in state_dict if k not in planned and not is_ignored_buffer(k, state_dict[k])]
    mismatched, converted = [], {}
    for src, targets, transform in plan:
        if src not in state_dict:
            continue
        have = tuple(state_dict[src].shape)
        want = _fused_shape([expected[t] for t in targets]) if targets else have  # a tied head equals wte already
        if have != want:
            mismatched.append(f"{src} is {list(have)}, the model needs {list(want)}")
            continue
        tensor = state_dict[src].float() if state_dict[src].is_floating_point() else state_dict[src]
        converted.update(zip(targets, transform(tensor), strict=True))
    problems = [
        f"{label}: {some_names(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched))
        if items
    ]
    if problems:
        raise UsageError(f"{checkpoint.path} does not match {describe(checkpoint)}: {'; '.join(problems)}")
    return converted


def convert_parameter_tensors(
    checkpoint: LegacyCheckpoint, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Tensors shaped like some of the checkpoint's weights (their gradients, AdamW's moments), under our names.

    Each is split and permuted by the plan that converts the weight of the same name, so that an elementwise
    quantity stays with its element. A tied head maps to nothing: it is the embedding.

    Args:
        checkpoint: the legacy checkpoint whose layout `tensors` follow.
        tensors: checkpoint key -> tensor of that weight's shape.

    Returns:
        Our parameter name -> tensor.
    """
    plan = _plan(checkpoint)
    converted = {}
    for src, targets, transform in plan:
        if src in tensors:
            converted.update(zip(targets, transform(tensors[src]), strict=True))
    return converted


def _plan(checkpoint: LegacyCheckpoint) -> Plan:
    config = checkpoint.config
    return _simple_llama_plan(config) if checkpoint.source == "simple_llama" else _nanogpt_plan(config)


def _nanogpt_plan(config: HfSftGPTConfig) -> Plan:
    params = ("weight", "bias") if config.use_bias else ("weight",)
    plan: Plan = [
        ("transformer.wte.weight", ("model.embed_tokens.weight",), _same),
        ("transformer.wpe.weight", ("model.embed_positions.weight",), _same),
    ]
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        attn = tuple(f"{dst}self_attn.{p}_proj." for p in "qkv")
        for p in params:
            plan += [
                (f"{src}ln_1.{p}", (f"{dst}input_layernorm.{p}",), _same),
                (f"{src}attn.c_attn.{p}", tuple(a + p for a in attn), _split3),  # [Q; K; V] over the whole width
                (f"{src}attn.c_proj.{p}", (f"{dst}self_attn.o_proj.{p}",), _same),
                (f"{src}ln_2.{p}", (f"{dst}post_attention_layernorm.{p}",), _same),
                (f"{src}mlp.c_fc.{p}", (f"{dst}mlp.up_proj.{p}",), _same),
                (f"{src}mlp.c_proj.{p}", (f"{dst}mlp.down_proj.{p}",), _same),
            ]
    plan += [(f"transformer.ln_f.{p}", (f"model.norm.{p}",), _same) for p in params]
    # A tied head is the embedding itself: the saved copy is consumed but not loaded twice.
    if config.tie_word_embeddings:
        plan.append(("lm_head.weight", (), lambda tensor: ()))
    else:
        plan.append(("lm_head.weight", ("lm_head.weight",), _same))
    return plan


def _simple_llama_plan(config: HfSftGPTConfig) -> Plan:
    plan: Plan = [("embeddings.weight", ("model.embed_tokens.weight",), _same)]
    heads = config.num_attention_heads
    for i in range(config.num_hidden_layers):
        src, dst = f"decoder_blocks.{i}.", f"model.layers.{i}."
        plan += [
            (f"{src}norm1.weight", (f"{dst}input_layernorm.weight",), _same),
            (
                f"{src}attention.qkv_linear.weight",
                tuple(f"{dst}self_attn.{p}_proj.weight" for p in "qkv"),
                lambda w: split_interleaved_qkv(w, heads),
            ),
            (f"{src}attention.out.weight", (f"{dst}self_attn.o_proj.weight",), _same),
            (f"{src}norm2.weight", (f"{dst}post_attention_layernorm.weight",), _same),
            (f"{src}ffwd.w1.weight", (f"{dst}mlp.gate_proj.weight",), _same),
            (f"{src}ffwd.w3.weight", (f"{dst}mlp.up_proj.weight",), _same),
            (f"{src}ffwd.w2.weight", (f"{dst}mlp.down_proj.weight",), _same),
        ]
    plan += [
        ("norm.weight", ("model.norm.weight",), _same),
        ("final_linear.weight", ("lm_head.weight",), _same),
    ]
    return plan


def _same(tensor: torch.Tensor) -> tuple[torch.Tensor]:
    return (tensor,)


def _split3(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone() for t in tensor.chunk(3, dim=0))


def split_interleaved_qkv(weight: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """simple_llama's fused (3 * D, D) projection -> q, k, v (D, D) each, q/k rows in rotate-half order.

    simple_llama views its output as (..., heads, 3 * head_dim): rows are [q_h; k_h; v_h] for each head in turn.
    Its rotary embedding rotates adjacent pairs (2j, 2j+1) by frequency j; transformers' rotate-half pairs j with
    j + head_dim/2. Reordering each head's rows as [evens; odds] makes the two identical (as in transformers'
    `convert_llama_weights_to_hf.py`).
    """
    d_in = weight.shape[1]
    q, k, v = weight.view(heads, 3, -1, d_in).unbind(dim=1)  # each (nh, hs, D)
    q, k = (t.unflatten(1, (-1, 2)).transpose(1, 2) for t in (q, k))  # (nh, 2, hs/2, D): evens then odds
    return tuple(t.reshape(-1, d_in).clone() for t in (q, k, v))


def _fused_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def is_ignored_buffer(key: str, tensor: Any) -> bool:
    """nanoGPT without flash attention saves its causal mask as a (1, 1, T, T) buffer named attn.bias."""
    return key.endswith(".attn.bias") and getattr(tensor, "ndim", 0) == 4


def some_names(items: list[str], limit: int = 6) -> str:
    """The first `limit` names, and how many more."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
