"""`train.log` holds the whole run from its first message, though the file is only opened once the folder is claimed.

Until then (inputs still being checked) records wait in memory: a run refused at that stage leaves no file behind.
"""

from __future__ import annotations

import logging
import sys
from logging.handlers import MemoryHandler
from pathlib import Path

import transformers

FORMATTER = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
RUN_LOG = "train.log"
_MARK = "hf_sft_run_log"


class ConsoleHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each message.

    A handler bound to the stream of the process's first run would write into a closed stream once a test harness
    (or an application running several trainings) has swapped `sys.stderr` in between.
    """

    def __init__(self):
        super().__init__()
        self.setFormatter(FORMATTER)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def hold_run_log() -> None:
    """Keep the run's log records (hf_sft's and transformers' warnings) in memory until `start_run_log`."""
    _install(MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1))  # flushes only when told


def start_run_log(output_dir: str | Path) -> None:
    """Open `<output_dir>/train.log` (appending), write the records held so far, and log there from now on."""
    handler = logging.FileHandler(Path(output_dir) / RUN_LOG, encoding="utf-8")
    handler.setFormatter(FORMATTER)
    for held in _marked():
        if isinstance(held, MemoryHandler):
            held.setTarget(handler)
            held.flush()
            break
    _install(handler)


def _owners() -> tuple[logging.Logger, logging.Logger]:
    return logging.getLogger("hf_sft"), transformers.utils.logging.get_logger()


def _marked() -> list[logging.Handler]:
    return [h for owner in _owners() for h in owner.handlers if getattr(h, _MARK, False)]


def _install(handler: logging.Handler) -> None:
    # A second run in the same process logs to its own file: drop the previous run's handlers first.
    for owner in _owners():
        for old in [h for h in owner.handlers if getattr(h, _MARK, False)]:
            owner.removeHandler(old)
            if old is not handler:
                old.close()
    setattr(handler, _MARK, True)
    for owner in _owners():
        owner.addHandler(handler)
