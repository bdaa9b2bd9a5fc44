"""The process's one handler for SIGTERM and SIGINT: it records a signal and never raises; the run acts on it later.

Python runs a signal handler in the main thread between two bytecodes, wherever the program is: inside a checkpoint
write, an atexit handler, the release of the run lock. A handler that raises (KeyboardInterrupt) breaks whichever of
those it lands in, and one that logs can land inside a write to the same stream ("reentrant call"). So the handler
only counts: which signal came first and how many came. The run reads that where stopping is safe: between its
set-up stages (`StopRequests.check`), at optimizer-step boundaries and after each checkpoint save
(`hf_sft.training.callbacks.PreemptionCallback`), and after the final save. Each way of stopping ends with one line
saying where the work is and how to continue (`stopped_in_training`, `stopped_before_training`,
`stopped_after_training`).

What signals mean, in order:
- before training (set-up, data, model): the run stops at the end of the stage under way; nothing was trained.
- during a training step: the step finishes, a checkpoint is saved, the run stops.
- during a checkpoint save: the save finishes and the run stops right after it (no further step): that checkpoint is
  where it resumes. A second signal is therefore "stop after the save, do not wait for another step"; it never
  cancels the save, since the first signal already means "stop as soon as a complete checkpoint exists".
- once training has finished (final evaluation, final save, lock release): the final folder is finished.
Any further signal is counted and logged, never raised. The exit status is the first signal's (143 SIGTERM, 130
SIGINT) in every case, a run that finished its final folder included: its last line says that nothing is left to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from hf_sft.errors import RunInterrupted
from hf_sft.training.checkpoints import list_checkpoints
from hf_sft.training.engines import launched_processes

logger = logging.getLogger("hf_sft.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """What SIGTERM/SIGINT asked of this process: the first signal and the count; see `handling_signals`."""

    def __init__(self):
        self._previous: dict[int, object] = {}
        self.reset()

    def reset(self) -> None:
        self._first: int | None = None
        self.at_once: str | None = None  # a command stopped by raising at the first signal (`handling_signals`)
        self.count = 0
        self.echo = True  # the handler's one immediate line; off once the run has printed its last line
        self._logged = 0

    @property
    def first(self) -> signal.Signals | None:
        """The first signal received, if any."""
        return None if self._first is None else signal.Signals(self._first)

    @property
    def requested(self) -> bool:
        return self._first is not None

    @property
    def status(self) -> int:
        """The exit status the first signal asks for: 128 + its number (143 SIGTERM, 130 SIGINT)."""
        return 128 + int(self.first)

    def check(self, message: Callable[[], str]) -> None:
        """Between set-up stages: stop here if a signal came (nothing is lost, no step was taken yet).

        Raises:
            RunInterrupted: with `message()` and the first signal's status.
        """
        if self.requested:
            raise RunInterrupted(message(), self.status)

    def unlogged(self) -> int:
        """How many signals came since the last call: the run logs them at its next safe point."""
        new, self._logged = self.count - self._logged, self.count
        return new

    def _handle(self, signum, frame) -> None:
        # Another signal can run this handler again inside itself, at any call: no call between test and store.
        self.count += 1
        if self._first is not None:
            return
        self._first = signum
        if self.at_once is not None:
            command, self.at_once = self.at_once, None  # once: the clean-up this raise starts is never interrupted
            raise RunInterrupted(stopped_at_once(self.first, command), self.status)
        if self.echo and os.environ.get("RANK", "0") == "0":
            # A raw write, not logging or print: those may be in the middle of a write to the same stream.
            line = f"{self.first.name} received: stopping at the next safe point (further signals change nothing)\n"
            try:
                os.write(2, line.encode())
            except OSError:  # stderr closed or a full pipe's reader gone: the run's own lines still say it
                pass

    def _install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
            # Restart system calls the signal interrupts (SA_RESTART): C code writing a checkpoint must not see EINTR.
            signal.siginterrupt(sig, False)

    def _uninstall(self, ignore: bool) -> None:
        if ignore:  # first: CPython reports the race when it next checks for signals, inside the next swap too
            sys.unraisablehook = _quiet_about_ignored_signals(sys.unraisablehook)
        for sig in STOP_SIGNALS:
            previous = self._previous.get(sig)
            signal.signal(sig, signal.SIG_IGN if ignore else signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


def _quiet_about_ignored_signals(previous: Callable) -> Callable:
    """`sys.unraisablehook` without CPython's report of a signal caught just before SIG_IGN replaced our handler.

    A signal that arrives while the handlers change is caught by the old one and run under the new one, SIG_IGN,
    which CPython reports as an unraisable `OSError` ("Signal 15 ignored due to race condition"), a traceback after
    the run's last line. Ignoring it was the decision already taken; every other report goes on as before.
    """

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, OSError) and str(error).endswith("ignored due to race condition"):
            return
        previous(unraisable)

    return hook


STOP = StopRequests()


@contextlib.contextmanager
def handling_signals(exiting: bool = False, at_once: str | None = None) -> Iterator[StopRequests]:
    """SIGTERM and SIGINT go to `STOP` inside the block, entered once per command (`hf_sft.cli.main`).

    Args:
        at_once: the name of a command that has no safe points of its own (every command but `train`): the first
            signal then raises `RunInterrupted` where the command is, so that the writer removes whatever it was
            writing (`hf_sft.writer`: an output appears whole or not at all), and the command exits 143/130 with one
            line. Further signals are only counted, so the clean-up is never interrupted. Clear `STOP.at_once` once
            the command's work is done.
        exiting: the process ends after the block (the command line's entry point). Signals are then ignored from
            the block's end on instead of getting their previous handlers back: the run has printed its last line
            and decided its status, and at interpreter exit a default SIGINT handler would raise inside atexit
            handlers and a default SIGTERM would replace the status.

    Yields:
        `STOP`, reset (and reset again at the block's end). Off the main thread (where Python cannot set handlers)
        it is only read.

    Raises:
        RuntimeError: the block is entered again inside itself (one handler, one owner).
    """
    if STOP._previous:
        raise RuntimeError("SIGTERM/SIGINT are handled already: enter handling_signals once per command")
    STOP.reset()
    STOP.at_once = at_once
    installed = False
    try:
        STOP._install()
        installed = True
    except ValueError:  # not the main thread: the embedding application owns the signals
        pass
    try:
        yield STOP
    finally:
        if installed:
            STOP.echo = False
            STOP._uninstall(ignore=exiting)
        STOP.reset()  # read inside the block only: a run started outside one (in code) sees no stale signal


def stopped_at_once(signum: signal.Signals, command: str) -> str:
    """The last line of a command other than `train` stopped by a signal: the writer removed what was in flight."""
    return f"stopped by {signum.name}: hf-sft {command} did not finish; nothing half-written is left"


def resume_command(checkpoint: str | Path, *flags: str) -> str:
    """The command that continues from `checkpoint`; it needs no other flag (the checkpoint holds the arguments)."""
    command = ["--resume_from_ckpt_path", str(checkpoint), *flags]
    if Path(sys.argv[0]).name == "train.py":  # scripts/train.py, maybe under accelerate launch
        processes = launched_processes()
        launcher = ["python"] if processes == 1 else ["accelerate", "launch", "--num_processes", str(processes)]
        command = [*launcher, sys.argv[0], *command]
    else:
        command = ["hf-sft", "train", *command]
    return shlex.join(command)


def stopped_in_training(preemption, output_dir: Path, main_process: bool) -> RunInterrupted:
    """The exit of a run stopped mid-training: the newest complete checkpoint and the command that resumes it."""
    if not main_process:
        return RunInterrupted("", preemption.status)
    complete = list_checkpoints(output_dir)
    if not complete:
        return RunInterrupted(f"stopped by {preemption.by}: no checkpoint could be saved", preemption.status)
    newest = complete[-1]
    return RunInterrupted(
        f"stopped by {preemption.by} at step {newest.name.split('-')[-1]}: checkpoint saved in {newest}; "
        f"resume with: {resume_command(newest)}",
        preemption.status,
    )


def stopped_before_training(stop: StopRequests, resume: str | None, main_process: bool) -> str:
    """The last line of a run stopped during its set-up: nothing trained, what to run again."""
    if not main_process:
        return ""
    if resume:
        return f"stopped by {stop.first.name} before training began: {resume} is unchanged; resume with: " + (
            resume_command(resume)
        )
    return f"stopped by {stop.first.name} before training began: nothing was trained; run the same command again"


def stopped_after_training(stop: StopRequests, output_dir: Path, main_process: bool) -> RunInterrupted:
    """The exit of a run signalled once training had finished: its final folder was finished first."""
    message = (
        f"{stop.first.name} received at the end of training: the final model in {output_dir} is complete; "
        "nothing to resume"
    )
    return RunInterrupted(message if main_process else "", stop.status)
