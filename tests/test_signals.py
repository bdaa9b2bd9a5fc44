"""One signal handler: 1, 2 or hundreds of SIGTERM/SIGINT at any moment end with a complete checkpoint, 143/130 and
the resume line last, with no traceback and no lock left; what a signal means at each moment of a run."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from helpers.runs import FIXTURE_RUN, snapshot
from safetensors.torch import load_file

from hf_sft.training.checkpoints import list_checkpoints
from hf_sft.training.run_folder import LOCK_FILE, check_run_folder, live_holder
from hf_sft.training.signals import STOP, handling_signals

REPO = Path(__file__).resolve().parents[1]
HELPER = str(REPO / "tests" / "helpers" / "signal_run.py")
STEPS = 12
# A tiny new model on the shipped fixtures, a checkpoint every step: most of a run's time is spent writing them.
FLAGS = [*FIXTURE_RUN, "--log_interval", "1", "--gradient_accumulation_steps", "1", "--max_iters", str(STEPS)]
FLAGS += ["--save_interval", "1"]


class Run:
    """A run started by the fork server (`tests/helpers/signal_run.py --serve`): a pid to signal, then its end."""

    def __init__(self, server: "Server", pid: int, log: Path):
        self.server, self.pid, self.log = server, pid, log
        self.status: int | None = None

    def poll(self) -> int | None:
        if self.status is None:
            self.status = self.server.ask({"do": "poll", "pid": self.pid})["status"]
        return self.status

    def send_signal(self, sig: signal.Signals) -> None:
        if self.poll() is None:  # not yet reaped: the pid is still this run's (a zombie ignores signals)
            os.kill(self.pid, sig)

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.05)
        return self.status, self.log.read_text()


class Server:
    def __init__(self):
        variables = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        variables["PYTHONPATH"] = os.pathsep.join([str(REPO), variables.get("PYTHONPATH", "")])
        variables.pop("WORLD_SIZE", None)
        self.proc = subprocess.Popen(
            [sys.executable, HELPER, "--serve"],
            env=variables,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, out: Path, storm: str | None = None, flags: list[str] = FLAGS) -> Run:
        log = out.parent / f"{out.name}.output.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        request = {"do": "start", "argv": [*flags, "--out_dir", str(out)], "log": str(log), "storm": storm}
        return Run(self, self.ask(request)["pid"], log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    started = Server()
    yield started
    started.close()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def logged_step(out: Path) -> int:
    log = out / "train.log"
    if not log.is_file():
        return 0
    steps = [int(line.split()[1].rstrip(":")) for line in log.read_text().splitlines() if line.startswith("step ")]
    return max(steps, default=0)


def wait_for_step(out: Path, proc: Run, step: int) -> None:
    deadline = time.monotonic() + 120
    while logged_step(out) < step:
        assert proc.poll() is None, "the run ended before the moment to signal it"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def assert_left_cleanly(out: Path, output: str) -> None:
    """No traceback in the whole output, the first signal acknowledged once, the lock released, the folder usable."""
    assert "Traceback" not in output, output[-3000:]
    assert output.count(" received: stopping at the next safe point") == 1
    assert not (out / LOCK_FILE).exists() and live_holder(out) is None
    check_run_folder(out, resume="latest", overwrite=False)


def assert_stopped_with_checkpoint(out: Path, status: int, output: str, sig: signal.Signals) -> int:
    """Exit 128 + sig, a complete newest checkpoint, and the line naming it and the resume command last."""
    assert status == 128 + sig, output[-3000:]
    assert_left_cleanly(out, output)
    newest = list_checkpoints(out)[-1]
    step = json.loads((newest / "trainer_state.json").read_text())["global_step"]
    assert newest.name == f"checkpoint-{step}"
    assert output.strip().splitlines()[-1] == (
        f"stopped by {sig.name} at step {step}: checkpoint saved in {newest}; "
        f"resume with: hf-sft train --resume_from_ckpt_path {newest}"
    )
    assert not (out / "model.safetensors").exists()  # an interrupted run writes no final model
    return step


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> Path:
    """The uninterrupted run, once, in a process like the signalled ones (one thread: bit for bit)."""
    out = tmp_path_factory.mktemp("signals") / "reference"
    status, output = server.start(out).finish()
    assert status == 0, output[-3000:]
    return out


def resume_latest(server, out: Path) -> None:
    newest = list_checkpoints(out)[-1].name
    status, output = server.start(out, flags=["--resume_from_ckpt_path", "latest"]).finish()
    assert status == 0, output[-3000:]
    assert f"resumed from {newest} (step {newest.split('-')[1]} of {STEPS})" in output


# --- the handler itself ---


def test_the_handler_counts_every_signal_keeps_the_first_and_never_raises():
    previous = signal.getsignal(signal.SIGTERM)
    with handling_signals() as stop:
        STOP.echo = False
        for _ in range(50):
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # not a KeyboardInterrupt
        with pytest.raises(RuntimeError, match="handled already"), handling_signals():  # entered once per command
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert (stop.first, stop.count, stop.status) == (signal.SIGTERM, 52, 143)
        assert stop.unlogged() == 52 and stop.unlogged() == 0
    assert signal.getsignal(signal.SIGTERM) is previous  # given back: this process goes on
    with handling_signals() as stop:  # the next run starts with a clean record
        assert (stop.first, stop.count) == (None, 0)


def test_at_the_entry_points_end_signals_are_ignored_not_given_back():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with handling_signals(exiting=True):
            pass
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_signal_caught_while_the_handlers_change_is_ignored_without_a_traceback():
    """CPython reports a signal caught by our handler and run under SIG_IGN as an unraisable error: after the
    entry point's block that report is the decision already taken, and only that one is dropped."""
    previous_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous_hook = sys.unraisablehook
    reported = []
    sys.unraisablehook = reported.append
    try:
        with handling_signals(exiting=True):
            pass
        errors = (OSError("Signal 15 ignored due to race condition"), ValueError("something else"))
        for error in errors:
            sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error, object=None))
        assert [report.exc_value for report in reported] == [errors[1]]
    finally:
        sys.unraisablehook = previous_hook
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


