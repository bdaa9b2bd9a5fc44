"""Resume: what a checkpoint records, what a resumed run may change, what is restored.

`--resume_from_ckpt_path` alone continues a run: arguments, model and tokenizer come from the checkpoint.

**What a checkpoint records.** Each checkpoint holds `run_args.json` (`RUN_ARGS_FILE`, written by
`hf_sft.training.checkpoints.CheckpointFiles`): the run's arguments that differ from the defaults of a plain or a
`--demo` invocation, plus the values that fix the run's shape (model, max_seq_len, batch layout, number of
processes). JSON rather than Trainer's pickled `training_args.bin`, which nothing here unpickles. Paths are recorded
resolved (absolute), so a run resumes from any working directory, and a path given again on resume counts as the
same whether it is spelled absolutely or relatively. A `--streaming` run's checkpoint also records the stream's
position (`recorded_position`).

**What a checkpoint knows of its data.** `run_args.json` also holds `data`, the fingerprint of every source
(`data_fingerprints`: each local file's size and sha256, a Hub dataset's resolved revision). A resume whose sources
differ (lines appended, cut or edited; a shard added) is refused, naming each source and what changed
(`check_resumed_data`), unless `--accept_changed_data` is given: then the run continues on the data as they are now,
and neither the order nor the examples skipped nor the final weights are those of an uninterrupted run. `latest`
refuses the same way (the data changed, not the checkpoint). A checkpoint of an earlier version, without `data`,
resumes with a log line saying its data cannot be checked.

**What a resumed run may change** (`resume_arguments`). The recorded values fill every flag the command line (or its
YAML) does not give. A flag given on resume, in any spelling the parser takes (`given_fields`), either takes effect
or is refused:

- `KEPT_ON_RESUME` are refused when they differ from the checkpoint's run, each named: the model and tokenizer, the
  data and its order (the restored data position counts batches of the same examples in the same order), the batch
  layout and the optimizer and schedule types (their restored state belongs to them).
- Everything else takes effect. Most of it Trainer reads from the arguments as it goes.

**What is restored.** Trainer restores the weights, the optimizer and scheduler, the random-number state and its own
state. It also restores the optimizer's param groups (learning rate, betas, epsilon, weight decay), the scheduler's
`base_lrs` and the logging, evaluation and checkpoint intervals, so flags given on resume would not reach them:
`restore_hyperparameters` sets them back from the run's arguments on train begin (called by
`hf_sft.training.callbacks.ResumeCallback`). The schedule is then the one a run with the new arguments follows from
the restored step on: its warmup, length and floor (`--min_lr`) come from the new arguments, evaluated at that step.

**Continuing a `finetune_gpt.py` run** from its `ckpt_iter_N.pt`: it becomes a checkpoint folder, resumed as any
other. The seed script saves `{"model_state_dict", "optimizer_state_dict", "scaler", "iter_num", "model_args",
"config"}` (`config`: its own arguments). What is kept, and how:

- the weights, converted as `hf_sft.legacy` converts them (fused `c_attn` split into q/k/v);
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
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from hf_sft.data.sources import fingerprint_changes, source_fingerprint
from hf_sft.data.template import FORMATS
from hf_sft.errors import UsageError, bad_input
from hf_sft.legacy import LegacyCheckpoint, fields_of, legacy_checkpoint_of
from hf_sft.safe_pickle import load_checkpoint
from hf_sft.training.arguments import LEGACY_NAMES, flag, given_fields, parse_args
from hf_sft.training.checkpoints import RUN_ARGS_FILE, resolve_resume_path, seal
from hf_sft.training.engines import launched_processes
from hf_sft.training.validation import argument_values

logger = logging.getLogger("hf_sft.train")

# The name under which a `--streaming` run's checkpoint keeps the stream position in `trainer_state.json`
# (`hf_sft.training.callbacks.StreamPositionCallback`: Trainer keys an `ExportableState` by its class name).
STREAM_POSITION = "StreamPositionCallback"


# What a checkpoint records

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
# Flags whose values are local paths (or a Hub id, or a built-in name): recorded and compared resolved.
PATH_FIELDS = ("data_path", "eval_data_path", "tokenizer_path", "pretrained_ckpt_path", "template")
# The key of `run_args.json` that holds the data fingerprint (`data_fingerprints`).
DATA_RECORD = "data"
ACCEPT_CHANGED_DATA = "--accept_changed_data"
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
    "accept_changed_data",
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
        value = _plain(resolved_path(name, value))
        if name in _NOT_RECORDED or value is _UNRECORDABLE:
            continue
        if name in SHAPE_FIELDS:
            shape[name] = value
        elif any(value != _plain(default.get(name)) for default in defaults):
            recorded[name] = value
    return {"values": recorded, "shape": shape, "world_size": launched_processes()}


def resolved_path(name: str, value: Any) -> Any:
    """A path flag's value with each existing local path made absolute; a Hub id, a built-in format name, a path
    that does not exist (validation names it) or another flag's value as it is."""
    if name not in PATH_FIELDS or not value:
        return value
    if isinstance(value, list | tuple):
        return [resolved_path(name, item) for item in value]
    if not isinstance(value, str | Path) or (name == "template" and value in FORMATS):
        return value
    return str(Path(value).resolve()) if Path(value).exists() else value


