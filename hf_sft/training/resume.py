"""`--resume_from_ckpt_path` alone continues a run: arguments, model and tokenizer come from the checkpoint.

Each checkpoint holds `run_args.json`: the run's arguments that differ from the defaults of a plain or a `--demo`
invocation, plus the values that fix the run's shape (model, max_seq_len, batch layout, number of processes). On
resume those values fill every flag the command line (or its YAML) does not give. JSON rather than Trainer's
pickled `training_args.bin`, which nothing here unpickles.

A flag given on resume, in any spelling the parser takes (`given_fields`), either takes effect or is refused:

- `KEPT_ON_RESUME` are refused when they differ from the checkpoint's run, each named: the model and tokenizer, the
  data and its order (the restored data position counts batches of the same examples in the same order), the batch
  layout and the optimizer and schedule types (their restored state belongs to them).
- Everything else takes effect. Most of it Trainer reads from the arguments as it goes; what it restores from the
  checkpoint instead, `hf_sft.training.resumed_state.ResumeCallback` sets back from the arguments once Trainer has
  restored it (the optimizer's hyperparameters, the schedule's peak, the step intervals).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

from hf_sft.errors import UsageError, bad_input
from hf_sft.training.arguments import flag, given_fields
from hf_sft.training.checkpoints import resolve_resume_path
from hf_sft.training.engines import launched_processes
from hf_sft.training.validation import argument_values

logger = logging.getLogger("hf_sft.train")

RUN_ARGS_FILE = "run_args.json"
# What fixes the run's shape (the weights, the sequence length, the batch layout): recorded whatever its value.
SHAPE_FIELDS = (
    "pretrained_ckpt_path",
    "tokenizer_path",
    "model_family",
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "tokenizer_vocab_size",
    "use_lora",
    "lora_r",
    "lora_targets",
    "max_seq_len",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
)
# Every flag a resumed run refuses to change (see the module docstring).
KEPT_ON_RESUME = (
    # the model and its tokenizer
    "pretrained_ckpt_path",
    "tokenizer_path",
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "model_family",
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "dropout",
    "tokenizer_vocab_size",
    "use_lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    # the data and their order: the restored data position counts batches of these examples in this order
    "data_path",
    "data_weights",
    "dataset_config",
    "dataset_split",
    "dataset_revision",
    "eval_data_path",
    "field_map",
    "streaming",
    "val_split",
    "template",
    "length_policy",
    "skip_bad_records",
    "max_seq_len",
    "seed",
    "data_seed",
    "train_sampling_strategy",
    "dataloader_drop_last",
    "packing",
    "token_budget_batches",
    # the batch layout
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    # the optimizer and the schedule: their restored state belongs to their types
    "optim",
    "optim_args",
    "lr_scheduler_type",
)
KEPT = "its model, tokenizer, data, data order, batch layout, optimizer and schedule type"
# Where the run is, what it resumes from and what it may delete, secrets, and the YAML file (its values are recorded
# one by one).
_NOT_RECORDED = {
    "output_dir",
    "logging_dir",
    "resume_from_checkpoint",
    "hub_token",
    "config",
    "overwrite_output_dir",
    "discard_newer_checkpoints",
}


def record_arguments(parsed: tuple, parse: Callable[[list[str]], tuple]) -> dict[str, Any]:
    """What `run_args.json` holds for these parsed arguments.

    Args:
        parsed: the parsed argument dataclasses, before the run adjusts them.
        parse: the command-line parser (`hf_sft.training.arguments.parse_args`), for the defaults to compare with.
    """
    values = argument_values(*parsed)
    # Whether or not the resuming command says --demo, every value that its defaults would not give is recorded.
    defaults = _defaults(parse, values["output_dir"])
    recorded, shape = {}, {}
    for name, value in values.items():
        value = _plain(value)
        if name in _NOT_RECORDED or value is _UNRECORDABLE:
            continue
        if name in SHAPE_FIELDS:
            shape[name] = value
        elif any(value != _plain(default.get(name)) for default in defaults):
            recorded[name] = value
    return {"values": recorded, "shape": shape, "world_size": launched_processes()}


def resume_arguments(argv: list[str], parsed: tuple, parse: Callable[[list[str]], tuple] | None = None) -> tuple:
    """With `--resume_from_ckpt_path`, fill every flag not given from the checkpoint's `run_args.json`.

    `--out_dir` defaults to the folder that holds the checkpoint.

    Args:
        argv: the command line (the flags it gives are found with `given_fields`).
        parsed: its parsed argument dataclasses.
        parse: the command-line parser, for the defaults a run did not record (default: `parse_args`).

    Raises:
        UsageError: a given flag would change what a resumed run keeps (all differences named), `--max_iters` is
            not beyond the checkpoint's step, or a seed `.pt` was given.
    """
    values = argument_values(*parsed)
    resume = values.get("resume_from_checkpoint")
    if not resume:
        return parsed
    explicit = given_fields(argv)
    if parse is None:
        from hf_sft.training.arguments import parse_args as parse
    if Path(resume).is_file():
        from hf_sft.training.continuation import read_seed_run

        run = read_seed_run(resume)
        if run is not None:
            from hf_sft.training.continuation import continuation_arguments

            return continuation_arguments(run, explicit, parsed, parse)
    discard = bool(values.get("discard_newer_checkpoints"))
    # The folder the run will write: `--out_dir`, else the one holding the checkpoint.
    out_dir = values["output_dir"] if "output_dir" in explicit or resume == "latest" else Path(resume).parent
    checkpoint = Path(resolve_resume_path(resume, out_dir, discard_newer=discard, warn=False))
    changes: dict[str, Any] = {}
    if "output_dir" not in explicit:
        changes["output_dir"] = str(checkpoint.parent)
    record = read_record(checkpoint)
    if record is None:
        logger.warning("%s has no %s: the run's flags come from the command line alone", checkpoint, RUN_ARGS_FILE)
        return replace_arguments(parsed, changes)
    saved = {**record["values"], **record["shape"]}
    plain = _defaults(parse, values["output_dir"])[0]
    # A field the run did not record had the value both invocations give by default.
    used = {name: saved[name] if name in saved else _plain(plain.get(name)) for name in values}
    differences = [
        f"{flag(name)} {_plain(values[name])} (the checkpoint's run: {used[name]})"
        for name in KEPT_ON_RESUME
        if name in explicit and name in values and _plain(values[name]) != used[name]
    ]
    if record.get("world_size", 1) != launched_processes():
        differences.append(f"{launched_processes()} processes (the checkpoint's run: {record['world_size']})")
    if differences:
        raise UsageError(
            f"--resume_from_ckpt_path {checkpoint}: {'; '.join(differences)}. A resumed run keeps {KEPT}; to "
            f"change them, start a new run from its weights with --pretrained_ckpt_path {checkpoint}"
        )
    check_steps_left(values, explicit, checkpoint_step(checkpoint))
    changes.update({name: value for name, value in saved.items() if name not in explicit and name in values})
    return replace_arguments(parsed, changes)


def check_steps_left(values: dict[str, Any], explicit: set[str], step: int) -> None:
    """Refuse a `--max_iters` given on resume that is not beyond the checkpoint's step."""
    if "max_steps" in explicit and 0 < values["max_steps"] <= step:
        raise UsageError(
            f"--max_iters {values['max_steps']} is not beyond the checkpoint's step {step}: nothing is left to train"
        )