# --- runs signalled from outside, at seeded random moments ---

# By seed: what is sent. The first signal decides the status, whatever follows it.
KINDS = (
    "one SIGTERM", "two SIGTERMs", "a storm of SIGTERMs", "one SIGINT", "a SIGTERM then a SIGINT",
    "a storm of SIGTERMs",
)  # fmt: skip


def send(proc: Run, kind: str, rng: random.Random) -> int:
    """Send `kind` of signals; returns how many were sent."""
    if kind == "one SIGINT":
        proc.send_signal(signal.SIGINT)
        return 1
    if kind == "one SIGTERM":
        proc.send_signal(signal.SIGTERM)
        return 1
    if kind in ("two SIGTERMs", "a SIGTERM then a SIGINT"):
        proc.send_signal(signal.SIGTERM)
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGINT if kind.endswith("SIGINT") else signal.SIGTERM)
        return 2
    sent, end = 0, time.monotonic() + rng.uniform(0.5, 1.0)
    while time.monotonic() < end and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        sent += 1
    return sent


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(len(KINDS)))
def test_signals_at_random_moments_leave_a_complete_checkpoint_that_resumes_bit_for_bit(
    tmp_path, server, reference, seed
):
    rng = random.Random(seed)
    kind = KINDS[seed]
    out = tmp_path / "run"
    proc = server.start(out)
    wait_for_step(out, proc, rng.randint(1, STEPS - 6))  # at least 6 steps and checkpoints still to come
    time.sleep(rng.uniform(0.0, 0.1))  # anywhere in a step or a checkpoint write
    sent = send(proc, kind, rng)
    status, output = proc.finish()
    sig = signal.SIGINT if kind == "one SIGINT" else signal.SIGTERM
    step = assert_stopped_with_checkpoint(out, status, output, sig)
    assert step < STEPS and (kind != "a storm of SIGTERMs" or sent >= 100), (step, sent)
    if seed in (0, 2):  # resumable: `latest` ends where the uninterrupted run ended, bit for bit
        resume_latest(server, out)
        assert_same_weights(out, reference)


# --- each moment, reproduced exactly: the run signals itself from inside it ---


@pytest.mark.slow
def test_a_second_sigterm_50_ms_after_the_first_still_saves_and_exits_143(tmp_path, server):
    out = tmp_path / "run"
    proc = server.start(out)
    wait_for_step(out, proc, 3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    status, output = proc.finish()
    assert_stopped_with_checkpoint(out, status, output, signal.SIGTERM)  # 143, not 130: no KeyboardInterrupt


@pytest.mark.slow
def test_a_storm_during_a_checkpoint_write_stops_right_after_that_checkpoint(tmp_path, server, reference):
    out = tmp_path / "run"
    status, output = server.start(out, storm="checkpoint-4").finish()
    assert "signal_run: storm in checkpoint-4" in output
    # The save under way finished and the run stopped there: no further step was taken.
    assert assert_stopped_with_checkpoint(out, status, output, signal.SIGTERM) == 4
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]  # 3 kept
    resume_latest(server, out)
    assert_same_weights(out, reference)


@pytest.mark.slow
def test_a_storm_during_the_final_save_lets_it_finish_then_exits_143(tmp_path, server, reference):
    out = tmp_path / "run"
    status, output = server.start(out, storm="final").finish()
    assert "signal_run: storm in final" in output
    assert status == 143, output[-3000:]
    assert_left_cleanly(out, output)
    assert output.strip().splitlines()[-1] == (
        f"SIGTERM received at the end of training: the final model in {out} is complete; nothing to resume"
    )
    assert_same_weights(out, reference)  # the whole final model, written under the storm
    assert (out / "README.md").is_file() and (out / "loss.png").is_file()


@pytest.mark.slow
def test_signals_before_training_stop_at_once_with_nothing_trained(tmp_path, server):
    out = tmp_path / "run"
    status, output = server.start(out, storm="setup").finish()
    assert "signal_run: storm in setup" in output
    assert status == 143, output[-3000:]
    assert_left_cleanly(out, output)
    assert output.strip().splitlines()[-1] == (
        "stopped by SIGTERM before training began: nothing was trained; run the same command again"
    )
    assert list_checkpoints(out, complete_only=False) == []


@pytest.mark.slow
def test_signals_before_a_resumed_run_trains_leave_its_checkpoint_byte_identical(tmp_path, server, reference):
    out = tmp_path / "run"
    out.mkdir()
    name = f"checkpoint-{STEPS - 1}"
    shutil.copytree(reference / name, out / name)
    before = snapshot(out)
    status, output = server.start(out, storm="setup", flags=["--resume_from_ckpt_path", "latest"]).finish()
    assert status == 143, output[-3000:]
    assert_left_cleanly(out, output)
    checkpoint = out / name
    assert output.strip().splitlines()[-1] == (
        f"stopped by SIGTERM before training began: {checkpoint} is unchanged; "
        f"resume with: hf-sft train --resume_from_ckpt_path {checkpoint}"
    )
    after = snapshot(out)
    assert {name: data for name, data in after.items() if name != "train.log"} == before
