"""A non-finite loss, gradient norm or weights stop the run at that step, before anything is saved from it.

Trainer keeps going on a NaN: its logged loss even hides one (`logging_nan_inf_filter` averages it away), and it
would write checkpoints and a final model of NaN weights. `NumericGuardSteps` shows the guard each micro-step's loss
and each optimizer step's gradient norm, kept on the device (no host sync per micro-step); `NumericGuard` reads them
once per optimizer step, and before each save also checks the weights themselves (a huge learning rate can overflow
them in one step whose loss and gradients were finite). Under several processes the verdict is all-reduced, so every
rank stops at the same step. On a bad step it cancels the step's save and evaluation and stops training; the run
then exits 1 (`TrainingDiverged`) without a final model, naming the newest good checkpoint.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from hf_sft.errors import TrainingDiverged
from hf_sft.training.checkpoints import list_checkpoints
from hf_sft.training.signals import resume_command

logger = logging.getLogger("hf_sft.train")


class NumericGuard(TrainerCallback):
    """Stops training at the first optimizer step with a non-finite loss or gradient norm, or non-finite weights
    where a checkpoint is about to be saved. Add it as the Trainer's last callback: it overrides the others' requests
    to save."""

    def __init__(self):
        self.failure: str | None = None  # what was not finite, and at which step
        self.accelerator = None  # NumericGuardSteps sets it: whether the grad scaler skipped the step
        self._loss: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None

    def record_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float().sum()
        self._loss = loss if self._loss is None else self._loss + loss  # non-finite once any micro-step's is

    def record_grad_norm(self, norm) -> None:
        if norm is None:
            return
        if hasattr(norm, "full_tensor"):  # FSDP2's norm is a DTensor: its value, before any collective of ours
            norm = norm.full_tensor()
        self._grad_norm = torch.as_tensor(norm, dtype=torch.float32).detach()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        saves = control.should_save or state.global_step >= state.max_steps  # Trainer saves at the last step
        loss, grad_norm = self._loss, self._skipped_or(self._grad_norm)
        weights = model if saves else None
        device = args.device
        bad = torch.stack(
            [_not_finite(loss, device), _not_finite(grad_norm, device), _weights_not_finite(weights, device)]
        ).to(torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)
        flags = bad.tolist()  # the one host sync of the step
        if any(flags):
            self.failure = self._describe(state.global_step, flags)
            logger.error("%s", self.failure)
            control.should_training_stop = True
        self._loss = self._grad_norm = None
        return self._cancel(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._cancel(control)

    def _cancel(self, control):
        if self.failure:
            control.should_save = control.should_evaluate = False
        return control

    def _skipped_or(self, norm: torch.Tensor | None) -> torch.Tensor | None:
        # fp16's grad scaler skips a step with inf gradients and lowers its scale: that is how it works, not a failure.
        skipped = self.accelerator is not None and self.accelerator.optimizer_step_was_skipped
        return None if skipped else norm

    def _describe(self, step: int, flags: list[float]) -> str:
        numbers = (("the loss", self._loss, flags[0]), ("the gradient norm", self._grad_norm, flags[1]))
        found = [f"{name} is {_value(tensor)}" for name, tensor, flag in numbers if flag]
        if flags[2]:
            found.append("the weights are not finite")
        listed = ", ".join(found[:-1]) + " and " + found[-1] if len(found) > 1 else found[0]
        return f"training stopped at step {step}: {listed}"


def _value(tensor: torch.Tensor | None) -> str:
    """`nan`, `inf`: this rank's value; "not finite" where only another rank's was."""
    value = None if tensor is None else float(tensor)
    return str(value) if value is not None and not math.isfinite(value) else "not finite"


def _not_finite(value: torch.Tensor | None, device) -> torch.Tensor:
    if value is None:
        return torch.zeros((), dtype=torch.bool, device=device)
    return (~torch.isfinite(value.to(device))).any()


def _weights_not_finite(model, device) -> torch.Tensor:
    """Whether any local weight (this rank's shard, under FSDP/ZeRO) is not finite, as a tensor on `device`."""
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for param in model.parameters() if model is not None else ():
        local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP2 DTensor: this rank's shard
        if local.numel():
            bad = bad | (~torch.isfinite(local.detach())).any().to(device)
    return bad


class NumericGuardSteps:
    """Trainer mixin (list it before the Trainer class): shows `numeric_guard` every micro-step's loss and every
    optimizer step's gradient norm.

    Args:
        numeric_guard: the run's `NumericGuard` (add it as the last callback).
        *args, **kwargs: the Trainer class's.
    """

    def __init__(self, *args, numeric_guard: NumericGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.numeric_guard = numeric_guard
        numeric_guard.accelerator = self.accelerator

    def training_step(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.numeric_guard.record_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer's own pre-clip norm of the step (private: tests/test_numeric_guard.py fails if it is renamed).
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.numeric_guard.record_grad_norm(grad_norm)
        return grad_norm


def diverged(guard: NumericGuard, output_dir: Path, learning_rate: float, max_grad_norm: float, main: bool):
    """The exit of a run the guard stopped: what was not finite, the newest good checkpoint, what to change."""
    if not main:
        return TrainingDiverged("")
    advice = (
        f"lower --learning_rate (it was {learning_rate:g}), set or lower --max_grad_norm (it was {max_grad_norm:g}) "
        "or check the data"
    )
    complete = list_checkpoints(output_dir)
    if complete:
        lower = resume_command(complete[-1], "--learning_rate", f"{learning_rate / 10:g}")
        where = f"the newest good checkpoint is {complete[-1]}: {advice}, and resume, e.g. {lower}"
    else:
        where = f"no checkpoint was saved before it: {advice}, and start again"
    saved = "nothing from this step was saved and no final model was written"
    return TrainingDiverged(f"{guard.failure}; {saved}; {where}")
