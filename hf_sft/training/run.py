"""One training run, top to bottom: arguments -> model + tokenizer -> datasets -> Trainer -> final folder."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import transformers
from transformers import TrainerCallback, TrainingArguments, set_seed

from hf_sft.errors import UsageError
from hf_sft.training.arguments import SFTArguments, parse_args
from hf_sft.training.checkpoints import AtomicCheckpointCallback, PreemptionCallback, resolve_resume_path
from hf_sft.training.feedback import (
    DEFAULT_SAMPLE_INSTRUCTIONS,
    EvaluateAtEpochEndCallback,
    LogFileCallback,
    SampleGenerationCallback,
    ThroughputCallback,
)
from hf_sft.training.output import check_hub_args, save_final
from hf_sft.training.setup import load_model_and_tokenizer, resolve_device_and_precision, sync_special_token_ids
from hf_sft.training.token_budget import TokenBudgetTrainer

logger = logging.getLogger("hf_sft.train")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (or YAML) and train."""
    sft, args = parse_args(argv)
    return run(sft, args)


def run(sft: SFTArguments, args: TrainingArguments, callbacks: list[TrainerCallback] | None = None) -> int:
    """Train as configured; returns the process exit status. `callbacks` are added to the Trainer's own."""
    if sft.demo:
        _fill_demo_paths(sft)
    if not sft.data_path:
        raise UsageError("--data_path is required (or --demo, or no arguments at all, for the built-in demo)")
    args = resolve_device_and_precision(sft, args)
    _check_world_size(args)
    output_dir = Path(args.output_dir)
    _setup_logging(args, output_dir)
    args = check_hub_args(args, sft, output_dir)
    logger.info("world size %d | device %s | precision %s", args.world_size, args.device, _precision_name(args))
    resume = resolve_resume_path(args.resume_from_checkpoint, output_dir)
    set_seed(args.seed)

    from hf_sft.data import (
        build_datasets,
        encode_prompt,
        install_chat_template,
        make_collator,
        parse_field_map,
        resolve_max_seq_len,
    )

    model, tokenizer, base_description = load_model_and_tokenizer(sft)
    sync_special_token_ids(model, tokenizer)
    install_chat_template(tokenizer)
    max_seq_len = resolve_max_seq_len(sft.max_seq_len, model.config.max_position_embeddings)
    data = build_datasets(
        sft.data_path,
        tokenizer,
        field_map=parse_field_map(sft.field_map),
        max_seq_len=max_seq_len,
        length_policy=sft.length_policy,
        skip_bad_records=sft.skip_bad_records,
        val_split=0.0 if sft.eval_data_path else sft.val_split,
        eval_data_path=sft.eval_data_path,
        seed=args.seed,
        num_proc=sft.num_proc,
    )
    _log_data(data)
    train_dataset = data.train.dataset
    eval_dataset = data.eval.dataset if data.eval is not None else None
    if sft.use_lora:
        model = _wrap_lora(model, sft)

    save_total_limit = args.save_total_limit
    args = _finalise_training_args(args, sft, has_eval=eval_dataset is not None)
    samples = SampleGenerationCallback(
        tokenizer,
        lambda instruction: encode_prompt(tokenizer, instruction),
        sft.sample_instructions.split("|") if sft.sample_instructions else DEFAULT_SAMPLE_INSTRUCTIONS,
        max_new_tokens=sft.sample_max_new_tokens,
    )
    preemption = PreemptionCallback()
    budget = args.per_device_train_batch_size * max_seq_len if sft.packing and sft.token_budget_batches else None
    trainer = TokenBudgetTrainer(
        token_budget=budget,
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=make_collator(tokenizer.pad_token_id, sft.packing, sft.pad_to_multiple_of),
        processing_class=tokenizer,
        callbacks=[
            AtomicCheckpointCallback(save_total_limit),
            preemption,
            LogFileCallback(output_dir / "train.log"),
            *(callbacks or []),
        ],
    )
    trainer.callback_handler.callbacks.insert(0, ThroughputCallback())
    if eval_dataset is not None:
        trainer.add_callback(EvaluateAtEpochEndCallback())
        trainer.add_callback(samples)

    trainer.train(resume_from_checkpoint=resume)
    if preemption.requested:
        logger.warning(
            "stopped by %s at step %d; continue with --resume_from_ckpt_path latest",
            preemption.requested,
            trainer.state.global_step,
        )
        return 0
    if eval_dataset is not None and not _evaluated_at(trainer.state.log_history, trainer.state.global_step):
        trainer.evaluate()
    save_final(trainer, sft, output_dir, base_description, samples.history)
    return 0


