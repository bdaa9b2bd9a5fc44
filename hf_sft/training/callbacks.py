"""The run's callbacks, and the one place that registers them in their order (`register_callbacks`).

- What the user sees while the run trains: tokens/s in every log entry (`ThroughputCallback`), a plain-text log file
  (`LogFileCallback`), sample answers after each evaluation (`SampleGenerationCallback`), an evaluation at each
  epoch's end (`EvaluateAtEpochEndCallback`).
- Stopping safely: after a signal, a checkpoint at the end of the optimizer step (`PreemptionCallback`, the
  handler itself is `hf_sft.training.signals`); at a non-finite loss, gradient norm or weights, a stop before
  anything is saved from that step (`NumericGuard`).
- Resuming: the hyperparameters given on resume set back into what Trainer restored (`ResumeCallback`), and a
  stream's position kept in every checkpoint (`StreamPositionCallback`).

A non-finite loss, gradient norm or weights stop the run at that step, before anything is saved from it. Trainer
keeps going on a NaN: its logged loss even hides one (`logging_nan_inf_filter` averages it away), and it would write
checkpoints and a final model of NaN weights. The run's Trainer (`hf_sft.training.trainer`) shows the guard each
micro-step's loss and each optimizer step's gradient norm, kept on the device (no host sync per micro-step);
`NumericGuard` reads them once per optimizer step, and before each save also checks the weights themselves (a huge
learning rate can overflow them in one step whose loss and gradients were finite). Under several processes the
verdict is all-reduced, so every rank stops at the same step. On a bad step it cancels the step's save and
evaluation and stops training; the run then exits 1 (`diverged`: `TrainingDiverged`) without a final model, naming
the newest good checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, ProgressCallback

from hf_sft.errors import TrainingDiverged
from hf_sft.training.checkpoints import list_checkpoints
from hf_sft.training.resume import NothingLeftToTrain, restore_hyperparameters, resumed_message
from hf_sft.training.signals import STOP, StopRequests, resume_command

if TYPE_CHECKING:
    from hf_sft.data import StreamingExamples

logger = logging.getLogger("hf_sft.train")


def register_callbacks(
    trainer: Trainer,
    *,
    preemption: PreemptionCallback,
    log_file: LogFileCallback,
    guard: NumericGuard,
    stream: StreamPositionCallback | None = None,
    resume: str | None = None,
    samples: SampleGenerationCallback | None = None,
    extra: list[TrainerCallback] | tuple = (),
) -> None:
    """Add the run's callbacks to `trainer` in their one order; the order matters where stated.

    1. `ThroughputCallback`, before all of Trainer's own: the log entries it extends reach the progress bar and the
       reporting integrations (TensorBoard).
    2. Trainer's own: its flow callback, the reporting integrations, its progress bar.
    3. `PreemptionCallback`, `LogFileCallback`, `StreamPositionCallback` (`--streaming`), the caller's `extra` (the
       throughput benchmark measures through one).
    4. `ResumeCallback` (a resumed run), then with an evaluation split `EvaluateAtEpochEndCallback` and
       `SampleGenerationCallback`.
    5. `NumericGuard`, the last: at a bad step it cancels the save and evaluation the others asked for.

    Args:
        trainer: the run's Trainer, created without callbacks of ours.
        preemption: acts on SIGTERM/SIGINT.
        log_file: writes `train.log`.
        guard: the numeric guard.
        stream: the stream's position recorder, for a `--streaming` run.
        resume: the checkpoint the run resumes from.
        samples: the sample answers, when the run evaluates.
        extra: the caller's callbacks.
    """
    trainer.callback_handler.callbacks.insert(0, ThroughputCallback())
    for callback in (preemption, log_file, stream, *extra):
        if callback is not None:
            trainer.add_callback(callback)
    if resume:
        trainer.add_callback(ResumeCallback(resume, trainer.get_decay_parameter_names))
    if samples is not None:
        trainer.add_callback(EvaluateAtEpochEndCallback())
        trainer.add_callback(samples)
    trainer.add_callback(guard)


def close_progress_bars(trainer: Trainer) -> None:
    """Close Trainer's progress bars now, through the progress callback's own hooks: a training cut short by an
    exception leaves them open, and a bar closed when the trainer is collected would print after the run's last line.
    """
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback):
            if callback.training_bar is not None:
                callback.on_train_end(trainer.args, trainer.state, trainer.control)
            callback.on_evaluate(trainer.args, trainer.state, trainer.control)


# What the user sees


DEFAULT_SAMPLE_INSTRUCTIONS = (
    "What is the capital of France?",
    "Name three colours.",
    "Is a rose an animal or a plant?",
)


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (real, non-padding tokens) to every training log entry; under `--torch_compile`, logs
    the time spent compiling at the end of training (it is inside the first entries' tokens/s).

    First in the callback list (`register_callbacks`): the entries it extends are then shown by the progress bar
    and TensorBoard.
    """

    def __init__(self):
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._last is None:
            return
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        elapsed = now - self._last[0]
        if elapsed > 0 and seen > self._last[1]:
            logs["tokens_per_second"] = round((seen - self._last[1]) / elapsed, 1)
        self._last = (now, seen)

    def on_train_end(self, args, state, control, **kwargs):
        if args.torch_compile:
            graphs, seconds = compile_time()
            logger.info("torch.compile: %d graphs compiled in %.1f s (forward and backward)", graphs, seconds)


