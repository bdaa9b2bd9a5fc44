"""One training run, top to bottom: arguments -> model + tokenizer -> datasets -> Trainer -> final folder."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import transformers
from transformers import TrainerCallback, set_seed

from hf_sft.data import build_run_datasets
from hf_sft.errors import UsageError, bad_input
from hf_sft.training import engines
from hf_sft.training.arguments import DataArguments, ModelArguments, SFTTrainingArguments, parse_args
from hf_sft.training.checkpoint_files import CheckpointFiles
from hf_sft.training.checkpoints import resolve_resume_path
from hf_sft.training.feedback import (
    DEFAULT_SAMPLE_INSTRUCTIONS,
    EvaluateAtEpochEndCallback,
    LogFileCallback,
    SampleGenerationCallback,
    ThroughputCallback,
)
from hf_sft.training.numeric_guard import NumericGuard, NumericGuardSteps, diverged
from hf_sft.training.output import check_hub_args, save_final
from hf_sft.training.resume import load_from_checkpoint, record_arguments, resume_arguments
from hf_sft.training.resumed_state import NothingLeftToTrain, ResumeCallback
from hf_sft.training.run_folder import check_run_folder, claim_run_folder, discard_newer, release_run_folders
from hf_sft.training.run_log import ConsoleHandler, hold_run_log, start_run_log
from hf_sft.training.setup import (
    load_model_and_tokenizer,
    resolve_device_and_precision,
    sync_special_token_ids,
)
from hf_sft.training.signals import (
    PreemptionCallback,
    StopRequests,
    handling_signals,
    stopped_after_training,
    stopped_before_training,
    stopped_in_training,
)
from hf_sft.training.staged_save import StagedCheckpoints
from hf_sft.training.streaming import (
    StreamPositionCallback,
    check_streaming,
    examples_per_step,
    recorded_position,
    streaming_arguments,
)
from hf_sft.training.token_budget import TokenBudgetTrainer
from hf_sft.training.validation import validate_arguments

logger = logging.getLogger("hf_sft.train")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (or YAML), fill what it does not give from the checkpoint it resumes, and train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, args = resume_arguments(argv, parse_args(argv))
    return run(model_args, data_args, args)


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: SFTTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> int:
    """Train as configured; returns the process exit status.

    `callbacks` are added to the Trainer's own (the throughput benchmark measures through one).

    Raises:
        RunInterrupted: a SIGTERM/SIGINT came (`hf_sft.training.signals` says what each moment of it means).
        TrainingDiverged: a non-finite loss, gradient norm or weights stopped training (`numeric_guard`).
    """
    with handling_signals() as stop:
        try:
            status = _run(model_args, data_args, args, callbacks or [], stop)
        finally:
            release_run_folders()
            stop.echo = False  # the run's last line follows: nothing may print after it
        if stop.requested:  # it came once training had finished: the final folder was finished first
            raise stopped_after_training(stop, Path(args.output_dir), args.process_index == 0)
        return status


def _run(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: SFTTrainingArguments,
    callbacks: list[TrainerCallback],
    stop: StopRequests,
) -> int:
    validate_arguments(model_args, data_args, args)
    if data_args.streaming:
        check_streaming(args)
    record = record_arguments((model_args, data_args, args), parse_args)
    if args.demo:
        _fill_demo_paths(data_args)
    if not data_args.data_path:
        raise UsageError("--data_path is required (or --demo, or no arguments at all, for the built-in demo)")
    args = resolve_device_and_precision(model_args, args)
    _check_world_size(args)
    engine = engines.check_request(args, args.use_lora)
    output_dir = Path(args.output_dir)
    check_run_folder(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir, args.process_index == 0)
    _setup_logging(args)
    args = check_hub_args(args, output_dir)
    logger.info("world size %d | device %s | precision %s", args.world_size, args.device, _precision_name(args))
    resume = resolve_resume_path(args.resume_from_checkpoint, output_dir, args.discard_newer_checkpoints)
    main_process = args.process_index == 0

    def before_training() -> str:
        return stopped_before_training(stop, resume, main_process)

    stop.check(before_training)
    set_seed(args.seed)

    from hf_sft.data import get_format, install_chat_template, make_collator, resolve_max_seq_len

    template = get_format(data_args.template)
    loaded = load_from_checkpoint(resume, model_args, args.use_lora) if resume else None
    model, tokenizer, base_description = loaded or load_model_and_tokenizer(model_args, data_args)
    stop.check(before_training)
    record["base_model"] = base_description
    sync_special_token_ids(model, tokenizer)
    model.supervised_logits_only = True  # Trainer reads only the loss: the LM head runs on supervised positions alone
    install_chat_template(tokenizer, template)
    max_seq_len = resolve_max_seq_len(data_args.max_seq_len, model.config)
    # The main process prepares (tokenises into the `datasets` cache); the others then read what it wrote.
    with args.main_process_first(desc="data preparation"):
        data = build_run_datasets(
            data_args, tokenizer, template, max_seq_len=max_seq_len, seed=args.seed, data_seed=args.data_seed
        )
    stop.check(before_training)
    _log_data(data)
    train_dataset = data.train.dataset
    eval_dataset = data.eval.dataset if data.eval is not None else None
    if args.use_lora:
        model = _wrap_lora(model, args)

    save_total_limit = args.save_total_limit
    args = _finalise_training_args(args, has_eval=eval_dataset is not None)
    stream_callbacks = []
    if data_args.streaming:
        args = streaming_arguments(args, data.train)
        if resume:
            train_dataset.resume_at(*recorded_position(resume))
        stream_callbacks.append(StreamPositionCallback(train_dataset, examples_per_step(args)))
    samples = SampleGenerationCallback(
        tokenizer,
        template,
        args.sample_instructions.split("|") if args.sample_instructions else DEFAULT_SAMPLE_INSTRUCTIONS,
        max_new_tokens=args.sample_max_new_tokens,
    )
    preemption = PreemptionCallback(stop)
    guard = NumericGuard()
    engines.enable_on_cpu(args)
    if args.process_index == 0:
        claim_run_folder(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
        start_run_log(output_dir)
        if resume and args.discard_newer_checkpoints:
            discard_newer(output_dir, resume)
    budget = args.per_device_train_batch_size * max_seq_len if args.packing and args.token_budget_batches else None
    trainer = RunTrainer(
        checkpoint_files=CheckpointFiles(record, tokenizer),
        keep_checkpoints=save_total_limit,
        numeric_guard=guard,
        token_budget=budget,
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=make_collator(tokenizer.pad_token_id, args.packing, args.pad_to_multiple_of),
        processing_class=tokenizer,
        callbacks=[
            preemption,
            LogFileCallback(output_dir / "train.log"),
            *stream_callbacks,
            *callbacks,
        ],
    )
    engines.check_engine(engine, trainer.accelerator)
    logger.info("engine %s", engines.describe(trainer.accelerator))
    if resume:
        trainer.add_callback(ResumeCallback(resume, trainer))
    trainer.callback_handler.callbacks.insert(0, ThroughputCallback())
    if eval_dataset is not None:
        trainer.add_callback(EvaluateAtEpochEndCallback())
        trainer.add_callback(samples)
    trainer.add_callback(guard)  # the last: it cancels the save that others asked for at a bad step

    stop.check(before_training)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NothingLeftToTrain as done:
        _close_progress_bars(trainer)
        logger.info("%s", done)
    except BaseException:
        _close_progress_bars(trainer)  # now: closed when the trainer is collected, a bar would print after the error
        raise
    if guard.failure:  # before a signal's stop: a diverged run is not continued by resuming it as it is
        raise diverged(guard, output_dir, args.learning_rate, args.max_grad_norm, main_process)
    if preemption.requested and trainer.state.global_step < trainer.state.max_steps:
        raise stopped_in_training(preemption, output_dir, main_process)
    # Training has finished (a signal during its last step included): the final folder is finished too.
    if eval_dataset is not None and not _evaluated_at(trainer.state.log_history, trainer.state.global_step):
        trainer.evaluate()
    save_final(trainer, data_args, output_dir, base_description, samples.history)
    return 0


class RunTrainer(NumericGuardSteps, StagedCheckpoints, TokenBudgetTrainer):
    """The run's Trainer: steps shown to the numeric guard (`numeric_guard`), checkpoints written whole
    (`staged_save`), token-budget micro-batches (`token_budget`)."""


def _close_progress_bars(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)


def _log_data(data) -> None:
    from hf_sft.data import split_line
    from hf_sft.training.streaming import stream_line

    for role, split in (("train", data.train), ("eval", data.eval)):
        if split is not None:
            logger.info("%s", stream_line(role, split) if hasattr(split, "records") else split_line(role, split))


def _evaluated_at(history: list[dict], step: int) -> bool:
    return any("eval_loss" in entry and entry.get("step") == step for entry in history)


def _fill_demo_paths(data_args: DataArguments) -> None:
    from hf_sft.demo import DEMO_DATA

    data_args.data_path = data_args.data_path or str(DEMO_DATA)


def _check_world_size(args: SFTTrainingArguments) -> None:
    """`accelerate launch --num_processes 2` without a process group gives two separate runs: refuse that."""
    launched = engines.launched_processes()
    if launched != args.world_size:
        raise UsageError(
            f"{launched} processes were launched but this one sees world size {args.world_size}: they would train "
            "separately and overwrite each other. On CPU pass --device cpu."
        )


def _finalise_training_args(args: SFTTrainingArguments, has_eval: bool) -> SFTTrainingArguments:
    import dataclasses

    kwargs = dict(args.lr_scheduler_kwargs or {})
    if args.lr_scheduler_type == "cosine_with_min_lr" and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
        # As a rate: the `min_lr` form reads `optimizer.defaults`, which DeepSpeed's optimizers lack.
        kwargs["min_lr_rate"] = args.min_lr / args.learning_rate if args.min_lr is not None else 0.1
    changes = {
        "lr_scheduler_kwargs": kwargs,
        "save_total_limit": None,  # rotation is StagedCheckpoints', once the new checkpoint is in place
    }
    if not has_eval:
        changes["eval_strategy"] = "no"
    return dataclasses.replace(args, **changes)


def _wrap_lora(model, args: SFTTrainingArguments):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("--use_lora needs peft: pip install 'hf-sft[lora]'") from None
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
        task_type="CAUSAL_LM",
    )
    with bad_input(f"--lora_targets {args.lora_targets}"):
        model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: training %d of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def _precision_name(args: SFTTrainingArguments) -> str:
    return "bf16 autocast" if args.bf16 else "fp16 autocast + grad scaler" if args.fp16 else "fp32"


def _setup_logging(args: SFTTrainingArguments) -> None:
    """hf_sft's messages on stderr and, on rank 0, in `<output_dir>/train.log` once the folder is claimed."""
    hf_sft_logger = logging.getLogger("hf_sft")
    hf_sft_logger.setLevel(logging.INFO if args.process_index == 0 else logging.ERROR)
    if not any(isinstance(h, ConsoleHandler) for h in hf_sft_logger.handlers):
        hf_sft_logger.addHandler(ConsoleHandler())
    transformers.utils.logging.set_verbosity_warning()
    if args.process_index == 0:
        hold_run_log()
