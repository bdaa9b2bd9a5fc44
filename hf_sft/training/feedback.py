"""What a run tells its user while it trains: tokens/s, a plain-text log file, sample answers, epoch-end evals."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger("hf_sft.train")

DEFAULT_SAMPLE_INSTRUCTIONS = (
    "What is the capital of France?",
    "Name three colours.",
    "Is a rose an animal or a plant?",
)


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (real, non-padding tokens) to every training log entry.

    Put it first in the callback list: the entries it extends are then shown by the progress bar and TensorBoard.
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
