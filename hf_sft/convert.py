"""Legacy pretraining checkpoints (nanoGPT, finetune_gpt.py, simple_llama) become `HfSftGPTForCausalLM` models.

`hf_sft.legacy_checkpoint` reads the file and works out the configuration, `hf_sft.weight_plans` maps every
weight onto ours; here the vocabulary is checked against the tokenizer and the folder is written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast

from hf_sft.errors import UsageError
from hf_sft.legacy_checkpoint import SOURCES, LegacyCheckpoint, describe, load_legacy_checkpoint
from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
from hf_sft.tokenizer import load_tokenizer
from hf_sft.weight_plans import convert_state_dict, some_names
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