def data_fingerprints(data_args: Any) -> list[dict[str, Any]]:
    """The fingerprint of every source of the run (`--data_path`, `--eval_data_path`), as `run_args.json` records it.

    Raises:
        UsageError: a source does not exist or is of no known kind.
    """
    paths = [*data_args.data_paths(), *([data_args.eval_data_path] if data_args.eval_data_path else [])]
    return [source_fingerprint(path, data_args.dataset_revision) for path in paths]


def check_resumed_data(checkpoint: str | Path, current: list[dict[str, Any]], accept_changes: bool) -> None:
    """Refuse to resume `checkpoint` on data that differ from those it recorded, unless the user accepts it.

    Raises:
        UsageError: a source changed (each named with what changed) and `--accept_changed_data` was not given.
    """
    record = read_record(checkpoint) or {}
    if DATA_RECORD not in record:
        logger.warning("%s records no fingerprint of its data (an earlier version wrote it): not checked", checkpoint)
        return
    changes = fingerprint_changes(record[DATA_RECORD], current)
    if not changes:
        return
    if accept_changes:
        logger.warning(
            "%s: resuming on changed data (%s): the order, the examples skipped and the result are no longer those "
            "of an uninterrupted run",
            ACCEPT_CHANGED_DATA,
            "; ".join(changes),
        )
        return
    raise UsageError(
        f"--resume_from_ckpt_path {checkpoint}: the data changed since the checkpoint was written: "
        f"{'; '.join(changes)}. Restore them, or pass {ACCEPT_CHANGED_DATA} to continue on the data as they are "
        "(the order, the examples skipped and the result then differ from an uninterrupted run's)"
    )


