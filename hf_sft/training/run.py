"""One training run as named stages: set up, the model, the data, the Trainer, train, finish.

The run's configuration is resolved before the first stage (`hf_sft.training.config.resolve_run`); the stages only
read it. `TrainingRecipe.run` is the table of contents:

1. `setup`: the run folder checked (nothing is written yet), the Hub reached if the run pushes, the seed set;
2. `setup_model`: the model and tokenizer, from the checkpoint resumed or the base model;
3. `setup_data`: the datasets (the main process prepares, the others read its cache), positioned where a streaming
   checkpoint left its stream;
4. `make_trainer`: the run folder claimed and locked, the run's Trainer (over LoRA adapters with `--use_lora`) with
   its callbacks in their order;
5. `train`: `Trainer.train`, from the checkpoint resumed;
6. `finish`: a diverged or signalled run stops with its last line; else the final evaluation and the final folder.

A signal (`hf_sft.training.signals`) stops the run between stages, at an optimizer-step boundary, or after the
final save; the handler itself is installed once per command by `hf_sft.cli`.
"""

from __future__ import annotations

import inspect
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

from hf_sft.data import build_run_datasets, cache_root, get_format
from hf_sft.errors import UsageError, bad_input
from hf_sft.training import engines
from hf_sft.training.arguments import DataArguments, ModelArguments, SFTTrainingArguments
from hf_sft.training.callbacks import (
    DEFAULT_SAMPLE_INSTRUCTIONS,
    LogFileCallback,
    NumericGuard,
    PreemptionCallback,
    SampleGenerationCallback,
    StreamPositionCallback,
    close_progress_bars,
    diverged,
    register_callbacks,
)
from hf_sft.training.checkpoints import CheckpointFiles
from hf_sft.training.config import RunConfig, examples_per_step, fit_to_data, resolve_run, warn_about_the_schedule
from hf_sft.training.final_folder import push_final, save_final
from hf_sft.training.model_and_data import (
    load_model_and_tokenizer,
    sync_special_token_ids,
)
from hf_sft.training.resume import NothingLeftToTrain, load_from_checkpoint, recorded_position
from hf_sft.training.run_folder import (
    check_run_folder,
    claim_run_folder,
    discard_newer,
    release_run_folders,
    start_run_log,
)
from hf_sft.training.signals import (
    STOP,
    StopRequests,
    stopped_after_training,
    stopped_before_training,
    stopped_in_training,
)
from hf_sft.training.trainer import SUPERVISED_POSITIONS, RunTrainer, WithSupervisedPositions
from hf_sft.writer import check_cache

logger = logging.getLogger("hf_sft.train")


def main(argv: list[str] | None = None) -> int:
    """Resolve the run's configuration from the command line (or YAML, or the checkpoint it resumes) and train."""
    return train(resolve_run(argv))


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: SFTTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> int:
    """Train with argument dataclasses built in code (see `train`); returns the process exit status."""
    return train(resolve_run(parsed=(model_args, data_args, args)), callbacks)


def train(config: RunConfig, callbacks: list[TrainerCallback] | None = None, stop: StopRequests = STOP) -> int:
    """Train as configured; returns the process exit status.

    Args:
        config: the run's configuration (`resolve_run`).
        callbacks: added to the run's own (the throughput benchmark measures through one).
        stop: the signal record (`hf_sft.training.signals.STOP`, which `hf_sft.cli` installs).

    Raises:
        RunInterrupted: a SIGTERM/SIGINT came (`hf_sft.training.signals` says what each moment of it means).
        TrainingDiverged: a non-finite loss, gradient norm or weights stopped training (`NumericGuard`).
    """
    try:
        status = TrainingRecipe(config, list(callbacks or []), stop).run()
    finally:
        release_run_folders()
        engines.leave_process_group()
        stop.echo = False  # the run's last line follows: nothing may print after it
    if stop.requested:  # it came once training had finished: the final folder was finished first
        raise stopped_after_training(stop, Path(config.training.output_dir), config.main_process)
    return status


