"""Errors that reach the user as one clear line instead of a traceback."""


class UsageError(Exception):
    """Bad usage or bad input: the CLI prints the message and exits with status 2."""


class RunInterrupted(Exception):
    """A run stopped by a signal after saving a checkpoint: the CLI prints the message last and exits `status`.

    Attributes:
        status: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class WriteFailed(Exception):
    """A write the system refused (disk full, read-only, no permission): the CLI prints the line and exits 1.

    The message names the path and the cause; `hf_sft.writer` has already removed what it had started.
    """
