"""Before training: where it runs, in which precision, and from which model and tokenizer it starts."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainingArguments

from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
from hf_sft.errors import UsageError
from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
from hf_sft.tokenizer import load_tokenizer
from hf_sft.training.arguments import SFTArguments

logger = logging.getLogger("hf_sft.train")

LEGACY_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def resolve_device_and_precision(sft: SFTArguments, args: TrainingArguments) -> TrainingArguments:
    """CUDA: bf16 where supported, else fp16 (with a grad scaler); CPU: fp32 unless bfloat16 is asked for."""
    use_cpu = args.use_cpu or sft.device == "cpu"
    if not use_cpu and not torch.cuda.is_available():
        logger.warning("--device cuda: no CUDA device is available, training on CPU")
        use_cpu = True
    bf16, fp16 = args.bf16, args.fp16
    if not (bf16 or fp16):
        if use_cpu:
            if sft.dtype == "bfloat16":
                bf16 = True
            elif sft.dtype == "float16":
                logger.warning("--dtype float16 is ignored on CPU (fp32); bfloat16 autocast is available on CPU")
        elif sft.dtype != "float32":
            bf16_ok = torch.cuda.is_bf16_supported()
            bf16 = sft.dtype == "bfloat16" and bf16_ok or (sft.dtype is None and bf16_ok)
            fp16 = not bf16
            if sft.dtype == "bfloat16" and not bf16_ok:
                logger.warning("--dtype bfloat16: this GPU does not support it, using float16 with a grad scaler")
    return dataclasses.replace(args, use_cpu=use_cpu, bf16=bf16, fp16=fp16)


def load_model_and_tokenizer(sft: SFTArguments) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, str]:
    """The base model and its tokenizer, plus a one-line description of where the model came from."""
    specials = {"bos_token": sft.bos_token, "eos_token": sft.eos_token, "pad_token": sft.pad_token}
    specials["unk_token"] = sft.unk_token
    source = sft.pretrained_ckpt_path
    if source and Path(source).suffix in LEGACY_SUFFIXES:
        if not Path(source).is_file():
            raise UsageError(f"--pretrained_ckpt_path: file not found: {source}")
        if not sft.tokenizer_path:
            raise UsageError("--pretrained_ckpt_path is a legacy checkpoint: pass --tokenizer_path too")
        from hf_sft.convert import convert_checkpoint

        model, tokenizer = convert_checkpoint(source, sft.tokenizer_path, **specials)
        logger.info("converted legacy checkpoint %s", source)
        return model, tokenizer, f"legacy checkpoint {Path(source).name}"
    if source:
        tokenizer = load_tokenizer(sft.tokenizer_path or source, **specials)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        return model, tokenizer, source
    tokenizer = _tokenizer_for_new_model(sft, specials)
    logger.warning(
        "no --pretrained_ckpt_path: initialising a NEW %s-style model from scratch (%d layers, width %d). "
        "Fine-tune a pretrained model by passing --pretrained_ckpt_path.",
        sft.model_family,
        sft.n_layer,
        sft.n_embd,
    )
    config = HfSftGPTConfig(
        family=sft.model_family,
        vocab_size=len(tokenizer),
        hidden_size=sft.n_embd,
        num_hidden_layers=sft.n_layer,
        num_attention_heads=sft.n_head,
        max_position_embeddings=sft.block_size,
        multiple_of=32,
        attention_dropout=sft.dropout,
        hidden_dropout=sft.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return HfSftGPTForCausalLM(config), tokenizer, "a new model initialised from scratch"


def _tokenizer_for_new_model(sft: SFTArguments, specials: dict) -> PreTrainedTokenizerFast:
    if sft.tokenizer_path:
        return load_tokenizer(sft.tokenizer_path, **specials)
    from hf_sft.data import load_records, parse_field_map, resolve_fields
    from hf_sft.demo import record_text, train_tokenizer

    fields = resolve_fields(parse_field_map(sft.field_map))
    records = load_records(sft.data_path, fields, skip_bad_records=sft.skip_bad_records).dataset  # validated first
    logger.info("training a %d-token byte-level BPE tokenizer on %s", sft.tokenizer_vocab_size, sft.data_path)
    texts = map(record_text, records["instruction"], records["input"], records["output"])
    backend = train_tokenizer(texts, vocab_size=sft.tokenizer_vocab_size)
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