def resume_arguments(
    argv: list[str], parsed: tuple, parse: Callable[[list[str]], tuple] | None = None
) -> tuple[tuple, str | SeedRun | None]:
    """With `--resume_from_ckpt_path`, resolve the checkpoint (the one time it is resolved in a run: `latest` logs
    each checkpoint it skips) and fill every flag not given from its `run_args.json`.

    `--out_dir` defaults to the folder that holds the checkpoint.

    Args:
        argv: the command line (the flags it gives are found with `given_fields`).
        parsed: its parsed argument dataclasses.
        parse: the command-line parser, for the defaults a run did not record (default: `parse_args`).

    Returns:
        `(parsed, resume)`: the arguments, and the checkpoint folder resumed from, or the `finetune_gpt.py`
        checkpoint to continue (`continue_seed_run`), or None.

    Raises:
        UsageError: the checkpoint does not verify, a given flag would change what a resumed run keeps (all
            differences named), `--max_iters` is not beyond the checkpoint's step, or a seed `.pt` was given.
    """
    values = argument_values(*parsed)
    resume = values.get("resume_from_checkpoint")
    if not resume:
        return parsed, None
    explicit = given_fields(argv)
    parse = parse or parse_args
    if Path(resume).is_file():
        run = read_seed_run(resume)
        if run is not None:
            return continuation_arguments(run, explicit, parsed), run
    discard = bool(values.get("discard_newer_checkpoints"))
    # The folder the run will write: `--out_dir`, else the one holding the checkpoint.
    out_dir = values["output_dir"] if "output_dir" in explicit or resume == "latest" else Path(resume).parent
    checkpoint = Path(resolve_resume_path(resume, out_dir, discard_newer=discard))
    changes: dict[str, Any] = {}
    if "output_dir" not in explicit:
        changes["output_dir"] = str(checkpoint.parent)
    record = read_record(checkpoint)
    if record is None:
        logger.warning("%s has no %s: the run's flags come from the command line alone", checkpoint, RUN_ARGS_FILE)
        return replace_arguments(parsed, changes), str(checkpoint)
    saved = {**record["values"], **record["shape"]}
    plain = _defaults(parse, values["output_dir"])[0]
    # A field the run did not record had the value both invocations give by default.
    used = {name: saved[name] if name in saved else _plain(plain.get(name)) for name in values}
    given = {name: _plain(resolved_path(name, values[name])) for name in explicit if name in values}
    differences = [
        f"{flag(name)} {_plain(values[name])} (the checkpoint's run: {used[name]})"
        for name in KEPT_ON_RESUME
        if name in given and given[name] != resolved_path(name, used[name])
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
    return replace_arguments(parsed, changes), str(checkpoint)


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


def recorded_position(checkpoint: str | Path) -> tuple[int, int]:
    """The stream position a checkpoint of a `--streaming` run recorded.

    Raises:
        UsageError: the checkpoint holds no stream position (it is not one of a `--streaming` run).
    """
    state_file = Path(checkpoint) / "trainer_state.json"
    try:
        saved = json.loads(state_file.read_text(encoding="utf-8"))["stateful_callbacks"][STREAM_POSITION]
        return int(saved["attributes"]["epoch"]), int(saved["attributes"]["position"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{checkpoint} holds no stream position: it is not a checkpoint of a --streaming run"
        ) from None


# What is restored


class NothingLeftToTrain(Exception):
    """Raised out of `Trainer.train` when the checkpoint resumed is the run's last step (its weights are loaded)."""


def resumed_message(checkpoint: str | Path, step: int, max_steps: int) -> str:
    """The log line of a resumed run: `resumed from checkpoint-N (step N of M)`, or the continued seed checkpoint."""
    continued = (read_record(checkpoint) or {}).get("continued_from")  # a finetune_gpt.py checkpoint
    if continued:
        return (
            f"continuing {continued} at step {step} of {max_steps}: its weights and AdamW moments; hf_sft's data "
            f"order and learning-rate schedule from step {step} on"
        )
    return f"resumed from {Path(checkpoint).name} (step {step} of {max_steps})"


def restore_hyperparameters(args: Any, model: Any, optimizer: Any, scheduler: Any, decay_names: list[str]) -> None:
    """Set what Trainer restored from the checkpoint in place of the run's arguments back from the arguments.

    The peak learning rate becomes `--learning_rate` (the groups' `initial_lr` and the scheduler's `base_lrs`), each
    group's current rate is the schedule at the restored step (`base_lr * lr_lambda(step)`, as the scheduler computes
    it), and weight decay goes to the groups Trainer decays. Without new flags every value is the one restored, so
    the run stays bit-identical.

    Args:
        args: the run's training arguments.
        model: the model the optimizer trains.
        optimizer: the restored optimizer.
        scheduler: the restored learning-rate scheduler (or None).
        decay_names: the parameters Trainer decays (`Trainer.get_decay_parameter_names`).

    Raises:
        UsageError: `--weight_decay` is given but the engine's param groups do not say which parameters they hold.
    """
    decayed = _decayed_groups(optimizer, model, decay_names)
    groups = optimizer.param_groups
    if None in decayed and args.weight_decay and not any(group.get("weight_decay") for group in groups):
        # The engine's groups hold flat shards (DeepSpeed) and none was decayed: which should be is unknown.
        raise UsageError("--weight_decay cannot be set on resume here: the optimizer's groups are not named")
    for group, decays in zip(groups, decayed, strict=True):
        if "betas" in group:
            group["betas"] = (args.adam_beta1, args.adam_beta2)
        if "eps" in group:
            group["eps"] = args.adam_epsilon
        if "weight_decay" in group:
            decays = bool(group["weight_decay"]) if decays is None else decays
            group["weight_decay"] = args.weight_decay if decays else 0.0
    peak = args.learning_rate
    if isinstance(scheduler, LambdaLR):
        scheduler.base_lrs = [peak] * len(optimizer.param_groups)
        rates = [
            base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
        ]
    else:  # another scheduler: the same position, scaled to the new peak
        rates = [group["lr"] * peak / group.get("initial_lr", peak) for group in optimizer.param_groups]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["initial_lr"] = peak
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    if scheduler is not None and hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def _decayed_groups(optimizer, model, decay_names: list[str]) -> list[bool | None]:
    """Per param group: whether Trainer decays its parameters, None where none of them is a named parameter."""
    names = {id(param): name for name, param in model.named_parameters()} if model is not None else {}
    decay = set(decay_names)
    found = []
    for group in optimizer.param_groups:
        named = [names[id(p)] for p in group["params"] if id(p) in names]
        found.append(any(name in decay for name in named) if named else None)
    return found


# Continuing a finetune_gpt.py checkpoint

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


def continuation_arguments(run: SeedRun, explicit: set[str], parsed: tuple) -> tuple:
    """The arguments of a run that continues `run`: its flags fill the ones not given (`continue_seed_run` then makes
    it the checkpoint folder the run resumes from, once the arguments are validated).

    Args:
        run: the seed checkpoint given to `--resume_from_ckpt_path`.
        explicit: the fields the command line gives (`hf_sft.training.arguments.given_fields`).
        parsed: the parsed argument dataclasses.

    Raises:
        UsageError: a given flag changes the batch layout or the weights, or nothing is left to train.
    """
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
    return replace_arguments(parsed, changes)


def continue_seed_run(run: SeedRun, parsed: tuple, parse: Callable[[list[str]], tuple] = parse_args) -> tuple:
    """Write `run` as the checkpoint folder that the run with these (validated) arguments resumes from.

    Returns:
        `(parsed, checkpoint folder)`, `--resume_from_ckpt_path` in `parsed` pointing at the folder.

    Raises:
        UsageError: no tokenizer is named (a finetune_gpt.py checkpoint holds none).
    """
    if not parsed[0].tokenizer_path:
        raise UsageError(
            f"--resume_from_ckpt_path {run.path} is a finetune_gpt.py checkpoint, which holds no tokenizer: pass "
            "--tokenizer_path (the tokenizer it was trained with)"
        )
    folder = str(write_continuation(run, parsed, parse))
    return replace_arguments(parsed, {"resume_from_checkpoint": folder}), folder


def seed_flags(run: SeedRun, field_names: set[str]) -> dict[str, Any]:
    """The seed run's arguments under our field names (seed names renamed), for the fields we have."""
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
    from hf_sft.legacy import is_ignored_buffer

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
    from hf_sft.legacy import convert_parameter_tensors

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
        parse: the command-line parser, for `run_args.json` (see `record_arguments`).

    Returns:
        The `checkpoint-N` folder.
    """
    from transformers import Trainer, TrainerControl, TrainerState
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME

    import hf_sft  # noqa: F401 - registers the model, so save_pretrained writes auto_map and the code files
    from hf_sft.legacy import convert_checkpoint
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
    and `restore_hyperparameters` sets the peak and the current rate from them)."""
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
