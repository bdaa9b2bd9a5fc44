"""The run's configuration, resolved once: command line + YAML + the checkpoint resumed + the machine -> `RunConfig`.

`resolve_run` is the one place that finishes the run's arguments, as TRL's `SFTConfig.__post_init__` does; every
stage of the run after it only reads them. In order:

1. parse the command line and its YAML (`hf_sft.training.arguments.parse_args`);
2. hold the run's log records from here on (`hf_sft.training.run_folder.start_logging`): the warnings of the steps
   below reach the console and, once the folder is claimed, `train.log`;
3. resolve the checkpoint resumed, once (`--resume_from_ckpt_path latest` logs each checkpoint it skips, once), and
   fill the flags not given from what it recorded (`hf_sft.training.resume.resume_arguments`); the data sources
   are fingerprinted once, compared with the checkpoint's (`check_resumed_data`) and recorded;
4. validate every flag (`hf_sft.training.validation.validate_arguments`), then, for a `finetune_gpt.py` checkpoint,
   write the checkpoint folder that continues it (`hf_sft.training.resume.continue_seed_run`);
5. record what `run_args.json` will hold; the demo's data; the device and precision this machine gives; the number of
   processes and the scale-out engine asked for; the Hub token kept off the arguments (Trainer pickles them into
   every checkpoint); the schedule's floor as a rate; checkpoint rotation taken from Trainer (the run's Trainer
   rotates once a new checkpoint is in place).

Two values depend on the data and are finished once the data is read (`fit_to_data`): a run without an evaluation
split does not evaluate, and a `--streaming` run's step count follows from its number of records. Then one line
warns when gradient accumulation exceeds an epoch's batches or warmup exceeds the run (`warn_about_the_schedule`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hf_sft.errors import UsageError
from hf_sft.training import engines
from hf_sft.training.arguments import DataArguments, ModelArguments, SFTTrainingArguments, flag, parse_args
from hf_sft.training.checkpoints import resolve_resume_path
from hf_sft.training.resume import (
    DATA_RECORD,
    SeedRun,
    check_resumed_data,
    continue_seed_run,
    data_fingerprints,
    record_arguments,
    resume_arguments,
)
from hf_sft.training.run_folder import start_logging
from hf_sft.training.validation import validate_arguments

if TYPE_CHECKING:
    from hf_sft.data import StreamedSplit

logger = logging.getLogger("hf_sft.train")

# Orders that need every example's length before the first step.
UNSTREAMABLE_ORDERS = ("group_by_length", "batch_rebalance")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run reads about itself, resolved once by `resolve_run`.

    Attributes:
        model: where the model and its tokenizer come from.
        data: what the examples are.
        training: Trainer's arguments, finished (device, precision, schedule, Hub token removed).
        resume: the checkpoint folder the run resumes from (resolved once), or None.
        record: what each checkpoint's `run_args.json` holds (`hf_sft.training.resume.record_arguments`).
        engine: the scale-out engine the launch asked for (`FSDP`, `DEEPSPEED`), or None.
        keep_checkpoints: `--save_total_limit`, applied by the run's Trainer once a new checkpoint is in place.
        hub_token: `--hub_token`, passed on as `HF_TOKEN` when the run starts, never saved.
    """

    model: ModelArguments
    data: DataArguments
    training: SFTTrainingArguments
    resume: str | None
    record: dict[str, Any]
    engine: str | None
    keep_checkpoints: int | None
    hub_token: str | None = field(default=None, repr=False)

    @property
    def main_process(self) -> bool:
        return self.training.process_index == 0


