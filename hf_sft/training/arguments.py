"""Run arguments as transformers' example scripts split them: the model, the data, and the training run.

`ModelArguments` says where the model and its tokenizer come from, `DataArguments` what the examples are (both
`hf-sft train` and `hf-sft data` parse it, so the two commands read the data the same way), and
`SFTTrainingArguments` is `transformers.TrainingArguments` with our defaults and run extras, as TRL's `SFTConfig` is.
Every default is stated once, in its `field(...)`.

Precedence, lowest first: those defaults, the YAML file, the command line. The seed `finetune_gpt.py`'s flag names
are accepted everywhere (YAML too) and renamed to their `TrainingArguments` equivalents. A bad flag or value is one
line (exit 2), and every float flag is a finite number, on the command line and in the YAML alike.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_type_hints

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

from hf_sft.data import DataArguments
from hf_sft.errors import UsageError
from hf_sft.flags import OneLineErrors, finite_floats

# finetune_gpt.py flag -> TrainingArguments field
LEGACY_NAMES = {
    "out_dir": "output_dir",
    "batch_size": "per_device_train_batch_size",
    "num_epochs": "num_train_epochs",
    "max_iters": "max_steps",
    "log_interval": "logging_steps",
    "save_interval": "save_steps",
    "eval_interval": "eval_steps",
    "resume_from_ckpt_path": "resume_from_checkpoint",
    "grad_clip": "max_grad_norm",
    "compile": "torch_compile",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
}
_SEED_NAMES = {new: old for old, new in LEGACY_NAMES.items()}
# field -> the name the command line (or its YAML) gave it, for the fields it gives: messages use the user's spelling.
# Filled by each parse of a command line (`_prepared`).
_SPELLED: dict[str, str] = {}


def flag(name: str) -> str:
    """How a field is named in messages: as the command line (or its YAML) spelled it, else with the seed script's
    name where it has one (`--grad_clip`), else its own."""
    return f"--{_SPELLED.get(name) or _SEED_NAMES.get(name, name)}"


def spelled_as_given(message: str) -> str:
    """`message` (from argparse or TrainingArguments) with each flag the user gave under another name renamed to the
    spelling given (`--max_grad_norm`, not `--grad_clip`; `--log_interval`, not `--logging_steps`)."""
    for name, given in _SPELLED.items():
        for other in {name, _SEED_NAMES.get(name, name)} - {given}:
            message = re.sub(rf"--{re.escape(other)}\b", f"--{given}", message)
    return message


def _remember_spellings(argv: list[str]) -> None:
    _SPELLED.clear()
    for spelled in (arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")):
        field_name = spelled.replace("-", "_")
        _SPELLED[LEGACY_NAMES.get(field_name, field_name)] = spelled


@dataclass
class ModelArguments:
    """The base model and its tokenizer (a legacy checkpoint, a HF folder or Hub id, or a new model), and where
    it runs.

    `device` lives here rather than on the training arguments: `TrainingArguments.device` is a property that
    `Trainer` reads, which a field of the same name would shadow.
    """

    pretrained_ckpt_path: str | None = field(
        default=None,
        metadata={"help": "Base model: a legacy .pt/.pth (converted safely on the fly) or a HF folder/Hub id."},
    )
    tokenizer_path: str | None = field(
        default=None,
        metadata={"help": "tokenizers JSON or HF folder; default: the model folder's, or one trained on the data."},
    )
    bos_token: str | None = field(default=None, metadata={"help": "BOS token string (default [BOS])."})
    eos_token: str | None = field(default=None, metadata={"help": "EOS token string (default [EOS])."})
    pad_token: str | None = field(default=None, metadata={"help": "PAD token string (default [PAD], else EOS)."})
    unk_token: str | None = field(default=None, metadata={"help": "UNK token string (default [UNK])."})
    device: str = field(
        default="cuda",
        metadata={"help": "cuda or cpu; cuda falls back to cpu with a warning.", "choices": ["cuda", "cpu"]},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "CUDA default: bfloat16 if supported, else float16; CPU: float32 unless bfloat16 is given.",
            "choices": ["bfloat16", "float16", "float32"],
        },
    )
    model_family: str = field(
        default="llama", metadata={"help": "New model only: nanogpt or llama.", "choices": ["nanogpt", "llama"]}
    )
    n_layer: int = field(default=4, metadata={"help": "New model only: layers."})
    n_head: int = field(default=4, metadata={"help": "New model only: heads."})
    n_embd: int = field(default=128, metadata={"help": "New model only: width."})
    block_size: int = field(default=256, metadata={"help": "New model only: longest sequence."})
    dropout: float = field(default=0.0, metadata={"help": "New model only: dropout on attention and residuals."})
    tokenizer_vocab_size: int = field(default=1024, metadata={"help": "Tokenizer trained on the data: vocabulary."})

    def special_tokens(self) -> dict[str, str | None]:
        """The special-token overrides, as keyword arguments of `hf_sft.tokenizer.load_tokenizer`."""
        return {name: getattr(self, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def input_paths(self, weights: bool = True) -> list[Path]:
        """The local files and folders these arguments read (the base model, the tokenizer): a command's sources for
        `hf_sft.writer.check_destination`. Hub ids are left out; so is the base model when not `weights` (a resumed
        run takes its weights from the checkpoint it continues, which may be a seed checkpoint in its out_dir)."""
        given = (self.pretrained_ckpt_path if weights else None, self.tokenizer_path)
        return [Path(path) for path in given if path and Path(path).exists()]


@dataclass
class SFTTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the seed script's defaults (DESIGN §1) and the extras of our runs."""

    config: str | None = field(default=None, metadata={"help": "YAML file whose keys give defaults for any flag."})
    demo: bool = field(
        default=False,
        metadata={"help": "Run the built-in demo (implied when no arguments are given): demo data, tiny new model."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the checkpoints and final model of a previous run in --out_dir, or use an --out_dir "
            "holding files no run wrote (else refused). Never an input, nor a saved dataset."
        },
    )
    discard_newer_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Resuming from a checkpoint older than others in --out_dir: delete the newer ones and the final "
            "model before training (else refused)."
        },
    )
    accept_changed_data: bool = field(
        default=False,
        metadata={
            "help": "Resuming after the data changed (its files' sizes or contents differ from the checkpoint's "
            "fingerprint): continue on the data as they are (else refused). The order, the examples skipped and "
            "the result then differ from an uninterrupted run's."
        },
    )
    min_lr: float | None = field(default=None, metadata={"help": "Floor of the cosine schedule (default lr / 10)."})
    # Padding-free packing (attention per example, exact losses): no compute spent on pad tokens; on Dolly it
    # trains faster than dynamic padding on CPU (scripts/benchmark_throughput.py, docs/benchmarks.md).
    packing: bool = field(
        default=True,
        metadata={"help": "Padding-free packing of each batch into one row; `--packing false` pads instead."},
    )
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad batches to a multiple of N (e.g. 8)."})
    token_budget_batches: bool = field(
        default=True,
        metadata={
            "help": "With packing: each optimizer step's examples repacked into as few micro-batches of "
            "batch_size x max_seq_len tokens as fit (same examples and loss per step, fewer and larger forwards)."
        },
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_targets: str = field(
        default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "Comma-separated module names."}
    )
    lora_save: str = field(
        default="merged",
        metadata={
            "help": "'merged': plain model with LoRA folded in; 'adapter': the adapter alone.",
            "choices": ["merged", "adapter"],
        },
    )
    sample_instructions: str | None = field(
        default=None, metadata={"help": "'|'-separated instructions answered at each evaluation (default: a few)."}
    )
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per sample answer."})
    license: str | None = field(default=None, metadata={"help": "License in the model card's metadata."})

    # TrainingArguments fields whose defaults differ: the seed script's, and nanoGPT-style fine-tuning's.
    output_dir: str | None = field(default="out/finetune", metadata={"help": "Final model and checkpoints."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Evaluation batch size per device."})
    learning_rate: float = field(default=3e-5, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=1, metadata={"help": "Epochs (unless max_steps > 0)."})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "Batches per optimizer step."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every N steps."})
    eval_steps: float | None = field(default=100, metadata={"help": "Evaluate every N steps."})
    eval_strategy: IntervalStrategy | str = field(default="steps", metadata={"help": "When to evaluate."})
    save_strategy: SaveStrategy | str = field(default="steps", metadata={"help": "When to checkpoint."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warmup steps, or a ratio of all steps if < 1."})
    lr_scheduler_type: SchedulerType | str = field(
        default="cosine_with_min_lr", metadata={"help": "Learning-rate schedule; the floor is --min_lr."}
    )
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step too."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Our datasets hold exactly the model's columns: nothing to remove."}
    )
    save_total_limit: int | None = field(default=3, metadata={"help": "Complete checkpoints kept."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Trackers: none, tensorboard, ..."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every parameter takes part in each step."}
    )
    seed: int = field(default=1337, metadata={"help": "Random seed (also of the held-out split)."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, SFTTrainingArguments)

DEMO_OVERRIDES = {
    "demo": True,
    "output_dir": "out/demo",
    "device": "cpu",
    "model_family": "llama",
    "n_layer": 4,
    "n_head": 8,
    "n_embd": 256,
    "dropout": 0.1,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-3,
    "warmup_steps": 20,
    "weight_decay": 0.0,
    "max_steps": 300,
    "eval_steps": 25,
    "save_steps": 100,
    "logging_steps": 10,
    "val_split": 0.1,
    # From the training split: the demo shows what the model learned; held-out facts it cannot know.
    "sample_instructions": (
        "What month comes after March?|How many legs does a cat have?|What is the capital of Norway?"
    ),
}


class TrainingParser(OneLineErrors, HfArgumentParser):
    """`HfArgumentParser` over `ARGUMENT_CLASSES` whose errors are one line (`UsageError`), naming each flag as the
    user spelled it."""

    def error(self, message: str):
        super().error(spelled_as_given(message))


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, SFTTrainingArguments]:
    """Parse YAML + command line into `(ModelArguments, DataArguments, SFTTrainingArguments)`; none: the demo."""
    parser, argv, _ = _prepared(list(sys.argv[1:] if argv is None else argv))
    try:
        model_args, data_args, training_args, leftover = parser.parse_args_into_dataclasses(
            argv, return_remaining_strings=True
        )
    except json.JSONDecodeError as err:  # TrainingArguments.__post_init__ reads its dict flags as JSON
        raise UsageError(f"{_json_flag(parser, argv)} is not valid JSON: {err}") from None
    except (ValueError, UsageError) as err:  # TrainingArguments.__post_init__ rejects inconsistent combinations
        raise UsageError(spelled_as_given(str(err))) from None
    if leftover:
        raise UsageError(f"unknown arguments: {' '.join(leftover)} (see --help)")
    if training_args.include_num_input_tokens_seen == "no":
        # Counts real tokens for the tokens/s figure; argparse cannot take this as a default (its type is bool).
        training_args = dataclasses.replace(training_args, include_num_input_tokens_seen="non_padding")
    return model_args, data_args, training_args


def _json_flag(parser: HfArgumentParser, argv: list[str]) -> str:
    """The dict flag (given as a JSON string) whose value does not parse."""
    namespace, _ = parser.parse_known_args(argv)
    for name in getattr(TrainingArguments, "_VALID_DICT_FIELDS", ()):
        value = getattr(namespace, name, None)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                json.loads(value)
            except ValueError:
                return flag(name)
    return "a dict flag"


def given_fields(argv: list[str]) -> set[str]:
    """The fields that `argv` sets: named in any spelling the parser accepts, or a key of its `--config` YAML.

    The parser itself decides, so every spelling counts that it takes: `--x v`, `--x=v`, `--x-y`, `--no_x`, the
    seed script's names and unambiguous prefixes. It parses into a namespace whose every field holds a marker;
    the fields whose marker was replaced were given.
    """
    parser, argv, yaml_keys = _prepared(list(argv))
    marker = object()
    blank = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != argparse.SUPPRESS})
    namespace, _ = parser.parse_known_args(argv, namespace=blank)
    return {name for name, value in vars(namespace).items() if value is not marker} | yaml_keys


