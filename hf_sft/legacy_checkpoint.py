"""Reading legacy pretraining checkpoints (nanoGPT, finetune_gpt.py, simple_llama) without running their code.

Three layouts are recognised by their top-level keys:

- nanoGPT `train.py`: `{"model": state_dict, "model_args": {...}}`
- `finetune_gpt.py`: `{"model_state_dict": state_dict, "model_args": {...}}` (same weights as nanoGPT)
- simple_llama: `{"model_state_dict": state_dict, "config": <TrainingConfig>}`

The model configuration is worked out from the saved arguments and the weights' shapes; `hf_sft.convert` maps the
weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
from hf_sft.errors import UsageError
from hf_sft.safe_pickle import LegacyRecord, load_checkpoint

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