def resolve_run(argv: list[str] | None = None, parsed: tuple | None = None) -> RunConfig:
    """The run's configuration from its command line (or from argument dataclasses built in code).

    Args:
        argv: the command line (`--config` YAML included); None with `parsed`: the process's own.
        parsed: `(ModelArguments, DataArguments, SFTTrainingArguments)` built in code instead of a command line. No
            flag then counts as given, so nothing is filled from a checkpoint resumed (its path is still resolved).

    Raises:
        UsageError: a flag, a combination of flags, or the checkpoint resumed is refused (the message names it).
    """
    if parsed is None:
        import sys

        argv = list(sys.argv[1:] if argv is None else argv)
        parsed = parse_args(argv)
    start_logging(parsed[2].process_index)
    resume: str | SeedRun | None
    if argv is not None:
        parsed, resume = resume_arguments(argv, parsed)
    else:
        args = parsed[2]
        resume = resolve_resume_path(args.resume_from_checkpoint, args.output_dir, args.discard_newer_checkpoints)
    validate_arguments(*parsed)
    continued = isinstance(resume, SeedRun)
    if continued:
        parsed, resume = continue_seed_run(resume, parsed)
    model_args, data_args, args = parsed
    if data_args.streaming:
        check_streaming(args)
    record = record_arguments(parsed, parse_args)
    if args.demo and not data_args.data_path:
        from hf_sft.demo import DEMO_DATA

        data_args = dataclasses.replace(data_args, data_path=str(DEMO_DATA))
    if not data_args.data_path:
        raise UsageError("--data_path is required (or --demo, or no arguments at all, for the built-in demo)")
    fingerprints = data_fingerprints(data_args)
    if resume is not None and not continued:  # a finetune_gpt.py checkpoint records no data
        check_resumed_data(resume, fingerprints, args.accept_changed_data)
    record = record | {DATA_RECORD: fingerprints}
    args = resolve_device_and_precision(model_args, args)
    check_world_size(args)
    engine = engines.check_request(args, args.use_lora)
    if args.push_to_hub and args.use_lora and args.lora_save == "adapter":
        raise UsageError("--push_to_hub uploads a full model: use --lora_save merged with it")
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if args.lr_scheduler_type == "cosine_with_min_lr" and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
        # As a rate: the `min_lr` form reads `optimizer.defaults`, which DeepSpeed's optimizers lack.
        kwargs["min_lr_rate"] = args.min_lr / args.learning_rate if args.min_lr is not None else 0.1
    finished = dataclasses.replace(
        args,
        lr_scheduler_kwargs=kwargs,
        save_total_limit=None,  # rotation is the run's Trainer's, once the new checkpoint is in place
        hub_token=None,  # TrainingArguments is pickled whole into training_args.bin (each checkpoint)
    )
    return RunConfig(
        model=model_args,
        data=data_args,
        training=finished,
        resume=resume,
        record=record,
        engine=engine,
        keep_checkpoints=args.save_total_limit,
        hub_token=args.hub_token,
    )


def fit_to_data(args: SFTTrainingArguments, has_eval: bool, stream: StreamedSplit | None) -> SFTTrainingArguments:
    """The two values that follow from the data: no evaluation without an evaluation split; a stream's steps.

    Args:
        args: the resolved training arguments.
        has_eval: the run has an evaluation split.
        stream: the training split of a `--streaming` run, else None.
    """
    if not has_eval:
        args = dataclasses.replace(args, eval_strategy="no")
    return streaming_arguments(args, stream) if stream is not None else args


def warn_about_the_schedule(args: SFTTrainingArguments, examples: int) -> None:
    """One line each when an optimizer step takes more batches than an epoch holds (per process), or when warmup
    lasts longer than the run: legal, but rarely what was meant.

    Args:
        args: the run's arguments, fitted to the data (`fit_to_data`).
        examples: the training examples of an epoch (a stream's records).
    """
    per_process = math.ceil(examples / args.world_size)
    batches = max(math.ceil(per_process / args.per_device_train_batch_size), 1)
    accumulation = args.gradient_accumulation_steps
    if accumulation > batches:
        logger.warning(
            "%s %d is more than the %d batch(es) of an epoch (%d examples per process, %s %d): each optimizer step "
            "ends with the epoch, on fewer examples than asked",
            flag("gradient_accumulation_steps"),
            accumulation,
            batches,
            per_process,
            flag("per_device_train_batch_size"),
            args.per_device_train_batch_size,
        )
    # Trainer's own count: optimizer steps per epoch, then epochs (or --max_iters).
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    if args.warmup_steps >= 1 and args.warmup_steps > steps:
        logger.warning(
            "%s %g is more than the run's %d optimizer steps: the learning rate never reaches %s %g",
            flag("warmup_steps"),
            args.warmup_steps,
            steps,
            flag("learning_rate"),
            args.learning_rate,
        )


