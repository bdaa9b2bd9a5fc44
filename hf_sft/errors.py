"""Errors that reach the user as one clear line instead of a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from safetensors import SafetensorError

# What transformers, safetensors, tokenizers, peft, torch and json raise on a file or value they cannot use.
INPUT_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, SafetensorError)


class UsageError(Exception):
    """Bad usage or bad input: the CLI prints the message and exits with status 2."""


class RunInterrupted(BaseException):
    """A run stopped by a signal after saving a checkpoint: the CLI prints the message last and exits `status`.

    A `BaseException`, as `KeyboardInterrupt` is: raised where a command is (`hf_sft.training.signals`), it must pass
    through the `except Exception` fallbacks of the code it interrupts.

    Attributes:
        status: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class TrainingDiverged(Exception):
    """A non-finite loss, gradient norm or weights stopped training: the CLI prints the line and exits 1.

    Nothing was saved from the bad step; the message names the newest good checkpoint and what to change.
    """


class WriteFailed(Exception):
    """A write the system refused (disk full, read-only, no permission): the CLI prints the line and exits 1.

    The message names the path and the cause; `hf_sft.writer` has already removed what it had started.
    """


@contextlib.contextmanager
def bad_input(what: str, errors: tuple[type[BaseException], ...] = INPUT_ERRORS) -> Iterator[None]:
    """Around a library call that reads a user's input: its errors become a `UsageError` (exit 2, one line).

    Args:
        what: the input, as the message starts, e.g. "--pretrained_ckpt_path models/base: cannot load the model".
        errors: the exception classes that mean "this input is unusable" (default: `INPUT_ERRORS`).

    Raises:
        UsageError: "{what}: {the library's message}".
    """
    try:
        yield
    except UsageError:
        raise
    except errors as err:
        raise UsageError(f"{what}: {err}") from None