def build_parser() -> TrainingParser:
    """The training parser: every dataclass field a flag, float flags finite, `--hub_private_repo` bare."""
    parser = TrainingParser(ARGUMENT_CLASSES)
    for action in parser._actions:
        if action.dest == "hub_private_repo":  # `bool | None` in TrainingArguments: let the bare flag mean true
            action.nargs, action.const = "?", True
    finite_floats(parser, spelling=lambda action: flag(action.dest))
    return parser


def _prepared(argv: list[str]) -> tuple[TrainingParser, list[str], set[str]]:
    """The parser with its defaults for this command line (the demo's, then the YAML's), the command line with
    seed names renamed, and the YAML's keys."""
    parser = build_parser()
    given = list(argv)
    argv = _rename_legacy_flags(argv)
    defaults = {}
    if not argv or "--demo" in argv:
        defaults.update(DEMO_OVERRIDES)
    config_path = _peek_config(argv)
    _remember_spellings(given)
    values = load_yaml(config_path, parser) if config_path else {}
    defaults.update(values)
    parser.set_defaults(**defaults)
    return parser, argv, set(values)


def add_dataclass_arguments(parser, dataclass_type) -> None:
    """Add the flags of one of the argument dataclasses to a plain `argparse` (sub)parser, as HfArgumentParser does.

    Read them back with `from_namespace`.
    """
    hints = get_type_hints(dataclass_type)
    group = parser.add_argument_group(dataclass_type.__name__)
    for item in dataclasses.fields(dataclass_type):
        if item.init:
            item = copy.copy(item)  # the type is resolved on a copy: the class's own fields stay untouched
            item.type = hints[item.name]
            HfArgumentParser._parse_dataclass_field(group, item)


