"""Every training flag checked before any work: numbers finite and within their range, paths of the right kind.

Fields are read by name from whichever parsed dataclass holds them, so the checks do not depend on how the
arguments are grouped. Three kinds of rule, each declared once:

- every number anywhere in the arguments (a field, or a number inside a dict such as `--lr_scheduler_kwargs`) is
  one that torch and the C code under Python can hold: floats finite, integers within 64 bits. No flag is accepted
  and then dies later (the parser already refuses `inf`/`nan` on the command line and in the YAML; this also covers
  integers and arguments built in code);
- `RANGES`: one field's admissible values;
- `RELATIONS`: rules between two fields (`--min_lr` not above `--learning_rate`).

Paths are checked for their kind, and what the run asks transformers for (a tracker, an optimizer) for being
installed, so that none of it fails once the run has started. Nothing here creates a file or a folder.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_sft.data.sources import folder_problem
from hf_sft.errors import UsageError
from hf_sft.flags import not_finite
from hf_sft.training.arguments import flag
from hf_sft.training.model_and_data import LEGACY_SUFFIXES

Rule = tuple[str, Callable[[Any], bool]]

AT_LEAST_ONE: Rule = ("must be at least 1", lambda v: v >= 1)
POSITIVE: Rule = ("must be greater than 0", lambda v: v > 0)
NON_NEGATIVE: Rule = ("must not be negative", lambda v: v >= 0)
FRACTION: Rule = ("must be in [0, 1)", lambda v: 0 <= v < 1)
# numpy's seed is 32-bit: transformers' set_seed fails on anything larger, after the run has started.
SEED: Rule = ("must be in [0, 4294967295]", lambda v: 0 <= v < 2**32)

# field -> rule; a field that is None (unset, "use the default") is not checked.
RANGES: dict[str, Rule] = {
    "per_device_train_batch_size": AT_LEAST_ONE,
    "per_device_eval_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE,
    "learning_rate": POSITIVE,
    "num_train_epochs": POSITIVE,
    "max_steps": ("must be -1 (train for --num_epochs) or at least 1", lambda v: v == -1 or v >= 1),
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "save_total_limit": AT_LEAST_ONE,
    "warmup_steps": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "adam_epsilon": POSITIVE,
    "max_grad_norm": NON_NEGATIVE,
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE,
    "val_split": FRACTION,
    "max_seq_len": AT_LEAST_ONE,
    "num_proc": AT_LEAST_ONE,
    "pad_to_multiple_of": AT_LEAST_ONE,
    "lora_r": AT_LEAST_ONE,
    "lora_alpha": POSITIVE,
    "lora_dropout": FRACTION,
    "n_layer": AT_LEAST_ONE,
    "n_head": AT_LEAST_ONE,
    "n_embd": AT_LEAST_ONE,
    "block_size": AT_LEAST_ONE,
    "dropout": FRACTION,
    "tokenizer_vocab_size": AT_LEAST_ONE,
    "sample_max_new_tokens": AT_LEAST_ONE,
}

# (field, other field, holds for (value, other), requirement); checked when both are set.
RELATIONS: list[tuple[str, str, Callable[[Any, Any], bool], str]] = [
    ("min_lr", "learning_rate", lambda low, peak: low <= peak, "must not be above"),
]


def argument_values(*parsed: Any) -> dict[str, Any]:
    """Every field of the parsed argument dataclasses, by name."""
    return {f.name: getattr(obj, f.name) for obj in parsed for f in dataclasses.fields(obj)}


def validate_arguments(*parsed: Any) -> None:
    """Check finiteness, ranges, relations and path kinds of the parsed arguments; reads files, creates none.

    Raises:
        UsageError: naming the first flag that is not finite, out of range, inconsistent with another, or a path of
            the wrong kind.
    """
    values = argument_values(*parsed)
    for name, value in values.items():
        for where, number in _numbers(value):
            if isinstance(number, float) and not math.isfinite(number):
                raise UsageError(not_finite(f"{flag(name)}{where}", number))
            if isinstance(number, int) and not -(2**63) <= number < 2**63:
                raise UsageError(f"{flag(name)}{where} must fit in 64 bits (at most {2**63 - 1}), got {number}")
    for name, (requirement, ok) in RANGES.items():
        value = values.get(name)
        if value is not None and not isinstance(value, bool) and not ok(value):
            raise UsageError(f"{flag(name)} {requirement}, got {value}")
    for name, other, holds, requirement in RELATIONS:
        value, reference = values.get(name), values.get(other)
        if value is not None and reference is not None and not holds(value, reference):
            raise UsageError(f"{flag(name)} {requirement} {flag(other)}: got {value} > {reference}")
    _check_scheduler_floor(values)
    if values.get("enable_jit_checkpoint"):
        # Trainer's SIGTERM handler would replace hf_sft's one handler (hf_sft.training.signals), which saves anyway.
        raise UsageError("--enable_jit_checkpoint is not needed: SIGTERM and SIGINT save a checkpoint and stop anyway")
    _check_paths(values)
    _check_installed(values, parsed)


def _numbers(value: Any, where: str = "") -> list[tuple[str, int | float]]:
    """Every number in `value` (nested in dicts and lists too; not booleans), with where it sits (e.g. ` min_lr`)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [(where, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _numbers(item, f"{where} {key}")]
    if isinstance(value, list | tuple):
        return [found for i, item in enumerate(value) for found in _numbers(item, f"{where} [{i}]")]
    return []


def _check_scheduler_floor(values: dict[str, Any]) -> None:
    """The floor given through `--lr_scheduler_kwargs` obeys the rule `--min_lr` does."""
    kwargs = values.get("lr_scheduler_kwargs") or {}
    if not isinstance(kwargs, dict):
        return
    peak, low, rate = values.get("learning_rate"), kwargs.get("min_lr"), kwargs.get("min_lr_rate")
    if isinstance(low, int | float) and peak is not None and not 0 <= low <= peak:
        raise UsageError(f"--lr_scheduler_kwargs min_lr must be in [0, --learning_rate {peak}], got {low}")
    if isinstance(rate, int | float) and not 0 <= rate <= 1:
        raise UsageError(f"--lr_scheduler_kwargs min_lr_rate must be in [0, 1], got {rate}")


def _check_paths(values: dict[str, Any]) -> None:
    # The out_dir is the writer's to judge (`hf_sft.training.run_folder.check_run_folder`), knowing the inputs.
    for name in ("data_path", "eval_data_path"):
        paths = values.get(name) or []
        for path in [paths] if isinstance(paths, str) else paths:
            problem = folder_problem(Path(path)) if Path(path).is_dir() else None
            if problem:
                raise UsageError(f"{flag(name)} {problem}")
    tokenizer = values.get("tokenizer_path")
    if tokenizer and not Path(tokenizer).exists():
        raise UsageError(f"{flag('tokenizer_path')} {tokenizer}: no such file or folder")
    pretrained = values.get("pretrained_ckpt_path")
    if pretrained:
        _check_pretrained(pretrained, tokenizer)


def _check_pretrained(pretrained: str, tokenizer: str | None) -> None:
    """A legacy file, a model folder, or (with `--tokenizer_path`) a Hub model id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from hf_sft.model_folder import resolve_model_dir

    path, name = Path(pretrained), flag("pretrained_ckpt_path")
    if path.suffix in LEGACY_SUFFIXES:
        if not path.is_file():
            raise UsageError(f"{name} {pretrained}: no such file")
    elif path.is_dir():
        try:
            resolve_model_dir(path)
        except UsageError as err:
            raise UsageError(f"{name}: {err}") from None
    elif not path.exists():
        try:
            validate_repo_id(pretrained)
        except HFValidationError:
            raise UsageError(f"{name} {pretrained}: no such file or folder") from None
        if not tokenizer:  # tokenizers are read from local files only
            raise UsageError(f"{name} {pretrained}: no such folder (a Hub model id needs --tokenizer_path too)")


def _check_installed(values: dict[str, Any], parsed: tuple) -> None:
    """The trackers and the optimizer asked for can be used: Trainer would fail on them once the run started."""
    from transformers import Trainer, TrainingArguments
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    wanted = values.get("report_to") or []
    for tracker in [wanted] if isinstance(wanted, str) else wanted:
        if tracker in ("all", "none"):
            continue
        if tracker not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
            raise UsageError(f"--report_to {tracker} is not a tracker transformers knows ({known}, or none)")
        if tracker not in get_available_reporting_integrations():
            raise UsageError(f"--report_to {tracker}: its package is not installed")
    for args in parsed:
        if isinstance(args, TrainingArguments):
            try:
                Trainer.get_optimizer_cls_and_kwargs(args)
            except ImportError as err:
                raise UsageError(f"--optim {getattr(args.optim, 'value', args.optim)}: {err}") from None
            except (ValueError, TypeError):  # an optimizer that needs the model: checked when it is built
                pass