class TrainingRecipe:
    """One run's stages, in the order `run` calls them (the module docstring says what each does).

    Args:
        config: the run's configuration.
        callbacks: the caller's callbacks.
        stop: the signal record.
    """

    def __init__(self, config: RunConfig, callbacks: list[TrainerCallback], stop: StopRequests):
        self.config = config
        self.args = config.training
        self.resume = config.resume
        self.output_dir = Path(self.args.output_dir)
        self.main_process = config.main_process
        self.callbacks = callbacks
        self.stop = stop

    def run(self) -> int:
        """The stages in order; the exit status."""
        self.setup()
        model, tokenizer, template, base = self.setup_model()
        train_dataset, eval_dataset, stream = self.setup_data(tokenizer, template)
        trainer = self.make_trainer(model, tokenizer, template, train_dataset, eval_dataset, stream, base)
        self.train(trainer)
        self.finish(trainer, base)
        return 0

    def check_stop(self) -> None:
        """Between stages: stop here if a signal came (nothing was trained)."""
        self.stop.check(lambda: stopped_before_training(self.stop, self.resume, self.main_process))

    def setup(self) -> None:
        """Check the run folder (nothing is written yet), reach the Hub if the run pushes, set the seed."""
        args = self.args
        sources = [*self.config.model.input_paths(weights=not self.resume), *self.config.data.input_paths()]
        check_run_folder(
            self.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir, self.main_process, sources
        )
        check_cache(cache_root(None), "the datasets cache", sources)
        self._prepare_hub()
        logger.info("world size %d | device %s | precision %s", args.world_size, args.device, _precision_name(args))
        self.check_stop()
        set_seed(args.seed)

    def setup_model(self) -> tuple[Any, Any, Any, str]:
        """The model (its weights restored later by Trainer when resuming), tokenizer, prompt format and the
        description of the base model."""
        from hf_sft.data import install_chat_template, resolve_max_seq_len

        config, args = self.config, self.args
        template = get_format(config.data.template)
        loaded = load_from_checkpoint(self.resume, config.model, args.use_lora) if self.resume else None
        model, tokenizer, base = loaded or load_model_and_tokenizer(config.model, config.data)
        self.check_stop()
        sync_special_token_ids(model, tokenizer)
        model.supervised_logits_only = True  # Trainer reads only the loss: the LM head runs on supervised positions
        install_chat_template(tokenizer, template)
        self.max_seq_len = resolve_max_seq_len(config.data.max_seq_len, model.config)
        return model, tokenizer, template, base

    def setup_data(self, tokenizer, template) -> tuple[Any, Any | None, Any | None]:
        """The training and evaluation datasets, and the training stream of a `--streaming` run (else None)."""
        data_args, args = self.config.data, self.args
        # The main process prepares (tokenises into the `datasets` cache); the others then read what it wrote.
        with args.main_process_first(desc="data preparation"):
            data = build_run_datasets(
                data_args, tokenizer, template, max_seq_len=self.max_seq_len, seed=args.seed, data_seed=args.data_seed
            )
        self.check_stop()
        for line in data.describe():
            logger.info("%s", line)
        self.template, self.eval_split = template, data.eval
        train_dataset = data.train.dataset
        eval_dataset = data.eval.dataset if data.eval is not None else None
        stream = data.train if data_args.streaming else None
        self.args = fit_to_data(args, has_eval=eval_dataset is not None, stream=stream)
        warn_about_the_schedule(self.args, stream.records if stream is not None else len(train_dataset))
        if stream is not None and self.resume:
            train_dataset.resume_at(*recorded_position(self.resume))
        return train_dataset, eval_dataset, stream

    def make_trainer(
        self, model: Any, tokenizer: Any, template: Any, train_dataset: Any, eval_dataset: Any, stream: Any, base: str
    ) -> RunTrainer:
        """Claim the run folder, then the run's Trainer over the model (LoRA adapters with `--use_lora`)."""
        from hf_sft.data import make_collator

        config, args = self.config, self.args
        # Our causal LM takes the positions its supervised-only head scores from the batch (no host sync in the step).
        with_positions = SUPERVISED_POSITIONS in inspect.signature(model.forward).parameters
        if args.use_lora:
            model = _wrap_lora(model, args)
        self.samples = SampleGenerationCallback(
            tokenizer,
            template,
            args.sample_instructions.split("|") if args.sample_instructions else DEFAULT_SAMPLE_INSTRUCTIONS,
            max_new_tokens=args.sample_max_new_tokens,
        )
        self.preemption = PreemptionCallback(self.stop)
        self.guard = NumericGuard()
        engines.enable_on_cpu(args)
        if self.main_process:
            claim_run_folder(self.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
            start_run_log(self.output_dir)
            if self.resume and args.discard_newer_checkpoints:
                discard_newer(self.output_dir, self.resume)
        budget = (
            args.per_device_train_batch_size * self.max_seq_len if args.packing and args.token_budget_batches else None
        )
        collate = make_collator(tokenizer.pad_token_id, args.packing, args.pad_to_multiple_of)
        trainer = RunTrainer(
            checkpoint_files=CheckpointFiles({**config.record, "base_model": base}, tokenizer),
            keep_checkpoints=config.keep_checkpoints,
            numeric_guard=self.guard,
            token_budget=budget,
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=WithSupervisedPositions(collate) if with_positions else collate,
            processing_class=tokenizer,
        )
        engines.check_engine(config.engine, trainer.accelerator)
        logger.info("engine %s", engines.describe(trainer.accelerator))
        register_callbacks(
            trainer,
            preemption=self.preemption,
            log_file=LogFileCallback(self.output_dir / "train.log"),
            guard=self.guard,
            stream=StreamPositionCallback(train_dataset, examples_per_step(args)) if stream is not None else None,
            resume=self.resume,
            samples=self.samples if eval_dataset is not None else None,
            extra=self.callbacks,
        )
        return trainer

    def train(self, trainer: RunTrainer) -> None:
        """`Trainer.train` from the checkpoint resumed; the progress bars closed if it ends early."""
        self.check_stop()
        try:
            trainer.train(resume_from_checkpoint=self.resume)
        except NothingLeftToTrain as done:
            close_progress_bars(trainer)
            logger.info("%s", done)
        except BaseException:
            close_progress_bars(
                trainer
            )  # now: closed when the trainer is collected, a bar would print after the error
            raise

    def finish(self, trainer: RunTrainer, base: str) -> None:
        """A diverged or signalled run stops with its last line; else the final evaluation and the final folder."""
        args = self.args
        if self.guard.failure:  # before a signal's stop: a diverged run is not continued by resuming it as it is
            raise diverged(self.guard, self.output_dir, args.learning_rate, args.max_grad_norm, self.main_process)
        if self.preemption.requested and trainer.state.global_step < trainer.state.max_steps:
            raise stopped_in_training(self.preemption, self.output_dir, self.main_process)
        # Training has finished (a signal during its last step included): the final folder is finished too.
        if trainer.eval_dataset is not None and not _evaluated_at(
            trainer.state.log_history, trainer.state.global_step
        ):
            trainer.evaluate()
        repo_id = save_final(trainer, self.config.data, self.output_dir, base, self.samples.history)
        if not trainer.is_world_process_zero():
            return
        self._evaluate_final_folder()
        if repo_id:  # last, so that the upload carries the evaluation
            push_final(trainer, self.output_dir, repo_id)

    def _evaluate_final_folder(self) -> None:
        """The final folder against the model the run started from, on the run's evaluation split, as `hf-sft eval`
        writes it (`eval_results.json`, `eval_report.html`, the card's model-index)."""
        args, model_args, data_args = self.args, self.config.model, self.config.data
        split = self.eval_split
        if split is None:
            return
        from hf_sft.data import is_saved_dataset, parse_field_map
        from hf_sft.evaluation import evaluate_after_training

        # What `hf-sft eval` cannot read back: a stream, an adapter folder, tokens saved without their records.
        why = (
            "a streamed split" if split.streamed
            else "an adapter folder" if args.use_lora and args.lora_save == "adapter"
            else "a tokenised --save_to folder" if any(map(is_saved_dataset, data_args.data_paths()))
            else None
        )  # fmt: skip
        if why:
            logger.info("no final evaluation for %s: run hf-sft eval %s on the records", why, self.output_dir)
            return
        evaluate_after_training(
            self.output_dir,
            split,
            records_source=data_args.eval_data_path or data_args.data_path,
            base=model_args.pretrained_ckpt_path,  # None for a model trained from scratch: nothing to compare
            base_tokenizer_path=model_args.tokenizer_path,
            special_tokens=model_args.special_tokens(),
            field_map=parse_field_map(data_args.field_map),
            command=shlex.join(sys.argv),
            batch_size=args.per_device_eval_batch_size,
            packing=args.packing,
            device=str(args.device),
            dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None,
            hub_options={
                "dataset_config": data_args.dataset_config,
                "dataset_split": data_args.dataset_split,
                "dataset_revision": data_args.dataset_revision,
            },
            data_settings={
                "template": self.template.name,
                "max_seq_len": self.max_seq_len,
                "length_policy": data_args.length_policy,
                "val_split": data_args.val_split,
                "seed": args.seed,
            },
        )
        logger.info("final evaluation written to %s", self.output_dir)

    def _prepare_hub(self) -> None:
        """`--push_to_hub`: check the token and the network before training, not after it; keep the token off disk."""
        if self.config.hub_token:
            os.environ["HF_TOKEN"] = self.config.hub_token
            logger.warning("--hub_token is passed on as HF_TOKEN and not saved; prefer HF_TOKEN or `hf auth login`")
        if not self.args.push_to_hub or not self.main_process:
            return
        from hf_sft.hub import check_hub

        user = check_hub()
        repo = self.args.hub_model_id or f"{user}/{self.output_dir.resolve().name}"
        logger.info("will push to %s as %s", repo, user)


def _evaluated_at(history: list[dict], step: int) -> bool:
    return any("eval_loss" in entry and entry.get("step") == step for entry in history)


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