def _log_data(data) -> None:
    for role, split in (("train", data.train), ("eval", data.eval)):
        if split is None:
            continue
        dropped = ", ".join(f"{n} {reason}" for reason, n in split.dropped.items()) or "none"
        skipped = sum(split.skipped.values())
        logger.info(
            "%s data: %d examples from %s; dropped: %s%s",
            role,
            len(split.index),
            split.source,
            dropped,
            f"; skipped {skipped} bad record{'s' if skipped != 1 else ''}" if skipped else "",
        )


def _evaluated_at(history: list[dict], step: int) -> bool:
    return any("eval_loss" in entry and entry.get("step") == step for entry in history)


def _fill_demo_paths(sft: SFTArguments) -> None:
    from hf_sft.demo import DEMO_DATA

    sft.data_path = sft.data_path or str(DEMO_DATA)


def _check_world_size(args: TrainingArguments) -> None:
    """`accelerate launch --num_processes 2` without a process group gives two separate runs: refuse that."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != args.world_size:
        raise UsageError(
            f"{launched} processes were launched but this one sees world size {args.world_size}: they would train "
            "separately and overwrite each other. On CPU launch with ACCELERATE_USE_CPU=1 and pass --device cpu."
        )


def _finalise_training_args(args: TrainingArguments, sft: SFTArguments, has_eval: bool) -> TrainingArguments:
    import dataclasses

    kwargs = dict(args.lr_scheduler_kwargs or {})
    if args.lr_scheduler_type == "cosine_with_min_lr" and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
        kwargs["min_lr"] = sft.min_lr if sft.min_lr is not None else args.learning_rate / 10
    changes = {
        "lr_scheduler_kwargs": kwargs,
        "save_total_limit": None,  # rotation is AtomicCheckpointCallback's, after a checkpoint is complete
    }
    if not has_eval:
        changes["eval_strategy"] = "no"
    return dataclasses.replace(args, **changes)


def _wrap_lora(model, sft: SFTArguments):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("--use_lora needs peft: pip install 'hf-sft[lora]'") from None
    config = LoraConfig(
        r=sft.lora_r,
        lora_alpha=sft.lora_alpha,
        lora_dropout=sft.lora_dropout,
        target_modules=[t.strip() for t in sft.lora_targets.split(",") if t.strip()],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: training %d of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def _precision_name(args: TrainingArguments) -> str:
    return "bf16 autocast" if args.bf16 else "fp16 autocast + grad scaler" if args.fp16 else "fp32"


def _setup_logging(args: TrainingArguments, output_dir: Path) -> None:
    """hf_sft's messages on stderr and in `<output_dir>/train.log` (rank 0); transformers' warnings go to both too."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    hf_sft_logger = logging.getLogger("hf_sft")
    hf_sft_logger.setLevel(logging.INFO if args.process_index == 0 else logging.ERROR)
    if not hf_sft_logger.handlers:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        hf_sft_logger.addHandler(console)
    transformers.utils.logging.set_verbosity_warning()
    transformers_logger = transformers.utils.logging.get_logger()
    for owner in (hf_sft_logger, transformers_logger):  # a second run in the same process logs to its own file
        for old in [h for h in owner.handlers if getattr(h, "hf_sft_run_log", False)]:
            owner.removeHandler(old)
            old.close()
    if args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(output_dir / "train.log", encoding="utf-8")
        handler.setFormatter(fmt)
        handler.hf_sft_run_log = True
        hf_sft_logger.addHandler(handler)
        transformers_logger.addHandler(handler)
