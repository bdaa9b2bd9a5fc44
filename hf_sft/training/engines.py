"""Scale-out engines (FSDP, DeepSpeed ZeRO) under accelerate: what a launch asked for, what it got, CPU runs.

`accelerate launch --config_file <fsdp or deepspeed config>` tells the training processes which engine to use through
environment variables (`ACCELERATE_USE_FSDP`, `ACCELERATE_USE_DEEPSPEED`). On GPUs accelerate honours them. On CPU it
does not, and says nothing: the FSDP plugin is dropped because accelerate's state accepts FSDP only on accelerator
devices, and DeepSpeed is enabled only off CPU, so the run silently becomes plain DDP. `enable_on_cpu` completes
accelerate's state the way it is completed on GPUs (engine type, plugin, a gloo backend for DeepSpeed's
communication) at the moment Trainer creates its Accelerator; nothing else in the run changes, and on GPUs it does
nothing. `check_engine` then compares the engine the launch asked for with the live accelerator and refuses a
mismatch before training.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files

from hf_sft.errors import UsageError

logger = logging.getLogger("hf_sft.train")

FSDP, DEEPSPEED = "FSDP", "DEEPSPEED"


def requested_engine(args: TrainingArguments) -> str | None:
    """The sharded engine the launch (accelerate's environment) or the training flags ask for, if any."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED") or args.deepspeed:
        return DEEPSPEED
    if _env_flag("ACCELERATE_USE_FSDP") or args.fsdp:
        return FSDP
    return None


def check_request(args: TrainingArguments, use_lora: bool) -> str | None:
    """Refuse, before any work, engine settings that cannot give a correct run here; returns the engine asked for."""
    engine = requested_engine(args)
    if engine is None:
        return None
    if use_lora:
        raise UsageError(f"--use_lora is not supported under {engine}: train LoRA adapters with DDP or one process")
    if not args.use_cpu:
        return engine
    if engine == FSDP and _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise UsageError(
            "fsdp_cpu_ram_efficient_loading saves host memory by loading the weights on rank 0 and sending them to "
            "the GPUs; on CPU the weights are host memory already: set it to false in the accelerate config"
        )
    return engine


def enable_on_cpu(args: TrainingArguments) -> None:
    """Let FSDP or DeepSpeed run on several CPU processes (gloo); does nothing on GPUs or without such a request.

    Call before creating the Trainer: the next initialisation of accelerate's state (the Trainer's Accelerator) is
    completed as it would be on GPUs. Once done, the hook removes itself.
    """
    engine = requested_engine(args)
    if engine is None or not args.use_cpu or args.world_size < 2:
        return
    if engine == FSDP and _fsdp_version(args) != 2:
        return  # FSDP1 on CPU needs more than this; `check_engine` refuses the DDP that accelerate makes of it
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(state, *pos, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
        original(state, *pos, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
        AcceleratorState.__init__ = original
        if state.distributed_type != DistributedType.MULTI_CPU:
            return
        if engine == FSDP and fsdp_plugin is not None:
            if state._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(state._mixed_precision)
            state.fsdp_plugin = fsdp_plugin
            state.distributed_type = DistributedType.FSDP
        elif engine == DEEPSPEED and deepspeed_plugin is not None:
            import deepspeed.comm

            # DeepSpeed would pick its CPU default (oneCCL); the process group accelerate made is gloo.
            deepspeed.comm.init_distributed(dist_backend="gloo")
            deepspeed_plugin.set_mixed_precision(state._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            state.deepspeed_plugins = deepspeed_plugin
            state._mixed_precision = "no"  # DeepSpeed's own config owns precision, as on GPUs
            state.distributed_type = DistributedType.DEEPSPEED
        PartialState._shared_state["distributed_type"] = state.distributed_type

    AcceleratorState.__init__ = init


def describe(accelerator) -> str:
    """The engine as the live accelerator runs it, e.g. `FSDP2 | world size 2 | sharding FULL_SHARD | ...`."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    parts = [f"world size {accelerator.num_processes}"]
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        name = f"FSDP{plugin.fsdp_version}"
        parts.append(f"sharding {_fsdp_sharding(plugin)}")
        parts.append(f"state dict {_state_dict_name(plugin)}")
    elif kind == DistributedType.DEEPSPEED:
        name = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    elif kind == DistributedType.NO:
        name = "single process"
    else:
        name = "DDP"
    return " | ".join([name, *parts])


def check_engine(requested: str | None, accelerator) -> None:
    """Refuse a launch that asked for FSDP or DeepSpeed but got another engine (DDP or independent processes)."""
    from accelerate.utils import DistributedType

    if requested is None:
        return
    if accelerator.distributed_type != DistributedType[requested]:
        hint = ""
        if requested == FSDP and accelerator.device.type == "cpu":
            hint = " (on CPU hf_sft runs FSDP as FSDP2 only: fsdp_version: 2)"
        raise UsageError(f"the launch asked for {requested} but got {describe(accelerator)}: not training{hint}")
    if requested == DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise UsageError(
                "DeepSpeed ZeRO-3 keeps every weight sharded: set `zero3_save_16bit_model: true` in the accelerate "
                "config so that checkpoints and the final folder hold a loadable model"
            )


def full_state_dict(trainer) -> dict | None:
    """The whole model's weights gathered from a sharded engine, on rank 0 (every rank must call this).

    Returns None when the model is not sharded: the model itself then holds every weight. Under FSDP with
    SHARDED_STATE_DICT `Trainer.save_model` writes nothing at all, hence this explicit gather.
    """
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.get_state_dict(trainer.model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(trainer.model_wrapped)
    return None


def consolidated_model(trainer, model):
    """On rank 0, a plain model holding every weight, to be written as the final folder (every rank calls this).

    Unsharded runs get `model` back. Sharded ones get a new model filled with the gathered weights, leaving the
    engine's model alone: FSDP2 replaces the class of the model it shards, and `save_pretrained` on it would write
    FSDP's code files and an `auto_map` that points at them.
    """
    state_dict = full_state_dict(trainer)
    if state_dict is None or not trainer.is_world_process_zero():
        return model
    plain = _plain_instance(model)
    unexpected = plain.load_state_dict(state_dict, strict=False, assign=True).unexpected_keys
    plain.tie_weights()  # a tied head may be missing from the gathered weights
    missing = [name for name, param in plain.named_parameters() if param.is_meta]
    if missing or unexpected:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return plain


def write_model_files(model, folder: Path) -> None:
    """config.json (with `auto_map`), generation config and the model code files, without weights."""
    plain = _plain_instance(model)
    plain.config.architectures = [type(plain).__name__]
    if plain._auto_class is not None:
        custom_object_save(plain, folder, config=plain.config)
    plain.config.save_pretrained(folder)
    if plain.generation_config is not None:
        plain.generation_config.save_pretrained(folder)


class CheckpointFilesCallback(TrainerCallback):
    """Gives FSDP2 checkpoints the config, model code and tokenizer that every other engine's checkpoints have.

    Under FSDP2 Trainer gets both wrong: with SHARDED_STATE_DICT it writes only the weight and optimizer shards into
    `checkpoint-STEP/`, and with FULL_STATE_DICT it saves the model through FSDP2's subclass of our model class, so
    the folder receives torch's FSDP source files and an `auto_map` naming them. Place this callback before the one
    that marks checkpoints complete.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def on_save(self, args, state, control, model=None, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not folder.is_dir() or not isinstance(model, FSDPModule):
            return  # other engines save the model through `save_pretrained` of its own class
        for name in _code_files(type(model)):
            (folder / name).unlink(missing_ok=True)
        write_model_files(model, folder)
        self.tokenizer.save_pretrained(folder)


def _plain_instance(model):
    """A new, empty instance (meta device) of `model`'s own class, not FSDP2's subclass of it; it shares the config."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    plain.generation_config = model.generation_config
    return plain


def _code_files(cls: type) -> list[str]:
    """The file names `save_pretrained` copies for a model of class `cls`: its module and the modules it imports."""
    module_file = sys.modules[cls.__module__].__file__
    return [Path(f).name for f in (module_file, *get_relative_import_files(module_file))]


def _fsdp_sharding(plugin) -> str:
    if plugin.fsdp_version == 2:
        return "FULL_SHARD" if plugin.reshard_after_forward else "SHARD_GRAD_OP"
    return plugin.sharding_strategy.name


def _state_dict_name(plugin) -> str:
    return str(plugin.state_dict_type).split(".")[-1].replace("_STATE_DICT", "")


def _fsdp_version(args: TrainingArguments) -> int:
    if args.fsdp_config and "version" in args.fsdp_config:
        return int(args.fsdp_config["version"])
    return int(os.environ.get("FSDP_VERSION", "1"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")