def _defaults(parse: Callable[[list[str]], tuple], output_dir: str) -> list[dict[str, Any]]:
    """The argument values of a plain and of a `--demo` invocation that give nothing else."""
    out_dir = ["--output_dir", str(output_dir)]
    return [argument_values(*parse([*demo, *out_dir])) for demo in ([], ["--demo"])]


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step a checkpoint was written at (its `trainer_state.json`), 0 if unreadable."""
    try:
        return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def read_record(checkpoint: str | Path) -> dict | None:
    """The checkpoint's `run_args.json`, or None if it has none."""
    path = Path(checkpoint) / RUN_ARGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UsageError(f"{path} is not valid JSON: {err}") from None


def load_from_checkpoint(checkpoint: str | Path, model_args: Any, use_lora: bool):
    """The model (architecture only: Trainer restores the weights) and the tokenizer saved in a checkpoint.

    Args:
        checkpoint: a checkpoint folder.
        model_args: the parsed arguments holding the special-token flags.
        use_lora: the run trains a LoRA adapter.

    Returns:
        `(model, tokenizer, description of the base model)`, or None where the checkpoint lacks `config.json` or
        `tokenizer.json`, or holds a LoRA adapter (whose base model comes from `--pretrained_ckpt_path`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_sft.tokenizer import load_tokenizer

    checkpoint = Path(checkpoint)
    if use_lora or not (checkpoint / "config.json").is_file():
        return None
    if not (checkpoint / "tokenizer.json").is_file():
        return None
    specials = {name: getattr(model_args, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    tokenizer = load_tokenizer(checkpoint, **specials)
    # The sharded checkpoints of FSDP/DeepSpeed hold no model.safetensors: the config suffices to build the model.
    with bad_input(f"--resume_from_ckpt_path {checkpoint}: cannot read the model configuration"):
        config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base = (read_record(checkpoint) or {}).get("base_model", f"checkpoint {checkpoint}")
    return model, tokenizer, base


class _Unrecordable:
    pass


_UNRECORDABLE = _Unrecordable()


def _plain(value: Any) -> Any:
    """The value as JSON gives it back (enums as their values, tuples as lists), or `_UNRECORDABLE`."""
    try:
        return json.loads(json.dumps(value, default=_enum_value))
    except (TypeError, ValueError):
        return _UNRECORDABLE


def _enum_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    raise TypeError(type(value).__name__)


def replace_arguments(parsed: tuple, changes: dict[str, Any]) -> tuple:
    """`parsed` with `changes` (field -> value) applied to whichever dataclass holds each field."""
    result = []
    for obj in parsed:
        own = {f.name for f in dataclasses.fields(obj) if f.init}
        mine = {name: value for name, value in changes.items() if name in own}
        try:
            result.append(dataclasses.replace(obj, **mine) if mine else obj)
        except ValueError as err:  # TrainingArguments rejects an inconsistent combination
            raise UsageError(f"the checkpoint's arguments with the ones given: {err}") from None
    return tuple(result)