def compile_time() -> tuple[int, float]:
    """Graphs `torch.compile` has compiled in this process, and the seconds spent compiling them (forward and
    backward), from dynamo's own counters."""
    from torch._dynamo.utils import calculate_time_spent, counters

    spent = calculate_time_spent()
    seconds = spent.get("entire_frame_compile", 0.0) + spent.get("entire_backward_compile", 0.0)
    return counters["stats"]["unique_graphs"], seconds


class LogFileCallback(TrainerCallback):
    """Appends every log entry to `<output_dir>/train.log`, next to the messages of the hf_sft loggers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(f"step {state.global_step}: {json.dumps(logs, sort_keys=True)}\n")


class EvaluateAtEpochEndCallback(TrainerCallback):
    """Evaluation every N steps is Trainer's; this adds one at the end of each epoch (unless one just ran)."""

    def __init__(self):
        self.last_eval_step = -1

    def on_evaluate(self, args, state, control, **kwargs):
        self.last_eval_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_evaluate = state.global_step != self.last_eval_step
        return control


class SampleGenerationCallback(TrainerCallback):
    """After each evaluation, answers a few fixed instructions greedily with `hf_sft.generate.generate_response`.

    The prompts are in the run's format, and generation stops where `hf-sft generate` would (EOS, or the model's
    context), so the answers are those the saved model gives.
    """

    def __init__(self, tokenizer, template, instructions, max_new_tokens: int = 48):
        self.tokenizer = tokenizer
        self.template = template
        self.instructions = list(instructions)
        self.max_new_tokens = max_new_tokens
        self.history: list[dict] = []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        answers = self.answers(model)
        for instruction, answer in zip(self.instructions, answers, strict=True):
            logger.info("sample @ step %d | %s -> %s", state.global_step, instruction, answer)
        self.history.append({"step": state.global_step, "answers": dict(zip(self.instructions, answers, strict=True))})

    def answers(self, model) -> list[str]:
        """Greedy answers to the instructions (the model's train/eval mode is restored afterwards)."""
        from hf_sft.errors import UsageError
        from hf_sft.generate import generate_response

        was_training = model.training
        model.eval()
        answers = []
        try:
            for instruction in self.instructions:
                try:
                    answer = generate_response(
                        model, self.tokenizer, instruction, max_new_tokens=self.max_new_tokens, template=self.template
                    )
                except UsageError as err:  # a prompt longer than the model's context: say so, keep training
                    answer = f"({err})"
                answers.append(answer)
        finally:
            model.train(was_training)
        return answers


# Stopping safely


