"""A non-finite loss, gradient norm or weights stop the run at that step: exit 1, one line, nothing saved from it."""

import math
import re
from pathlib import Path

import pytest
import torch
from helpers.runs import FIXTURE_RUN, snapshot
from transformers import TrainerCallback

from hf_sft.cli import main
from hf_sft.errors import TrainingDiverged
from hf_sft.training.arguments import parse_args
from hf_sft.training.checkpoints import list_checkpoints
from hf_sft.training.run import run
from hf_sft.training.run_folder import LOCK_FILE

FLAGS = [
    *FIXTURE_RUN, "--log_interval", "5", "--gradient_accumulation_steps", "2", "--max_iters", "6",
    "--save_interval", "1",
]  # fmt: skip


class Poison(TrainerCallback):
    """At the start of optimizer step `step`, makes the weights (`what="weights"`) or the gradients non-finite.

    Keeps a snapshot of the checkpoint saved just before, to compare with what is left at the end.
    """

    def __init__(self, out: Path, step: int, what: str):
        self.out, self.step, self.what = out, step, what
        self.before: dict[str, bytes] | None = None
        self._hooks = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 != self.step:
            return
        self.before = snapshot(self.out / f"checkpoint-{state.global_step}")
        params = [p for p in model.parameters() if p.requires_grad]
        if self.what == "weights":
            with torch.no_grad():
                params[-1].view(-1)[0] = math.inf
        else:  # the loss stays finite, the backward pass overflows
            self._hooks = [params[0].register_hook(lambda grad: torch.full_like(grad, math.inf))]

    def on_step_end(self, args, state, control, **kwargs):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def train_poisoned(out: Path, step: int, what: str) -> tuple[Poison, str]:
    poison = Poison(out, step, what)
    with pytest.raises(TrainingDiverged) as stopped:
        run(*parse_args([*FLAGS, "--out_dir", str(out)]), callbacks=[poison])
    return poison, str(stopped.value)


def advice(out: Path, step: int) -> str:
    good = out / f"checkpoint-{step}"
    return (
        f"nothing from this step was saved and no final model was written; the newest good checkpoint is {good}: "
        "lower --learning_rate (it was 0.001), set or lower --max_grad_norm (it was 1) or check the data, and resume, "
        f"e.g. hf-sft train --resume_from_ckpt_path {good} --learning_rate 0.0001"
    )


def assert_stopped_at(out: Path, step: int, poison: Poison) -> None:
    assert [p.name for p in list_checkpoints(out, complete_only=False)] == [f"checkpoint-{n}" for n in range(1, step)]
    assert snapshot(out / f"checkpoint-{step - 1}") == poison.before  # the good checkpoint, byte for byte
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()
    assert not (out / LOCK_FILE).exists()


def test_a_non_finite_loss_stops_at_that_step_and_the_good_checkpoint_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    poison, message = train_poisoned(out, step=4, what="weights")
    found = "the loss is nan, the gradient norm is nan and the weights are not finite"
    assert message == f"training stopped at step 4: {found}; {advice(out, 3)}"
    assert_stopped_at(out, 4, poison)
    # The line's advice works: the good checkpoint resumes with a new rate to a finite final model.
    assert main(["train", "--resume_from_ckpt_path", str(out / "checkpoint-3"), "--learning_rate", "1e-4"]) == 0
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())


def test_a_non_finite_gradient_norm_with_a_finite_loss_stops_too(tmp_path):
    out = tmp_path / "run"
    poison, message = train_poisoned(out, step=3, what="gradients")
    found = "the gradient norm is inf and the weights are not finite"  # clipping by inf made them NaN
    assert message == f"training stopped at step 3: {found}; {advice(out, 2)}"
    assert_stopped_at(out, 3, poison)


def test_weights_that_overflow_in_one_step_are_never_saved_and_the_cli_exits_1(tmp_path, capsys):
    out = tmp_path / "run"
    # fp32 cannot hold 1e39: the first update makes the weights infinite while its loss and gradients were finite.
    flags = [*FLAGS, "--learning_rate", "1e39", "--min_lr", "0", "--warmup_steps", "0", "--out_dir", str(out)]
    assert main(["train", *flags]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: training stopped at step 1: the weights are not finite; nothing from this step was saved and no final "
        "model was written; no checkpoint was saved before it: lower --learning_rate (it was 1e+39), set or lower "
        "--max_grad_norm (it was 1) or check the data, and start again"
    )
    assert list_checkpoints(out, complete_only=False) == [] and not (out / "model.safetensors").exists()


def test_a_compiled_run_logs_its_compile_time(caplog):
    from types import SimpleNamespace

    from hf_sft.training.callbacks import ThroughputCallback

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (x * 2).sum(), backend="eager")
    compiled(torch.ones(3))
    with caplog.at_level("INFO", logger="hf_sft.train"):
        ThroughputCallback().on_train_end(SimpleNamespace(torch_compile=False), None, None)
        assert "torch.compile" not in caplog.text
        ThroughputCallback().on_train_end(SimpleNamespace(torch_compile=True), None, None)
    assert re.search(r"torch\.compile: [1-9]\d* graphs compiled in \d+\.\d s", caplog.text)
