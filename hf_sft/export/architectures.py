"""What the stock architectures (GPT-2, LLaMA) can express of our configurable one.

`blockers` names the features of an hf_sft config that a stock architecture lacks; the stock folders
(`hf_sft.export.stock`), llama.cpp's architectures (`hf_sft.export.gguf_model`) and the legacy layouts
(`hf_sft.export.legacy`) all start from it.
"""

from __future__ import annotations

from pathlib import Path

from hf_sft.errors import UsageError

# Where each stock target differs from our configurable architecture: (config test, the feature that prevents it).
_STOCK_REQUIREMENTS = {
    "gpt2": (
        (lambda c: c.norm_type == "layernorm", "RMSNorm (GPT-2 has LayerNorm)"),
        (lambda c: c.position_embedding_type == "learned", "rotary positions (GPT-2 learns absolute positions)"),
        (lambda c: c.mlp_type == "gelu", "a SwiGLU MLP (GPT-2 has a GELU MLP)"),
        (
            lambda c: c.num_key_value_heads == c.num_attention_heads,
            "grouped-query attention (GPT-2 has one key/value head per query head)",
        ),
    ),
    "llama": (
        (lambda c: c.norm_type == "rmsnorm", "LayerNorm (LLaMA has RMSNorm)"),
        (lambda c: c.position_embedding_type == "rope", "learned absolute positions (LLaMA has rotary positions)"),
        (lambda c: c.mlp_type == "swiglu", "a GELU MLP (LLaMA has a SwiGLU MLP)"),
    ),
}


def blockers(config, target: str) -> list[str]:
    """The features of `config` that the stock architecture `target` ("gpt2" or "llama") cannot express."""
    return [feature for holds, feature in _STOCK_REQUIREMENTS[target] if not holds(config)]


def check_exportable(config, target: str, where: str | Path) -> None:
    """Raise a `UsageError` naming the blockers of `target` for `config`, and the target that would work, if any."""
    found = blockers(config, target)
    if not found:
        return
    others = [t for t in _STOCK_REQUIREMENTS if t != target and not blockers(config, t)]
    hint = f"; this model exports with --to {others[0]}" if others else ""
    raise UsageError(f"cannot export {where} to {target}: the model uses {', '.join(found)}{hint}")
