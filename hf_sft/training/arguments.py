"""Training arguments: our own dataclass plus `TrainingArguments`, from YAML defaults and command-line overrides.

Precedence, lowest first: our defaults (those of the seed `finetune_gpt.py`), the YAML file, the command line.
The seed's flag names are accepted everywhere (YAML too) and renamed to their `TrainingArguments` equivalents.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from hf_sft.errors import UsageError

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

# Defaults of the seed script (DESIGN §1) and of nanoGPT-style fine-tuning where TrainingArguments differs.
DEFAULTS = {
    "output_dir": "out/finetune",
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 8,
    "learning_rate": 3e-5,
    "num_train_epochs": 1,
    "max_steps": -1,
    "gradient_accumulation_steps": 8,
    "logging_steps": 10,
    "save_steps": 100,
    "eval_steps": 100,
    "eval_strategy": "steps",
    "save_strategy": "steps",
    "weight_decay": 0.1,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
    "warmup_steps": 0.03,
    "lr_scheduler_type": "cosine_with_min_lr",
    "logging_first_step": True,
    "remove_unused_columns": False,
    "save_total_limit": 3,
    "report_to": "none",
    "ddp_find_unused_parameters": False,
    "seed": 1337,
    # Padding-free packing (attention per example, exact losses): no compute spent on pad tokens; on Dolly it
    # trains faster than dynamic padding on CPU (scripts/benchmark_throughput.py, README "Benchmarks").
    "packing": True,
}


POLICIES = ["drop", "truncate_input"]
SAVES = ["merged", "adapter"]


@dataclass
class SFTArguments:
    """What the model, the data and the run are; everything about optimisation lives in `TrainingArguments`."""

    config: str | None = field(default=None, metadata={"help": "YAML file whose keys give defaults for any flag."})
    demo: bool = field(
        default=False,
        metadata={"help": "Run the built-in demo (implied when no arguments are given): demo data, tiny new model."},
    )
    data_path: str | None = field(
        default=None, metadata={"help": "Training data: .jsonl/.json file(s), comma-separated, or a Hub dataset id."}
    )
    field_map: str | None = field(
        default=None, metadata={"help": "Source field names, e.g. instruction=question,output=answer."}
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Separate evaluation file (else --val_split)."})
    val_split: float = field(default=0.05, metadata={"help": "Fraction of the data held out for evaluation."})
    tokenizer_path: str | None = field(
        default=None,
        metadata={"help": "tokenizers JSON or HF folder; default: the model folder's, or one trained on the data."},
    )
    pretrained_ckpt_path: str | None = field(
        default=None,
        metadata={"help": "Base model: a legacy .pt/.pth (converted safely on the fly) or a HF folder/Hub id."},
    )
    bos_token: str | None = field(default=None, metadata={"help": "BOS token string (default [BOS])."})
    eos_token: str | None = field(default=None, metadata={"help": "EOS token string (default [EOS])."})
    pad_token: str | None = field(default=None, metadata={"help": "PAD token string (default [PAD], else EOS)."})
    unk_token: str | None = field(default=None, metadata={"help": "UNK token string (default [UNK])."})
    max_seq_len: int | None = field(default=None, metadata={"help": "Longest example in tokens (default: model max)."})
    length_policy: str = field(
        default="drop",
        metadata={
            "help": "Examples longer than max_seq_len: 'drop' or 'truncate_input'.",
            "choices": ["drop", "truncate_input"],
        },
    )
    skip_bad_records: bool = field(default=False, metadata={"help": "Skip invalid records (and count them)."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    packing: bool = field(
        default=False,
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
    min_lr: float | None = field(default=None, metadata={"help": "Floor of the cosine schedule (default lr / 10)."})
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
    model_family: str = field(
        default="llama", metadata={"help": "New model only: nanogpt or llama.", "choices": ["nanogpt", "llama"]}
    )
    n_layer: int = field(default=4, metadata={"help": "New model only: layers."})
    n_head: int = field(default=4, metadata={"help": "New model only: heads."})
    n_embd: int = field(default=128, metadata={"help": "New model only: width."})
    block_size: int = field(default=256, metadata={"help": "New model only: longest sequence."})
    dropout: float = field(default=0.0, metadata={"help": "New model only: dropout on attention and residuals."})
    tokenizer_vocab_size: int = field(default=1024, metadata={"help": "Tokenizer trained on the data: vocabulary."})
    sample_instructions: str | None = field(
        default=None, metadata={"help": "'|'-separated instructions answered at each evaluation (default: a few)."}
    )
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per sample answer."})


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


def parse_args(argv: list[str] | None = None) -> tuple[SFTArguments, TrainingArguments]:
    """Parse YAML + command line into `(SFTArguments, TrainingArguments)`; no arguments means the demo."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((SFTArguments, TrainingArguments))
    for action in parser._actions:
        if action.dest == "hub_private_repo":  # `bool | None` in TrainingArguments: let the bare flag mean true
            action.nargs, action.const = "?", True
    argv = _rename_legacy_flags(argv)
    defaults = dict(DEFAULTS)
    if not argv or "--demo" in argv:
        defaults.update(DEMO_OVERRIDES)
    config_path = _peek_config(argv)
    if config_path:
        defaults.update(load_yaml(config_path, parser))
    parser.set_defaults(**defaults)
    try:
        sft_args, training_args, leftover = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ValueError as err:  # TrainingArguments.__post_init__ rejects inconsistent combinations
        raise UsageError(str(err)) from None
    if leftover:
        raise UsageError(f"unknown arguments: {' '.join(leftover)} (see --help)")
    if training_args.include_num_input_tokens_seen == "no":
        # Counts real tokens for the tokens/s figure; argparse cannot take this as a default (its type is bool).
        training_args = dataclasses.replace(training_args, include_num_input_tokens_seen="non_padding")
    return sft_args, training_args


def load_yaml(path: str | Path, parser: HfArgumentParser) -> dict:
    """Read a training YAML; keys are flag names (seed names allowed), unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of flag names to values")
    values = {LEGACY_NAMES.get(key, key): value for key, value in values.items()}
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"{path}: unknown keys {', '.join(unknown)} (see --help for the flag names)")
    return values


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
