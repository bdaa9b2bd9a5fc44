"""`--resume_from_ckpt_path` alone continues a run: arguments, model and tokenizer come from the checkpoint.

Each checkpoint holds `run_args.json`: the run's arguments that differ from the defaults of a plain or a `--demo`
invocation, plus the values that fix the run's shape (model, max_seq_len, batch layout, number of processes). On
resume those values fill every flag the command line (or its YAML) does not give; a given flag overrides, unless it
would change the shape. JSON rather than Trainer's pickled `training_args.bin`, which nothing here unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from hf_sft.errors import UsageError
from hf_sft.training.arguments import LEGACY_NAMES
from hf_sft.training.checkpoints import resolve_resume_path
from hf_sft.training.validation import argument_values, flag

logger = logging.getLogger("hf_sft.train")

RUN_ARGS_FILE = "run_args.json"
# Flags that a resumed run may not change: the weights, the sequence length and the batch layout are the run's.
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
# Where the run is, what it resumes from, secrets, and the YAML file (its values are recorded one by one).
_NOT_RECORDED = {"output_dir", "logging_dir", "resume_from_checkpoint", "hub_token", "config", "overwrite_output_dir"}


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def record_arguments(parsed: tuple, parse: Callable[[list[str]], tuple]) -> dict[str, Any]:
    """What `run_args.json` holds for these parsed arguments.

    Args:
        parsed: the parsed argument dataclasses, before the run adjusts them.
        parse: the command-line parser (`hf_sft.training.arguments.parse_args`), for the defaults to compare with.
    """
    values = argument_values(*parsed)
    # Whether or not the resuming command says --demo, every value that its defaults would not give is recorded.
    out_dir = ["--output_dir", str(values["output_dir"])]
    defaults = [argument_values(*parse([*demo, *out_dir])) for demo in ([], ["--demo"])]
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


def resume_arguments(argv: list[str], parsed: tuple) -> tuple:
    """With `--resume_from_ckpt_path`, fill every flag not given from the checkpoint's `run_args.json`.

    `--out_dir` defaults to the folder that holds the checkpoint.

    Raises:
        UsageError: a given flag would change the run's shape (all differences named), or a seed `.pt` was given.
    """
    values = argument_values(*parsed)
    resume = values.get("resume_from_checkpoint")
    if not resume:
        return parsed
    explicit = given_flags(argv, set(values))
    checkpoint = Path(resolve_resume_path(resume, values["output_dir"]))
    changes: dict[str, Any] = {}
    if "output_dir" not in explicit:
        changes["output_dir"] = str(checkpoint.parent)
    record = read_record(checkpoint)
    if record is None:
        logger.warning("%s has no %s: the run's flags come from the command line alone", checkpoint, RUN_ARGS_FILE)
        return _replace(parsed, changes)
    saved = {**record["values"], **record["shape"]}
    differences = [
        f"{flag(name)} {values[name]} (the checkpoint's run: {saved[name]})"
        for name in SHAPE_FIELDS
        if name in explicit and name in saved and _plain(values[name]) != saved[name]
    ]
    if record.get("world_size", 1) != launched_processes():
        differences.append(f"{launched_processes()} processes (the checkpoint's run: {record['world_size']})")
    if differences:
        raise UsageError(
            f"--resume_from_ckpt_path {checkpoint}: {'; '.join(differences)}. A resumed run keeps its model, "
            "max_seq_len and batch layout; to change them, start a new run with --pretrained_ckpt_path"
        )
    changes.update({name: value for name, value in saved.items() if name not in explicit and name in values})
    return _replace(parsed, changes)


def given_flags(argv: list[str], names: set[str]) -> set[str]:
    """The fields named on the command line (seed names and `--no_x` included) or as keys of its `--config` YAML."""
    given = set()
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        name = LEGACY_NAMES.get(name, name)
        if name not in names and name.startswith("no_"):
            name = name[3:]
        given.add(name)
        if name == "config":
            path = arg.split("=", 1)[1] if "=" in arg else argv[i + 1] if i + 1 < len(argv) else None
            keys = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {} if path else {}
            given |= {LEGACY_NAMES.get(key, key) for key in keys}
    return given


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
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=torch.float32)
    base = (read_record(checkpoint) or {}).get("base_model", f"checkpoint {checkpoint}")
    return model, tokenizer, base


class RunRecordCallback(TrainerCallback):
    """Writes `run_args.json` into each checkpoint (list it before the callback that marks checkpoints complete).

    It also writes the model's `config.json` and the tokenizer where the checkpoint lacks them, as a sharded one
    (FSDP, ZeRO-3) may: resuming builds the model from them.
    """

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not folder.is_dir():
            return
        text = json.dumps(self.record, indent=2, sort_keys=True)
        (folder / RUN_ARGS_FILE).write_text(text + "\n", encoding="utf-8")
        config = getattr(model, "config", None)
        if config is not None and not self.record["shape"].get("use_lora") and not (folder / "config.json").is_file():
            config.save_pretrained(folder)
        if processing_class is not None and not (folder / "tokenizer.json").is_file():
            processing_class.save_pretrained(folder)


class ResumeLogCallback(TrainerCallback):
    """Logs `resumed from checkpoint-N (step N of M)` once Trainer has restored the checkpoint's state."""

    def __init__(self, checkpoint: str | Path):
        self.name = Path(checkpoint).name

    def on_train_begin(self, args, state, control, **kwargs):
        logger.info("resumed from %s (step %d of %d)", self.name, state.global_step, state.max_steps)


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


def _replace(parsed: tuple, changes: dict[str, Any]) -> tuple:
    result = []
    for obj in parsed:
        own = {f.name for f in dataclasses.fields(obj) if f.init}
        mine = {name: value for name, value in changes.items() if name in own}
        try:
            result.append(dataclasses.replace(obj, **mine) if mine else obj)
        except ValueError as err:  # TrainingArguments rejects an inconsistent combination
            raise UsageError(f"the checkpoint's arguments with the ones given: {err}") from None
    return tuple(result)
