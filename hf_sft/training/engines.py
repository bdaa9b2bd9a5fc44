"""Scale-out engines (FSDP, DeepSpeed ZeRO) under accelerate: what a launch asked for, what it got, CPU runs.

`accelerate launch --config_file <fsdp or deepspeed config>` tells the training processes which engine to use through
environment variables (`ACCELERATE_USE_FSDP`, `ACCELERATE_USE_DEEPSPEED`). On GPUs accelerate honours them. On CPU it
does not, and says nothing: the FSDP plugin is dropped because accelerate's state accepts FSDP only on accelerator
devices, and DeepSpeed is enabled only off CPU, so the run silently becomes plain DDP. `enable_on_cpu` completes
accelerate's state the way it is completed on GPUs (engine type, plugin, a gloo backend for DeepSpeed's
communication) at the moment Trainer creates its Accelerator; nothing else in the run changes, and on GPUs it does
nothing. `check_engine` then compares the engine the launch asked for with the live accelerator and refuses a
mismatch before training. Saving from these engines is `hf_sft.training.checkpoints`' (the sharded gather).

`enable_on_cpu` is part of the product, not of the tests: a user who launches an FSDP2 or DeepSpeed config on CPU
(a dry run of a GPU configuration, a CPU cluster) gets the sharded run asked for, checked equal to one process; without
it the same launch is refused by `check_engine` (FSDP1 on CPU still is). The scale-out tests launch the real command in
subprocesses and check the live engine, so they exercise exactly what users run.
"""

from __future__ import annotations

import logging
import os

from transformers import TrainingArguments

from hf_sft.errors import UsageError

logger = logging.getLogger("hf_sft.train")

FSDP, DEEPSPEED = "FSDP", "DEEPSPEED"


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher): its `WORLD_SIZE`, read here alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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


def leave_process_group() -> None:
    """Tear this process's process group down once the run has made its last collective call.

    Left to interpreter exit, a gloo group's worker threads can be destroyed while still joinable when this process
    ends before the others (a non-main process done while the main one saves and evaluates): C++ then aborts it
    ("terminate called without an active exception", SIGABRT) and the launcher reports the run as failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
        if plugin.activation_checkpointing:
            parts.append("activation checkpointing")
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
