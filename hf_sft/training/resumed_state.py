"""Once Trainer has restored a checkpoint, what it restored in place of the run's arguments is set back from them.

Trainer restores the optimizer's param groups (learning rate, betas, epsilon, weight decay), the scheduler's
`base_lrs` and the logging, evaluation and checkpoint intervals from the checkpoint, so flags given on resume would
not reach them. `ResumeCallback` sets them from the run's arguments on train begin. The schedule is then the one a
run with the new arguments follows from the restored step on: its warmup, length and floor (`--min_lr`) come from
the new arguments, evaluated at that step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback

from hf_sft.errors import UsageError
from hf_sft.training.resume import read_record

logger = logging.getLogger("hf_sft.train")


class NothingLeftToTrain(Exception):
    """Raised out of `Trainer.train` when the checkpoint resumed is the run's last step (its weights are loaded)."""


class ResumeCallback(TrainerCallback):
    """On train begin of a resumed run: the step intervals and the optimizer's hyperparameters from the arguments.

    The peak learning rate becomes `--learning_rate` (the groups' `initial_lr` and the scheduler's `base_lrs`), each
    group's current rate is the schedule at the restored step (`base_lr * lr_lambda(step)`, as the scheduler computes
    it), and weight decay goes to the groups Trainer decays. Without new flags every value is the one restored, so
    the run stays bit-identical. Logs `resumed from checkpoint-N (step N of M)`; when N is M (a run stopped during
    its final save) it raises `NothingLeftToTrain` instead of letting Trainer take a step past the end.

    Args:
        checkpoint: the checkpoint folder resumed from.
        trainer: the Trainer, whose `get_decay_parameter_names` says which parameters it decays.
    """

    def __init__(self, checkpoint: str | Path, trainer):
        self.name = Path(checkpoint).name
        self.continued = (read_record(checkpoint) or {}).get("continued_from")  # a finetune_gpt.py checkpoint
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        state.compute_steps(args, state.max_steps)
        if optimizer is not None:
            self._set_optimizer(args, model, optimizer, lr_scheduler)
        if self.continued:
            logger.info(
                "continuing %s at step %d of %d: its weights and AdamW moments; hf_sft's data order and learning-rate "
                "schedule from step %d on",
                self.continued,
                state.global_step,
                state.max_steps,
                state.global_step,
            )
        else:
            logger.info("resumed from %s (step %d of %d)", self.name, state.global_step, state.max_steps)
        if state.global_step >= state.max_steps:
            # Trainer would take one step past the end (it checks the step count only after a step).
            raise NothingLeftToTrain(f"{self.name} is the run's last step: the final folder is written from it")

    def _set_optimizer(self, args, model, optimizer, scheduler) -> None:
        decayed = _decayed_groups(optimizer, model, self.trainer.get_decay_parameter_names(model))
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
                base * fn(scheduler.last_epoch)
                for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
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
