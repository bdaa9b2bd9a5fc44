"""Legacy pretraining checkpoints (nanoGPT, finetune_gpt.py, simple_llama): read without running their code, mapped
onto `HfSftGPTForCausalLM`, written as a model folder. The one module that knows the legacy formats.

Three layouts are recognised by their top-level keys:

- nanoGPT `train.py`: `{"model": state_dict, "model_args": {...}}`
- `finetune_gpt.py`: `{"model_state_dict": state_dict, "model_args": {...}}` (same weights as nanoGPT)
- simple_llama: `{"model_state_dict": state_dict, "config": <TrainingConfig>}`

Contents, in the order of a conversion:

- Reading (`load_legacy_checkpoint`, `LegacyCheckpoint`): the file is unpickled by `hf_sft.safe_pickle` and the model
  configuration is worked out from the saved arguments and the weights' shapes.
- Weight plans (`convert_state_dict`, `convert_parameter_tensors`): which weight becomes which of ours, one explicit
  plan per family. Each plan lists checkpoint key -> model keys and how to split or permute the tensor, so that a
  missing key, a left-over key or a wrong shape is reported under the checkpoint's own name before anything is
  loaded, and so that tensors shaped like the weights (AdamW's moments) follow the same map.
- Conversion (`convert_checkpoint`, `convert_to_folder`): the vocabulary checked against the tokenizer, the model
  loaded strictly, the folder written through `hf_sft.writer`.

`hf_sft.export.legacy` writes the inverse.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast

from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
from hf_sft.errors import UsageError
from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
from hf_sft.safe_pickle import LegacyRecord, load_checkpoint
from hf_sft.tokenizer import load_tokenizer
from hf_sft.writer import check_destination, new_folder

# --- reading --------------------------------------------------------------------------------------------------------

SOURCES = {"nanogpt": "nanoGPT train.py", "finetune_gpt": "finetune_gpt.py", "simple_llama": "simple_llama"}
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers, in either nesting order


@dataclass
class LegacyCheckpoint:
    """A legacy checkpoint read without running its code.

    Attributes:
        path: the file it came from.
        source: `"nanogpt"`, `"finetune_gpt"` or `"simple_llama"` (keys of `SOURCES`).
        config: the matching model configuration (token ids not set yet: they come from the tokenizer).
        state_dict: the original weights under their original names, wrapper prefixes stripped.
    """

    path: Path
    source: str
    config: HfSftGPTConfig
    state_dict: dict[str, torch.Tensor]


def load_legacy_checkpoint(path: str | Path) -> LegacyCheckpoint:
    """Read a nanoGPT, finetune_gpt.py or simple_llama checkpoint and work out its model configuration.

    Raises:
        UsageError: unreadable or unsafe file, unknown layout, missing config fields, unsupported variant (MLA).
    """
    path = Path(path)
    return legacy_checkpoint_of(load_checkpoint(path), path)


def legacy_checkpoint_of(obj: Any, path: Path) -> LegacyCheckpoint:
    """`load_legacy_checkpoint` of an object already read from `path` (with `hf_sft.safe_pickle`).

    Raises:
        UsageError: as `load_legacy_checkpoint`.
    """
    keys = sorted(obj) if isinstance(obj, dict) else []
    if "model_args" in keys and ("model" in keys or "model_state_dict" in keys):
        source = "nanogpt" if "model" in keys else "finetune_gpt"
        state_dict = _strip_prefixes(obj["model" if source == "nanogpt" else "model_state_dict"], path)
        config = _nanogpt_config(fields_of(obj["model_args"], path), state_dict, path)
    elif "model_state_dict" in keys and "config" in keys:
        source = "simple_llama"
        state_dict = _strip_prefixes(obj["model_state_dict"], path)
        config = _simple_llama_config(fields_of(obj["config"], path), state_dict, path)
    else:
        found = ", ".join(map(str, keys)) or type(obj).__name__
        raise UsageError(
            f"{path} is not a checkpoint layout hf_sft knows (found {found}); expected nanoGPT's "
            "{'model', 'model_args'}, finetune_gpt.py's {'model_state_dict', 'model_args'} or simple_llama's "
            "{'model_state_dict', 'config'}"
        )
    return LegacyCheckpoint(path=path, source=source, config=config, state_dict=state_dict)


def describe(checkpoint: LegacyCheckpoint) -> str:
    """The model a checkpoint holds, in words, for error messages."""
    config = checkpoint.config
    return (
        f"a {SOURCES[checkpoint.source]} model ({config.family} family, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, width {config.hidden_size}, vocab {config.vocab_size})"
    )


def fields_of(record: Any, path: Path) -> dict[str, Any]:
    """A saved configuration (a dict, a namespace, or a record of an unknown class) as a dict of its fields.

    Raises:
        UsageError: it is none of those.
    """
    if isinstance(record, LegacyRecord):
        return record.to_dict()
    if isinstance(record, dict):
        return dict(record)
    if hasattr(record, "__dict__"):  # a namespace or dataclass that torch itself knows how to load
        return dict(vars(record))
    raise UsageError(f"{path}: the model configuration is a {type(record).__name__}, not a set of fields")


def _require(fields: dict[str, Any], names: tuple[str, ...], path: Path, what: str) -> None:
    absent = [name for name in names if fields.get(name) is None]
    if absent:
        raise UsageError(f"{path}: {what} lacks {', '.join(absent)}; found {', '.join(sorted(fields)) or 'nothing'}")


def _make_config(path: Path, **kwargs) -> HfSftGPTConfig:
    try:
        return HfSftGPTConfig(**kwargs)
    except ValueError as err:
        raise UsageError(f"{path}: its model configuration is not valid: {err}") from None


def _nanogpt_config(args: dict[str, Any], state_dict: dict[str, torch.Tensor], path: Path) -> HfSftGPTConfig:
    _require(args, ("n_layer", "n_head", "n_embd", "block_size"), path, "model_args")
    wte = state_dict.get("transformer.wte.weight")
    vocab_size = args.get("vocab_size") or (wte.shape[0] if wte is not None else None)
    _require({"vocab_size": vocab_size}, ("vocab_size",), path, "model_args")
    head = state_dict.get("lm_head.weight")
    # nanoGPT ties lm_head to wte (both keys are saved, sharing one tensor); a variant that unties them keeps its head.
    tied = head is None or wte is None or (head.shape == wte.shape and torch.equal(head, wte))
    dropout = float(args.get("dropout") or 0.0)
    return _make_config(
        path,
        family="nanogpt",
        vocab_size=int(vocab_size),
        hidden_size=int(args["n_embd"]),
        num_hidden_layers=int(args["n_layer"]),
        num_attention_heads=int(args["n_head"]),
        max_position_embeddings=int(args["block_size"]),
        use_bias=bool(args.get("bias", True)),
        attention_dropout=dropout,
        hidden_dropout=dropout,
        tie_word_embeddings=tied,
    )


def _simple_llama_config(fields: dict[str, Any], state_dict: dict[str, torch.Tensor], path: Path) -> HfSftGPTConfig:
    mla_keys = [k for k in state_dict if re.search(r"\.attention\.(?!qkv_linear\.|out\.)\w*(kv|latent|down|rope)", k)]
    if fields.get("use_mla") or mla_keys:
        raise UsageError(
            f"{path} uses simple_llama's MLA (multi-head latent attention), which hf_sft does not support; "
            "only checkpoints trained with use_mla=False (fused qkv_linear) can be converted"
        )
    _require(fields, ("n_embd", "n_heads", "n_layers"), path, "its TrainingConfig")
    for key in ("embeddings.weight", "decoder_blocks.0.ffwd.w1.weight"):
        if key not in state_dict:
            raise UsageError(f"{path} does not match a simple_llama model: missing keys: {key}")
    dropout = float(fields.get("dropout") or 0.0)
    return _make_config(
        path,
        family="llama",
        vocab_size=state_dict["embeddings.weight"].shape[0],  # TrainingConfig does not record it
        hidden_size=int(fields["n_embd"]),
        num_hidden_layers=int(fields["n_layers"]),
        num_attention_heads=int(fields["n_heads"]),
        intermediate_size=state_dict["decoder_blocks.0.ffwd.w1.weight"].shape[0],
        multiple_of=int(fields.get("multiple_of") or 256),
        max_position_embeddings=int(fields.get("max_seq_len") or 2048),
        norm_eps=float(fields.get("eps") or 1e-5),
        rope_theta=float(fields.get("theta") or 10000.0),
        attention_dropout=dropout,
        hidden_dropout=dropout,
    )


def _strip_prefixes(state_dict: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict):
        raise UsageError(f"{path}: the model weights are a {type(state_dict).__name__}, not a state dict")
    stripped = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        stripped[name] = value
    return stripped


# --- weight plans ---------------------------------------------------------------------------------------------------

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


# --- conversion -----------------------------------------------------------------------------------------------------

CONVERT_COMMAND = "convert"  # recorded in the folders it writes: a later conversion may replace them
# nanoGPT rounds its vocabulary up to a multiple of this (GPT-2: 50257 -> 50304).
NANOGPT_VOCAB_MULTIPLE = 64


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


def _load_strict(model: HfSftGPTForCausalLM, weights: dict[str, torch.Tensor], checkpoint: LegacyCheckpoint) -> None:
    result = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise UsageError(
            f"{checkpoint.path}: the converted weights do not fill {describe(checkpoint)} "
            f"(missing {some_names(missing)}; unexpected {some_names(result.unexpected_keys)})"
        )