class PreemptionCallback(TrainerCallback):
    """After a signal: save a checkpoint at the end of the optimizer step, or stop right after a save under way.

    Stopping only between optimizer steps keeps the checkpoint's data position exact. Under several processes the
    stop request is shared (an all-reduce per step and per save), so every rank stops at the same step.
    """

    def __init__(self, stop: StopRequests = STOP):
        self.stop = stop
        self.remote = False  # another rank received the signal

    @property
    def requested(self) -> bool:
        return self.stop.requested or self.remote

    @property
    def status(self) -> int:
        return self.stop.status if self.stop.requested else 128 + signal.SIGTERM

    @property
    def by(self) -> str:
        return self.stop.first.name if self.stop.requested else "a signal on another rank"

    def on_step_end(self, args, state, control, **kwargs):
        if self._shared(args):
            control.should_save = True
            control.should_training_stop = True
            self._log(f"saving a checkpoint at step {state.global_step}, then stopping")
        return control

    def on_save(self, args, state, control, **kwargs):
        if self._shared(args):  # it came while this checkpoint was written: stop here, not a step later
            control.should_training_stop = True
            self._log(f"checkpoint-{state.global_step} is saved: stopping")
        return control

    def _shared(self, args) -> bool:
        stop = self.stop.requested
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(stop)], device=args.device)
            dist.all_reduce(flag)
            self.remote = self.remote or (bool(flag.item()) and not stop)
        return stop or self.remote

    def _log(self, what: str) -> None:
        new = self.stop.unlogged()
        if new:
            logger.warning("%s (%s; %d signal(s) so far)", what, self.by, self.stop.count)


class NumericGuard(TrainerCallback):
    """Stops training at the first optimizer step with a non-finite loss or gradient norm, or non-finite weights
    where a checkpoint is about to be saved. The Trainer's last callback (`register_callbacks`): it overrides the
    others' requests to save."""

    def __init__(self):
        self.failure: str | None = None  # what was not finite, and at which step
        self.accelerator = None  # the run's Trainer sets it: whether the grad scaler skipped the step
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


# Resuming


class ResumeCallback(TrainerCallback):
    """On train begin of a resumed run: the step intervals and the optimizer's hyperparameters from the arguments
    (`hf_sft.training.resume.restore_hyperparameters`).

    Logs `resumed from checkpoint-N (step N of M)`; when N is M (a run stopped during its final save) it raises
    `NothingLeftToTrain` instead of letting Trainer take a step past the end.

    Args:
        checkpoint: the checkpoint folder resumed from.
        decay_names: which parameters Trainer decays (`Trainer.get_decay_parameter_names`).
    """

    def __init__(self, checkpoint: str | Path, decay_names: Callable[[Any], list[str]]):
        self.checkpoint = checkpoint
        self.decay_names = decay_names

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        state.compute_steps(args, state.max_steps)
        if optimizer is not None:
            restore_hyperparameters(args, model, optimizer, lr_scheduler, self.decay_names(model))
        logger.info("%s", resumed_message(self.checkpoint, state.global_step, state.max_steps))
        if state.global_step >= state.max_steps:
            # Trainer would take one step past the end (it checks the step count only after a step).
            raise NothingLeftToTrain(
                f"{Path(self.checkpoint).name} is the run's last step: the final folder is written from it"
            )


class StreamPositionCallback(TrainerCallback, ExportableState):
    """Records, in each checkpoint's `trainer_state.json`, where the stream stands after the checkpoint's step.

    Args:
        stream: the training `StreamingExamples`.
        examples_per_step: examples one optimizer step consumes from the stream (batch size x accumulation x
            processes: every process reads the whole stream and keeps its share).
    """

    def __init__(self, stream: StreamingExamples, examples_per_step: int):
        self.stream = stream
        self.examples_per_step = examples_per_step
        stream.keep_positions(4 * examples_per_step + 2 * stream.chunk_size)
        self.first_step = self.step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = self.step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        status = self.stream.status
        dropped = ", ".join(
            f"{n} {key.removeprefix('drop:')}" for key, n in sorted(status.items()) if key.startswith("drop:")
        )
        logger.info(
            "streamed %d records: %d dropped (%s)",
            self.stream.tokenized,
            sum(n for key, n in status.items() if key.startswith("drop:")),
            dropped or "none",
        )

    def state(self) -> dict:
        epoch, position = self.stream.position_after((self.step - self.first_step) * self.examples_per_step)
        return {
            "args": {"examples_per_step": self.examples_per_step},
            "attributes": {"epoch": epoch, "position": position},
        }