def from_namespace(dataclass_type, namespace):
    """The dataclass instance whose fields are read from an `argparse.Namespace` (see `add_dataclass_arguments`)."""
    return dataclass_type(**{item.name: getattr(namespace, item.name) for item in dataclasses.fields(dataclass_type)})


def load_yaml(path: str | Path, parser: HfArgumentParser) -> dict:
    """Read a training YAML; keys are flag names (seed names allowed), unknown keys are an error.

    A number for a float flag is handed to the parser as text, so that it is checked as the command line's is.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of flag names to values")
    spelled = {LEGACY_NAMES.get(key, key): key for key in values}
    for name, key in spelled.items():
        _SPELLED.setdefault(name, key)  # the command line's spelling wins, as its value does
    values = {LEGACY_NAMES.get(key, key): value for key, value in values.items()}
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UsageError(f"{path}: unknown keys {', '.join(unknown)} (see --help for the flag names)")
    for key, value in values.items():
        expected = yaml_type_problem(value, actions[key])
        if expected:
            shown = json.dumps(value, default=str, ensure_ascii=False)
            raise UsageError(f"{path}: {spelled[key]}: expected {expected}, got {shown}")
    for key, value in values.items():
        if getattr(actions[key].type, "__name__", None) == "float" and isinstance(value, int | float):
            values[key] = repr(value)
    return values


def yaml_type_problem(value: object, action: argparse.Action) -> str | None:
    """What a YAML value for `action`'s flag should have been, or None when it fits the flag's type.

    YAML values become the parser's defaults, which argparse does not convert or check (a string is converted as the
    command line's text is): each is checked here against the field's type before anything is loaded or created.
    """
    if value is None:
        return None if action.default is None else _expected(action)
    if action.dest in getattr(TrainingArguments, "_VALID_DICT_FIELDS", ()) and isinstance(value, dict):
        return None
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return f"a list, each {_expected(action)}" if any(_scalar_problem(item, action) for item in items) else None
    return _expected(action) if _scalar_problem(value, action) else None


def _scalar_problem(value: object, action: argparse.Action) -> bool:
    if isinstance(value, list | dict):
        return True
    if action.nargs == 0:  # a bare switch (`store_true`)
        return not isinstance(value, bool)
    convert, kind = action.type, getattr(action.type, "__name__", "")
    if isinstance(value, str) and callable(convert):  # converted and checked as the command line's text is
        try:
            value = convert(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError, UsageError):
            return True
    elif kind == "int":
        return isinstance(value, bool) or not isinstance(value, int)
    elif kind == "float":  # float flags are wrapped to refuse non-finite numbers (`hf_sft.flags`)
        return isinstance(value, bool) or not isinstance(value, int | float)
    elif kind == "str":
        return True  # a number or a boolean where text is wanted (`output_dir: 5`)
    elif kind == "string_to_bool":
        return not isinstance(value, bool)
    if action.choices is not None:
        return value not in action.choices and str(getattr(value, "value", value)) not in map(str, action.choices)
    return False


def _expected(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(str(getattr(c, "value", c)) for c in action.choices)
    names = {"int": "an integer", "float": "a number", "str": "a string", "string_to_bool": "true or false"}
    return "true or false" if action.nargs == 0 else names.get(getattr(action.type, "__name__", ""), "another value")


def _rename_legacy_flags(argv: list[str]) -> list[str]:
    renamed = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if name.startswith("--") and name[2:] in LEGACY_NAMES:
            name = "--" + LEGACY_NAMES[name[2:]]
        renamed.append(name + sep + value)
    return renamed


def _peek_config(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
