"""Saving from sharded engines (FSDP, DeepSpeed ZeRO): the whole model for the final folder, whole FSDP2 checkpoints.

Under FSDP and ZeRO-3 no process holds every weight, and Trainer's own saving falls short in two ways: under FSDP's
SHARDED_STATE_DICT `Trainer.save_model` writes nothing at all (no weights, no config), and under FSDP2 the model
has been given a subclass of its own class, so `save_pretrained` on it copies torch's FSDP source files and writes
an `auto_map` naming them. The final folder is therefore written from gathered weights into a fresh model of our
own class, and FSDP2 checkpoints get their config, code files and tokenizer from
`hf_sft.training.checkpoint_files`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files


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


def _plain_instance(model):
    """A new, empty instance (meta device) of `model`'s own class, not FSDP2's subclass of it; it shares the config."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    plain.generation_config = model.generation_config
    return plain


def code_files(cls: type) -> list[str]:
    """The file names `save_pretrained` copies for a model of class `cls`: its module and the modules it imports."""
    module_file = sys.modules[cls.__module__].__file__
    return [Path(f).name for f in (module_file, *get_relative_import_files(module_file))]
