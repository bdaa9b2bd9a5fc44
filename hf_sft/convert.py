"""Legacy pretraining checkpoints (nanoGPT, finetune_gpt.py, simple_llama) become `HfSftGPTForCausalLM` models.

`hf_sft.legacy_checkpoint` reads the file and works out the configuration; here every weight is mapped by an
explicit plan (checkpoint key -> model keys, plus how to split or permute it), so a missing key, a left-over key or a
wrong shape is reported under the checkpoint's own name before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast

from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
from hf_sft.errors import UsageError
from hf_sft.legacy_checkpoint import SOURCES, LegacyCheckpoint, describe, load_legacy_checkpoint
from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
from hf_sft.tokenizer import load_tokenizer
from hf_sft.writer import check_destination, new_folder

__all__ = [
    "SOURCES",
    "LegacyCheckpoint",
    "convert_checkpoint",
    "convert_state_dict",
    "convert_to_folder",
    "load_legacy_checkpoint",
]

CONVERT_COMMAND = "convert"  # recorded in the folders it writes: a later conversion may replace them
# nanoGPT rounds its vocabulary up to a multiple of this (GPT-2: 50257 -> 50304).
NANOGPT_VOCAB_MULTIPLE = 64

# (checkpoint key, model keys, transform of the checkpoint tensor into the model tensors)
Plan = list[tuple[str, tuple[str, ...], Callable[[torch.Tensor], tuple[torch.Tensor, ...]]]]


def convert_checkpoint(
    checkpoint_path: str | Path,
    tokenizer_path: str | Path,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    allow_vocab_mismatch: bool = False,
) -> tuple[HfSftGPTForCausalLM, PreTrainedTokenizerFast]:
    """Build the HF model (fp32, eval mode) and tokenizer from a legacy checkpoint and its `tokenizers` JSON.

    Args:
        checkpoint_path: nanoGPT/finetune_gpt.py `.pt` or simple_llama `.pth`.
        tokenizer_path: the tokenizer used in pretraining (JSON file or HF folder).
        bos_token, eos_token, pad_token, unk_token: special tokens, as for `hf_sft.tokenizer.load_tokenizer`.
        allow_vocab_mismatch: accept a tokenizer smaller than the embedding beyond the checkpoint's padding rule.

    Returns:
        The model, whose config and generation config carry the tokenizer's BOS/EOS/PAD ids, and the tokenizer.

    Raises:
        UsageError: anything wrong with the inputs, named (see `load_legacy_checkpoint` and `convert_state_dict`).
    """
    specials = (bos_token, eos_token, pad_token, unk_token)
    model, tokenizer, _ = _convert(checkpoint_path, tokenizer_path, specials, allow_vocab_mismatch)
    return model, tokenizer


def convert_to_folder(
    checkpoint_path: str | Path,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    allow_vocab_mismatch: bool = False,
    overwrite: bool = False,
) -> tuple[HfSftGPTForCausalLM, PreTrainedTokenizerFast, str]:
    """Convert (see `convert_checkpoint`) and `save_pretrained` model, code, generation config and tokenizer.

    The destination is checked before anything is read (`hf_sft.writer.check_destination`): it may not be the
    checkpoint or the tokenizer, lie inside them or hold them, and a non-empty folder that an earlier
    `hf-sft convert` did not write (a training run's folder, say) is replaced only with `overwrite`. The folder is
    written beside `out_dir` and renamed into place whole: it ends up holding exactly the converted model.

    Args:
        overwrite: replace a non-empty `out_dir` that is not an earlier conversion's output.
        (the others as for `convert_checkpoint`; `out_dir` is the folder to write)

    Returns:
        The converted model and tokenizer, as saved in `out_dir`, and the checkpoint's source (a key of `SOURCES`).

    Raises:
        UsageError: a destination that may not be written, or inputs `convert_checkpoint` refuses.
        WriteFailed: the system refused the write (nothing is left behind).
    """
    import hf_sft  # noqa: F401 - registers the Auto classes, so save_pretrained writes auto_map and the code files

    out_dir = check_destination(
        out_dir, kind="folder", command=CONVERT_COMMAND, sources=[checkpoint_path, tokenizer_path], overwrite=overwrite
    )
    specials = (bos_token, eos_token, pad_token, unk_token)
    model, tokenizer, source = _convert(checkpoint_path, tokenizer_path, specials, allow_vocab_mismatch)
    with new_folder(out_dir, command=CONVERT_COMMAND) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return model, tokenizer, source


def _convert(
    checkpoint_path: str | Path, tokenizer_path: str | Path, specials: tuple, allow_vocab_mismatch: bool
) -> tuple[HfSftGPTForCausalLM, PreTrainedTokenizerFast, str]:
    checkpoint = load_legacy_checkpoint(checkpoint_path)
    tokenizer = load_tokenizer(tokenizer_path, *specials)
    config = checkpoint.config
    check_vocab_size(checkpoint, len(tokenizer), str(tokenizer_path), allow_vocab_mismatch)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, name, getattr(tokenizer, name))
    tokenizer.model_max_length = config.max_position_embeddings
    model = HfSftGPTForCausalLM(config)
    _load_strict(model, convert_state_dict(checkpoint), checkpoint)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model.float().eval(), tokenizer, checkpoint.source


def check_vocab_size(checkpoint: LegacyCheckpoint, tokens: int, tokenizer: str, allow_smaller: bool = False) -> None:
    """Refuse a tokenizer that cannot be the one the checkpoint was pretrained with.

    The embedding may exceed the tokenizer only by the checkpoint's own padding: nanoGPT rounds the vocabulary up
    to a multiple of 64 (GPT-2's 50257 tokens in 50304 rows), so at most 64 spare rows in a multiple of 64;
    simple_llama sizes the embedding from the tokenizer exactly.

    Raises:
        UsageError: naming both sizes; a smaller tokenizer is accepted with `allow_smaller`.
    """
    rows = checkpoint.config.vocab_size
    if tokens > rows:
        raise UsageError(
            f"the tokenizer {tokenizer} has {tokens} tokens but the model in {checkpoint.path} embeds only {rows}: "
            "is it the tokenizer the model was pretrained with?"
        )
    padded = checkpoint.source != "simple_llama" and rows % NANOGPT_VOCAB_MULTIPLE == 0
    spare = NANOGPT_VOCAB_MULTIPLE if padded else 0
    if rows - tokens > spare and not allow_smaller:
        rule = f"nanoGPT pads by at most {spare} rows" if padded else f"{SOURCES[checkpoint.source]} does not pad"
        raise UsageError(
            f"the tokenizer {tokenizer} has {tokens} tokens but the model in {checkpoint.path} embeds {rows} "
            f"({rule}): is it the tokenizer the model was pretrained with? Pass --allow_vocab_mismatch to "
            "`hf-sft convert` to convert anyway"
        )


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
        f"{label}: {_some(items)}"
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


def _load_strict(model: HfSftGPTForCausalLM, weights: dict[str, torch.Tensor], checkpoint: LegacyCheckpoint) -> None:
    result = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise UsageError(
            f"{checkpoint.path}: the converted weights do not fill {describe(checkpoint)} "
            f"(missing {_some(missing)}; unexpected {_some(result.unexpected_keys)})"
        )


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
                lambda w: _split_interleaved_qkv(w, heads),
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


def _split_interleaved_qkv(weight: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
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


def _some(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
