"""Continue a `finetune_gpt.py` run from its `ckpt_iter_N.pt`: it becomes a checkpoint folder, resumed as any other.

The seed script saves `{"model_state_dict", "optimizer_state_dict", "scaler", "iter_num", "model_args", "config"}`
(`config`: its own arguments). What is kept, and how:

- the weights, converted as `hf_sft.convert` converts them (fused `c_attn` split into q/k/v);
- AdamW's moments (`exp_avg`, `exp_avg_sq`) and step count, per parameter: the seed optimizer's indices are named
  after its model's parameters (one group, or nanoGPT's `configure_optimizers` groups; every moment's shape is
  checked against its weight's), then split and permuted by the very plan that converts the weights, and laid out
  in the param groups Trainer builds (`Trainer.create_optimizer`'s own code);
- the step: AdamW's own count of optimizer steps (`iter_num` is only compared with it), so the schedule and the
  data position are those of step N;
- the flags: the seed's `config` fills every flag the command line does not give (seed names are ours too).

What cannot be kept: the seed loop's data order and learning-rate schedule live in its code, not in its
checkpoint. The continuation follows hf_sft's: Trainer's shuffled order under `--seed`, positioned N optimizer steps
in (the first N steps' batches of that order are skipped, as on any resume), and hf_sft's schedule (warmup, cosine,
`--min_lr`) evaluated at step N. The GradScaler state (fp16 only) is not carried: the loss scale starts afresh.

The checkpoint folder is written to a temporary folder (removed at exit) and handed to Trainer's resume; the run's
own checkpoints and final model go to `--out_dir` (default: the folder holding the `.pt`).
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hf_sft.errors import UsageError
from hf_sft.legacy_checkpoint import LegacyCheckpoint, fields_of, legacy_checkpoint_of
from hf_sft.safe_pickle import load_checkpoint

OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer")
_MOMENTS = ("exp_avg", "exp_avg_sq")
# Seed flags that say where that run was and what it resumed from: never this run's.
_NOT_CARRIED = {"resume_from_checkpoint", "pretrained_ckpt_path", "output_dir", "config"}


@dataclasses.dataclass
class SeedRun:
    """A `finetune_gpt.py` training checkpoint, read without running its code.

    Attributes:
        checkpoint: its weights and model configuration.
        step: the optimizer steps taken (AdamW's count; 0 before the first).
        iter_num: the seed loop's own counter.
        optimizer_state: the saved `torch.optim.AdamW` state dict.
        flags: the seed script's arguments.
    """

    checkpoint: LegacyCheckpoint
    step: int
    iter_num: int
    optimizer_state: dict
    flags: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    def describe(self) -> str:
        return f"finetune_gpt.py checkpoint {self.path.name} (iteration {self.iter_num}, optimizer step {self.step})"


def read_seed_run(path: str | Path) -> SeedRun | None:
    """The `finetune_gpt.py` training checkpoint in `path`, or None for any other file.

    Raises:
        UsageError: it is one, but its optimizer state cannot be mapped (see `seed_parameter_names`).
    """
    path = Path(path)
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or "iter_num" not in saved or not any(key in saved for key in OPTIMIZER_KEYS):
        return None
    checkpoint = legacy_checkpoint_of(saved, path)
    if checkpoint.source != "finetune_gpt":
        return None
    optimizer_state = saved[next(key for key in OPTIMIZER_KEYS if key in saved)]
    if not isinstance(optimizer_state, dict) or not {"state", "param_groups"} <= set(optimizer_state):
        raise UsageError(f"{path}: its optimizer state is not a torch optimizer's state dict")
    steps = {_number(state.get("step", 0)) for state in optimizer_state["state"].values()}
    if len(steps) > 1:
        raise UsageError(f"{path}: its parameters took different numbers of optimizer steps ({sorted(steps)})")
    flags = fields_of(saved["config"], path) if saved.get("config") is not None else {}
    return SeedRun(checkpoint, int(steps.pop()) if steps else 0, int(saved["iter_num"]), optimizer_state, flags)


def continuation_arguments(
    run: SeedRun, explicit: set[str], parsed: tuple, parse: Callable[[list[str]], tuple]
) -> tuple:
    """The arguments of a run that continues `run`: its flags fill the ones not given, and it becomes the checkpoint
    folder (`write_continuation`) the run resumes from.

    Args:
        run: the seed checkpoint given to `--resume_from_ckpt_path`.
        explicit: the fields the command line gives (`hf_sft.training.arguments.given_fields`).
        parsed: the parsed argument dataclasses.
        parse: the command-line parser.

    Raises:
        UsageError: a given flag changes the batch layout or the weights, nothing is left to train, an argument is
            invalid, or no tokenizer is named.
    """
    from hf_sft.training.arguments import flag
    from hf_sft.training.resume import check_steps_left, replace_arguments
    from hf_sft.training.validation import argument_values, validate_arguments

    values = argument_values(*parsed)
    saved = seed_flags(run, set(values))
    changes = {name: value for name, value in saved.items() if name not in explicit}
    changes["pretrained_ckpt_path"] = str(run.path)
    if "output_dir" not in explicit:
        changes["output_dir"] = str(run.path.parent)
    differences = [
        f"{flag(name)} {values[name]} (the checkpoint's run: {saved[name]})"
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps")
        if name in explicit and name in saved and values[name] != saved[name]
    ]
    if "pretrained_ckpt_path" in explicit and values["pretrained_ckpt_path"] != str(run.path):
        differences.append(
            f"{flag('pretrained_ckpt_path')} {values['pretrained_ckpt_path']} (the weights are its own)"
        )
    if differences:
        raise UsageError(
            f"--resume_from_ckpt_path {run.path}: {'; '.join(differences)}. A continued run keeps its weights and "
            f"batch layout; to change them, start a new run from its weights with --pretrained_ckpt_path {run.path}"
        )
    check_steps_left(values, explicit, run.step)
    parsed = replace_arguments(parsed, changes)
    validate_arguments(*parsed)
    if not parsed[0].tokenizer_path:
        raise UsageError(
            f"--resume_from_ckpt_path {run.path} is a finetune_gpt.py checkpoint, which holds no tokenizer: pass "
            "--tokenizer_path (the tokenizer it was trained with)"
        )
    return replace_arguments(parsed, {"resume_from_checkpoint": str(write_continuation(run, parsed, parse))})


def seed_flags(run: SeedRun, field_names: set[str]) -> dict[str, Any]:
    """The seed run's arguments under our field names (seed names renamed), for the fields we have."""
    from hf_sft.training.arguments import LEGACY_NAMES

    renamed = {LEGACY_NAMES.get(name, name): value for name, value in run.flags.items()}
    return {name: value for name, value in renamed.items() if name in field_names and name not in _NOT_CARRIED}


def seed_parameter_names(checkpoint: LegacyCheckpoint, optimizer_state: dict) -> dict[int, str]:
    """The seed model's parameter behind each index of its optimizer state.

    torch numbers parameters in the order of its param groups. The seed model's parameters are its state-dict
    entries less buffers and the tied head (what `named_parameters()` yields), grouped either as one group or as
    nanoGPT's `configure_optimizers` does (2-D and larger decayed, the rest not).

    Raises:
        UsageError: neither grouping fits the saved groups and every moment's shape.
    """
    from hf_sft.weight_plans import is_ignored_buffer

    weights = checkpoint.state_dict
    names = [name for name, tensor in weights.items() if not is_ignored_buffer(name, tensor)]
    if checkpoint.config.tie_word_embeddings:
        names = [name for name in names if name != "lm_head.weight"]  # the same Parameter as wte
    groups = [list(group["params"]) for group in optimizer_state["param_groups"]]
    layouts = (
        [names],  # AdamW(model.parameters())
        [[n for n in names if weights[n].dim() >= 2], [n for n in names if weights[n].dim() < 2]],  # nanoGPT's
    )
    for layout in layouts:
        if [len(group) for group in layout] != [len(group) for group in groups]:
            continue
        mapping = {
            i: name for group, named in zip(groups, layout, strict=True) for i, name in zip(group, named, strict=True)
        }
        if all(_shapes_fit(optimizer_state["state"].get(i), weights[name]) for i, name in mapping.items()):
            return mapping
    sizes = [len(group) for group in groups]
    raise UsageError(
        f"{checkpoint.path}: its optimizer's {len(sizes)} param group(s) of {sizes} parameters do not follow the "
        f"model's {len(names)} parameters (one group, or nanoGPT's configure_optimizers), so its AdamW moments "
        f"cannot be matched to the weights; to keep the weights only, pass --pretrained_ckpt_path {checkpoint.path}"
    )


def converted_moments(run: SeedRun) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's state per parameter of our model: moments split and permuted exactly as the weights are."""
    from hf_sft.weight_plans import convert_parameter_tensors

    names = seed_parameter_names(run.checkpoint, run.optimizer_state)
    states = {names[index]: state for index, state in run.optimizer_state["state"].items() if index in names}
    if any(state.get("max_exp_avg_sq") is not None for state in states.values()):
        raise UsageError(f"{run.path}: its AdamW used amsgrad, which Trainer's AdamW does not continue")
    result: dict[str, dict[str, torch.Tensor]] = {}
    for moment in _MOMENTS:
        tensors = {name: state[moment] for name, state in states.items() if moment in state}
        for target, tensor in convert_parameter_tensors(run.checkpoint, tensors).items():
            result.setdefault(target, {})[moment] = tensor.float()
    for state in result.values():
        state["step"] = torch.tensor(float(run.step))
    return result


def write_continuation(run: SeedRun, parsed: tuple, parse) -> Path:
    """Write `run` as a checkpoint folder of these arguments, in a temporary folder removed at exit.

    Args:
        run: the seed checkpoint.
        parsed: the run's parsed (and validated) argument dataclasses.
        parse: the command-line parser, for `run_args.json` (see `hf_sft.training.resume.record_arguments`).

    Returns:
        The `checkpoint-N` folder.
    """
    from transformers import Trainer, TrainerControl, TrainerState
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME

    import hf_sft  # noqa: F401 - registers the model, so save_pretrained writes auto_map and the code files
    from hf_sft.convert import convert_checkpoint
    from hf_sft.training.checkpoint_check import seal
    from hf_sft.training.resume import RUN_ARGS_FILE, record_arguments
    from hf_sft.writer import new_folder, write_json

    model_args, _, args = parsed
    model, tokenizer = convert_checkpoint(run.path, model_args.tokenizer_path, **model_args.special_tokens())
    optimizer = Trainer.create_optimizer(_TrainerView(model, args))
    states = converted_moments(run)
    params = dict(model.named_parameters())
    if set(states) != set(params):
        raise UsageError(f"{run.path}: its optimizer state covers {len(states)} of {len(params)} parameters")
    for name, state in states.items():
        optimizer.state[params[name]] = state
    schedule = _scheduler_state(optimizer, run.step)

    root = Path(tempfile.mkdtemp(prefix="hf_sft-continue-"))
    atexit.register(shutil.rmtree, root, True)
    folder = root / f"checkpoint-{run.step}"
    record = record_arguments(parsed, parse) | {"base_model": run.describe(), "continued_from": run.describe()}
    with new_folder(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_NAME)
        torch.save(schedule, staging / SCHEDULER_NAME)
        state = TrainerState(
            global_step=run.step,
            train_batch_size=args.per_device_train_batch_size,
            stateful_callbacks=[TrainerControl()],  # what Trainer's own state holds
        )
        state.compute_steps(args, max(args.max_steps, run.step))
        state.save_to_json(str(staging / TRAINER_STATE_NAME))
        write_json(staging / RUN_ARGS_FILE, record)
        seal(staging, run.step, absent={"random-number state": "finetune_gpt.py checkpoints hold none"})
    return folder


def _scheduler_state(optimizer: torch.optim.Optimizer, step: int) -> dict:
    """A LambdaLR's state at `step` (Trainer's schedules are LambdaLRs; their functions come from the arguments,
    and `hf_sft.training.resume.ResumeCallback` sets the peak and the current rate from them)."""
    from torch.optim.lr_scheduler import LambdaLR

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    state = LambdaLR(optimizer, lambda _: 1.0).state_dict()
    return state | {"last_epoch": step, "_step_count": step + 1}


class _TrainerView:
    """What `Trainer.create_optimizer` reads of a Trainer: the optimizer is built by Trainer's own code (its
    classes, its decay groups, in its parameter order), without a Trainer and its accelerator."""

    optimizer = None
    optimizer_cls_and_kwargs = None

    def __init__(self, model: torch.nn.Module, args: Any):
        from transformers import Trainer

        self.model, self.args = model, args
        self.get_decay_parameter_names = lambda m: Trainer.get_decay_parameter_names(self, m)
        self.get_optimizer_cls_and_kwargs = Trainer.get_optimizer_cls_and_kwargs


def _shapes_fit(state: dict | None, weight: torch.Tensor) -> bool:
    return state is None or all(
        tuple(state[moment].shape) == tuple(weight.shape) for moment in _MOMENTS if moment in state
    )


def _number(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)