def resolve_device_and_precision(model_args: ModelArguments, args: SFTTrainingArguments) -> SFTTrainingArguments:
    """CUDA: bf16 where supported, else fp16 (with a grad scaler); CPU: fp32 unless bfloat16 is asked for.

    CPU runs stay in fp32 even where the CPU has native bf16 (`cpu_has_native_bf16`): measured on an AMX Xeon, bf16
    autocast trained 1.04x and 1.31x faster than fp32 at 21M parameters in two runs (docs/training.md, Precision).
    """
    use_cpu = args.use_cpu or model_args.device == "cpu"
    if not use_cpu and not torch.cuda.is_available():
        logger.warning("--device cuda: no CUDA device is available, training on CPU")
        use_cpu = True
    bf16, fp16 = args.bf16, args.fp16
    if not (bf16 or fp16):
        if use_cpu:
            if model_args.dtype == "bfloat16":
                bf16 = True
                if not cpu_has_native_bf16():
                    logger.warning("--dtype bfloat16: this CPU lacks native bf16 (AVX-512 BF16, AMX); fp32 is faster")
            elif model_args.dtype == "float16":
                logger.warning("--dtype float16 is ignored on CPU (fp32); bfloat16 autocast is available on CPU")
        elif model_args.dtype != "float32":
            bf16_ok = torch.cuda.is_bf16_supported()
            bf16 = model_args.dtype == "bfloat16" and bf16_ok or (model_args.dtype is None and bf16_ok)
            fp16 = not bf16
            if model_args.dtype == "bfloat16" and not bf16_ok:
                logger.warning("--dtype bfloat16: this GPU does not support it, using float16 with a grad scaler")
    return dataclasses.replace(args, use_cpu=use_cpu, bf16=bf16, fp16=fp16)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 autocast is emulated: slower."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def check_world_size(args: SFTTrainingArguments) -> None:
    """`accelerate launch --num_processes 2` without a process group gives two separate runs: refuse that."""
    launched = engines.launched_processes()
    if launched != args.world_size:
        raise UsageError(
            f"{launched} processes were launched but this one sees world size {args.world_size}: they would train "
            "separately and overwrite each other. On CPU pass --device cpu."
        )


def check_streaming(args: SFTTrainingArguments) -> None:
    """Refuse, before any work, what a stream cannot do.

    Raises:
        UsageError: length grouping, or data loader workers (the stream's position is tracked in this process).
    """
    strategy = _sampling(args)
    if strategy in UNSTREAMABLE_ORDERS:
        raise UsageError(
            f"--train_sampling_strategy {strategy} needs every example's length before the first step and cannot "
            "stream: drop --streaming or choose random or sequential"
        )
    if args.dataloader_num_workers:
        raise UsageError("--streaming reads its stream in the training process: --dataloader_num_workers must be 0")


def streaming_arguments(args: SFTTrainingArguments, split: StreamedSplit) -> SFTTrainingArguments:
    """The run's arguments for the stream of `split`; a sequential order set on it.

    Trainer needs `max_steps` for a dataset without a length: given none, it is computed from `--num_epochs` and the
    number of training records, as a map-style run computes it from its number of examples. Several processes each
    read the whole stream and keep their share of each batch (accelerate's `IterableDatasetShard`, with
    `dispatch_batches` off: a packed batch is one row and cannot be split across processes after collation). Trainer
    would replay the consumed batches of an iterable dataset on resume (reading and tokenising them again); a
    streaming run switches that replay off (`ignore_data_skip`) and starts its stream at the recorded position
    instead (`hf_sft.training.resume.recorded_position`).
    """
    split.dataset.shuffle = _sampling(args) != "sequential"
    records = split.records
    changes: dict[str, Any] = {"ignore_data_skip": True}
    if args.max_steps <= 0:
        batches = math.ceil(records / (args.per_device_train_batch_size * args.world_size))
        changes["max_steps"] = math.ceil(args.num_train_epochs * batches / args.gradient_accumulation_steps)
        logger.info(
            "--streaming: %d steps for %s epochs of %d records", changes["max_steps"], args.num_train_epochs, records
        )
    args = dataclasses.replace(args, **changes)
    args.accelerator_config.dispatch_batches = False
    return args


def examples_per_step(args: SFTTrainingArguments) -> int:
    """Examples one optimizer step takes from the stream (each process reads all of them and keeps its share)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def _sampling(args: SFTTrainingArguments) -> str:
    return str(getattr(args.train_sampling_strategy, "value", args.train_sampling_strategy))
