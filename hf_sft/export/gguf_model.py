"""The model half of a GGUF file: llama.cpp's architecture keys and tensors for an hf_sft model.

- nanoGPT-style models become llama.cpp's `gpt2` architecture: learned positions, LayerNorm with bias, GELU MLP,
  fused `attn_qkv` = [Q; K; V]. Its tensors are all required, so a model without biases gets zero biases (the same
  computation); an untied LM head is written as `output.weight`, a tied one is left out (llama.cpp reuses the
  embedding).
- LLaMA-style models become `llama`: RMSNorm, rotary positions, SwiGLU, grouped-query heads, optional biases. Our
  q/k rows are in transformers' rotate-half order; llama.cpp rotates adjacent pairs, so they are permuted as
  llama.cpp's own converter does (`LlamaModel.permute` in `convert_hf_to_gguf.py`).

Rotary scaling is written in the one form llama.cpp applies to every position alike: per-dimension frequency factors
(`rope_freqs`: plain inverse frequencies divided by transformers' own for the model's `rope_type`) and a cos/sin
scale (`rope.scaling.attn_factor`, transformers' `attention_scaling`). That reproduces every static type (linear,
llama3, yarn, ...) exactly; types that change with the sequence length (dynamic, longrope) are refused.
"""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import torch

from hf_sft.errors import UsageError
from hf_sft.export.targets import blockers

OUTTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
# llama.cpp's converter keeps these in float32 whatever the file type (see its `prepare_tensors`).
_ALWAYS_F32 = ("_norm.weight", "position_embd.weight", "rope_freqs.weight")


def gguf_architecture(config, where: str = "the model") -> str:
    """`"gpt2"` or `"llama"`: the llama.cpp architecture that computes what `config` computes.

    Raises:
        UsageError: neither can, naming the features in the way; or a rotary scaling llama.cpp cannot apply.
    """
    for arch in ("gpt2", "llama"):
        if not blockers(config, arch):
            if arch == "llama":
                _rope_tables(config, where)  # refuses the rotary types llama.cpp cannot apply
            return arch
    target = "gpt2" if config.family == "nanogpt" else "llama"
    raise UsageError(
        f"cannot export {where} to gguf: llama.cpp's {target} architecture cannot express "
        f"{', '.join(blockers(config, target))}"
    )


def write_hparams(writer: gguf.GGUFWriter, config, arch: str, outtype: str) -> None:
    """The architecture keys llama.cpp reads for `arch`, and the file type."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        _, scaling = _rope_tables(config)
        if scaling != 1.0:
            writer.add_rope_scaling_attn_factors(scaling)
    file_type, _ = OUTTYPES[outtype]
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_tensors(writer: gguf.GGUFWriter, model, arch: str, outtype: str) -> None:
    """Add every tensor of `model` under llama.cpp's names, stored as `outtype` (norms, biases, positions in f32)."""
    _, qtype = OUTTYPES[outtype]
    for name, tensor in gguf_tensors(model, arch):
        data = tensor.detach().to(torch.float32).contiguous().numpy()
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 or name.endswith(_ALWAYS_F32) else qtype
        try:
            stored = gguf.quants.quantize(data, kind)
        except gguf.QuantError:  # q8_0 needs rows of a multiple of 32 values; llama.cpp's converter falls back too
            kind = gguf.GGMLQuantizationType.F16
            stored = gguf.quants.quantize(data, kind)
        writer.add_tensor(name, stored, raw_dtype=kind)


def gguf_tensors(model, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """`(llama.cpp name, tensor)` for every weight, in `nn.Linear` layout ((out, in), which GGUF stores as is)."""
    config, sd = model.config, model.state_dict()
    width, kv_width, inner = config.hidden_size, config.num_key_value_heads * config.head_dim, config.intermediate_size

    def with_bias(dst: str, src: str, size: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield f"{dst}.weight", sd[f"{src}.weight"]
        if f"{src}.bias" in sd:
            yield f"{dst}.bias", sd[f"{src}.bias"]
        elif arch == "gpt2":  # llama.cpp's gpt2 requires every bias: a missing one is a zero one
            yield f"{dst}.bias", torch.zeros(size)

    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    if arch == "gpt2":
        yield "position_embd.weight", sd["model.embed_positions.weight"]
    for i in range(config.num_hidden_layers):
        src, blk = f"model.layers.{i}", f"blk.{i}"
        yield from with_bias(f"{blk}.attn_norm", f"{src}.input_layernorm", width)
        q, k, v = (f"{src}.self_attn.{p}_proj" for p in "qkv")
        if arch == "gpt2":
            fused = [dict(with_bias("qkv", proj, width)) for proj in (q, k, v)]  # [Q; K; V] as nanoGPT's c_attn
            for suffix in ("weight", "bias"):
                yield f"{blk}.attn_qkv.{suffix}", torch.cat([part[f"qkv.{suffix}"] for part in fused])
        else:
            for proj, name, size, heads in (
                (q, "attn_q", width, config.num_attention_heads),
                (k, "attn_k", kv_width, config.num_key_value_heads),
                (v, "attn_v", kv_width, None),
            ):
                for key, tensor in with_bias(f"{blk}.{name}", proj, size):
                    yield key, tensor if heads is None else permute(tensor, heads)
        yield from with_bias(f"{blk}.attn_output", f"{src}.self_attn.o_proj", width)
        yield from with_bias(f"{blk}.ffn_norm", f"{src}.post_attention_layernorm", width)
        if arch == "llama":
            yield from with_bias(f"{blk}.ffn_gate", f"{src}.mlp.gate_proj", inner)
        yield from with_bias(f"{blk}.ffn_up", f"{src}.mlp.up_proj", inner)
        yield from with_bias(f"{blk}.ffn_down", f"{src}.mlp.down_proj", width)
    yield from with_bias("output_norm", "model.norm", width)
    if not config.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]
    if arch == "llama":
        factors, _ = _rope_tables(config)
        if not torch.equal(factors, torch.ones_like(factors)):
            yield "rope_freqs.weight", factors


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half order (per head: first halves, then second halves) to adjacent pairs.

    The same reshape as llama.cpp's converter (`LlamaModel.permute`), for weights (out, in) and biases (out,).
    """
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope_tables(config, where: str = "the model") -> tuple[torch.Tensor, float]:
    """llama.cpp's per-dimension frequency factors and cos/sin scale for the model's rotary settings.

    Raises:
        UsageError: a rotary type whose frequencies change with the sequence length.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = config.rope_parameters.get("rope_type", "default")
    dim = config.head_dim
    plain = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if rope_type == "default":
        return torch.ones_like(plain), 1.0
    if "dynamic" in rope_type or rope_type == "longrope":  # transformers' `dynamic_rope_update` rule
        raise UsageError(
            f"cannot export {where} to gguf: rope_parameters rope_type {rope_type!r} changes its frequencies with "
            "the sequence length, which llama.cpp does not do"
        )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    return (plain / inv_freq.float()).to(torch.float32), float(scaling)
