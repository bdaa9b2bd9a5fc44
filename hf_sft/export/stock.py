"""The same weights as a stock `GPT2LMHeadModel` or `LlamaForCausalLM` folder.

LLaMA-style models need only a new config: our parameter names, rotate-half rotary and float32 RMSNorm are
`LlamaForCausalLM`'s. nanoGPT-style models become GPT-2, whose layers are `Conv1D` (weights stored (in, out), the
transpose of `nn.Linear`) with a fused `c_attn` = [Q | K | V]; GPT-2 always has biases, so a model without them gets
zeros, which compute the same thing.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from hf_sft.model_folder import tokenizer_dir
from hf_sft.tokenizer import TOKENIZER_FILES


def gpt2_config(config) -> GPT2Config:
    """The `GPT2Config` of a nanoGPT-style `HfSftGPTConfig` (exact GELU, as nanoGPT's `nn.GELU()`)."""
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_position_embeddings,
        n_ctx=config.max_position_embeddings,  # the 4.x name, which llama.cpp's converter reads from config.json
        n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_inner=None if config.intermediate_size == 4 * config.hidden_size else config.intermediate_size,
        activation_function="gelu",
        resid_pdrop=config.hidden_dropout,
        embd_pdrop=config.hidden_dropout,
        attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=config.norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def gpt2_state_dict(model) -> dict[str, torch.Tensor]:
    """`HfSftGPTForCausalLM` weights under `GPT2LMHeadModel` names and layouts."""
    config, sd = model.config, model.state_dict()

    def get(name: str, size: int) -> torch.Tensor:  # a bias the model does not have is a zero bias
        ref = sd["model.embed_tokens.weight"]
        return sd[name] if name in sd else torch.zeros(size, dtype=ref.dtype, device=ref.device)

    width, inner = config.hidden_size, config.intermediate_size
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.wpe.weight": sd["model.embed_positions.weight"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        qkv = [f"{src}self_attn.{p}_proj." for p in "qkv"]
        out |= {
            f"{dst}ln_1.weight": sd[f"{src}input_layernorm.weight"],
            f"{dst}ln_1.bias": get(f"{src}input_layernorm.bias", width),
            f"{dst}attn.c_attn.weight": torch.cat([sd[p + "weight"] for p in qkv]).t(),
            f"{dst}attn.c_attn.bias": torch.cat([get(p + "bias", width) for p in qkv]),
            f"{dst}attn.c_proj.weight": sd[f"{src}self_attn.o_proj.weight"].t(),
            f"{dst}attn.c_proj.bias": get(f"{src}self_attn.o_proj.bias", width),
            f"{dst}ln_2.weight": sd[f"{src}post_attention_layernorm.weight"],
            f"{dst}ln_2.bias": get(f"{src}post_attention_layernorm.bias", width),
            f"{dst}mlp.c_fc.weight": sd[f"{src}mlp.up_proj.weight"].t(),
            f"{dst}mlp.c_fc.bias": get(f"{src}mlp.up_proj.bias", inner),
            f"{dst}mlp.c_proj.weight": sd[f"{src}mlp.down_proj.weight"].t(),
            f"{dst}mlp.c_proj.bias": get(f"{src}mlp.down_proj.bias", width),
        }
    out["transformer.ln_f.weight"] = sd["model.norm.weight"]
    out["transformer.ln_f.bias"] = get("model.norm.bias", width)
    out["lm_head.weight"] = sd["lm_head.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def llama_config(config) -> LlamaConfig:
    """The `LlamaConfig` of a LLaMA-style `HfSftGPTConfig`."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        rope_parameters=dict(config.rope_parameters),
        attention_bias=config.use_bias,
        mlp_bias=config.use_bias,
        attention_dropout=config.attention_dropout,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def to_stock(model, target: str) -> PreTrainedModel:
    """The stock model (`"gpt2"` or `"llama"`) holding `model`'s weights, in `model`'s dtype, in eval mode.

    The caller has checked that `target` can express the model (`hf_sft.export.targets.blockers`).
    """
    if target == "gpt2":
        config, cls, weights = gpt2_config(model.config), GPT2LMHeadModel, gpt2_state_dict(model)
    else:
        config, cls, weights = llama_config(model.config), LlamaForCausalLM, model.state_dict()
    stock = cls(config).to(model.dtype)
    result = stock.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:  # a mapping bug, not a user error
        raise RuntimeError(f"{target} export left weights unmapped: {sorted(missing)} / {result.unexpected_keys}")
    stock.generation_config = copy.deepcopy(model.generation_config)
    return stock.eval()


def export_stock(model, target: str, model_dir: Path, out: Path) -> None:
    """Save the stock model, its generation config and the model's tokenizer files into `out`.

    Args:
        model: the loaded `HfSftGPTForCausalLM`.
        target: `"gpt2"` or `"llama"`.
        model_dir: the folder it came from (its tokenizer is copied; a checkpoint's comes from the run folder).
        out: the output folder.
    """
    stock = to_stock(model, target)
    stock.save_pretrained(out)
    source = tokenizer_dir(model_dir)
    if source is not None:
        copy_tokenizer_files(source, out)


def copy_tokenizer_files(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer files of `source` into `out`, without any `auto_map` (which would ask for custom code).

    Returns:
        The names of the files copied.
    """
    copied = []
    for name in TOKENIZER_FILES:
        path = source / name
        if not path.is_file():
            continue
        if name == "tokenizer_config.json":
            settings = json.loads(path.read_text(encoding="utf-8"))
            settings.pop("auto_map", None)
            (out / name).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(path, out / name)
        copied.append(name)
    return copied
