"""What a run starts from: its model and tokenizer (from a legacy checkpoint, a HF folder, or new) and its datasets."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
from hf_sft.data import DataArguments
from hf_sft.errors import UsageError, bad_input
from hf_sft.model_folder import ModelFolder, read_model_folder
from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
from hf_sft.tokenizer import load_tokenizer
from hf_sft.training.arguments import ModelArguments

logger = logging.getLogger("hf_sft.train")

LEGACY_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def load_model_and_tokenizer(
    model_args: ModelArguments, data_args: DataArguments
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, str]:
    """The base model and its tokenizer, plus a one-line description of where the model came from."""
    source = model_args.pretrained_ckpt_path
    if _is_legacy(source):
        from hf_sft.legacy import convert_checkpoint

        if not model_args.tokenizer_path:
            raise UsageError("--pretrained_ckpt_path is a legacy checkpoint: pass --tokenizer_path too")
        model, tokenizer = convert_checkpoint(source, model_args.tokenizer_path, **model_args.special_tokens())
        logger.info("converted legacy checkpoint %s", source)
        return model, tokenizer, f"legacy checkpoint {Path(source).name}"
    folder = read_pretrained_folder(model_args)
    tokenizer = load_run_tokenizer(model_args, data_args)
    if folder is not None:
        return folder.load_model(dtype=torch.float32), tokenizer, source
    if source:  # a Hub model id
        with bad_input(f"--pretrained_ckpt_path {source}: cannot load the model"):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        return model, tokenizer, source
    logger.warning(
        "no --pretrained_ckpt_path: initialising a NEW %s-style model from scratch (%d layers, width %d). "
        "Fine-tune a pretrained model by passing --pretrained_ckpt_path.",
        model_args.model_family,
        model_args.n_layer,
        model_args.n_embd,
    )
    return HfSftGPTForCausalLM(base_config(model_args, tokenizer)), tokenizer, "a new model initialised from scratch"


def read_pretrained_folder(model_args: ModelArguments) -> ModelFolder | None:
    """The `--pretrained_ckpt_path` folder, checked by the one reader before anything of it is used (its tokenizer
    too, unless `--tokenizer_path` replaces it); None when the flag names no local folder.

    Raises:
        UsageError: "--pretrained_ckpt_path: " and the reader's refusal.
    """
    source = model_args.pretrained_ckpt_path
    if not source or not Path(source).is_dir():
        return None
    try:
        return read_model_folder(source, tokenizer="ignored" if model_args.tokenizer_path else "required")
    except UsageError as err:
        raise UsageError(f"--pretrained_ckpt_path: {err}") from None


def load_run_tokenizer(model_args: ModelArguments, data_args: DataArguments) -> PreTrainedTokenizerFast:
    """The tokenizer a run uses: `--tokenizer_path`, else the model folder's, else one trained on the data."""
    source = model_args.pretrained_ckpt_path
    if _is_legacy(source) and not model_args.tokenizer_path:
        raise UsageError("--pretrained_ckpt_path is a legacy checkpoint: pass --tokenizer_path too")
    if model_args.tokenizer_path or source:
        return load_tokenizer(model_args.tokenizer_path or source, **model_args.special_tokens())
    return _tokenizer_for_new_model(model_args, data_args)


def base_config(model_args: ModelArguments, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The configuration of the model a run starts from, read without loading any weight of a HF model.

    Args:
        model_args: the model arguments (a legacy checkpoint, a HF folder or Hub id, or the shape of a new model).
        tokenizer: the run's tokenizer (a new model's vocabulary and special ids come from it).
    """
    source = model_args.pretrained_ckpt_path
    if _is_legacy(source):
        from hf_sft.legacy import load_legacy_checkpoint

        return load_legacy_checkpoint(source).config
    if source:
        with bad_input(f"--pretrained_ckpt_path {source}: cannot read the model configuration"):
            return AutoConfig.from_pretrained(source)
    return HfSftGPTConfig(
        family=model_args.model_family,
        vocab_size=len(tokenizer),
        hidden_size=model_args.n_embd,
        num_hidden_layers=model_args.n_layer,
        num_attention_heads=model_args.n_head,
        max_position_embeddings=model_args.block_size,
        multiple_of=32,
        attention_dropout=model_args.dropout,
        hidden_dropout=model_args.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _is_legacy(source: str | None) -> bool:
    if not source or Path(source).suffix not in LEGACY_SUFFIXES:
        return False
    if not Path(source).is_file():
        raise UsageError(f"--pretrained_ckpt_path: file not found: {source}")
    return True


def _tokenizer_for_new_model(model_args: ModelArguments, data_args: DataArguments) -> PreTrainedTokenizerFast:
    from hf_sft.data import load_records, parse_field_map, resolve_fields
    from hf_sft.data.saved import is_saved_dataset
    from hf_sft.demo import record_text, train_tokenizer

    if is_saved_dataset(data_args.data_path):
        raise UsageError(
            f"--data_path {data_args.data_path} holds tokenised examples: pass the --tokenizer_path (or "
            "--pretrained_ckpt_path) they were tokenised with"
        )
    fields = resolve_fields(parse_field_map(data_args.field_map))
    records = load_records(
        data_args.data_path,
        fields,
        skip_bad_records=data_args.skip_bad_records,
        weights=data_args.data_weights,
        dataset_config=data_args.dataset_config,
        dataset_split=data_args.dataset_split,
        dataset_revision=data_args.dataset_revision,
    ).dataset
    vocab_size = model_args.tokenizer_vocab_size
    logger.info("training a %d-token byte-level BPE tokenizer on %s", vocab_size, data_args.data_path)
    if "messages" in records.column_names:
        texts = (" ".join(turn["content"] for turn in turns) for turns in records["messages"])
    else:
        texts = map(record_text, records["instruction"], records["input"], records["output"])
    backend = train_tokenizer(texts, vocab_size=vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        backend.save(f"{tmp}/tokenizer.json")
        return load_tokenizer(f"{tmp}/tokenizer.json")


def sync_special_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    """The model's config and generation config use the tokenizer's BOS/EOS/PAD."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    for target in (model.config, model.generation_config):
        for name, value in ids.items():
            setattr(target, name, value)
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size} embeddings"
        )
