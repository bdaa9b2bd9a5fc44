"""How every hf-sft command reads its flags: a bad value is one line (exit 2), and a float flag is a finite number.

argparse prints its usage block and exits on a bad flag; `ArgumentParser` here raises `UsageError` instead, so the
CLI reports it as it reports every other bad input: one line, exit status 2. `finite_floats` makes every float flag
of a parser refuse `inf`, `-inf` and `nan` as it parses them, before any default, YAML value or dataclass
`__post_init__` can act on one (TrainingArguments turns `--save_steps inf` into an OverflowError otherwise).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

from hf_sft.errors import UsageError


def not_finite(name: str, value: object) -> str:
    """The message for a non-finite value of the flag `name` (e.g. `--learning_rate`)."""
    return f"{name} must be a finite number, got {value}"


class OneLineErrors:
    """Mixin for an `argparse.ArgumentParser` (or a subclass such as `HfArgumentParser`): errors are a
    `UsageError` (one line) rather than usage text and an exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` with one-line errors; its subcommands' parsers are of this class too."""


def finite_floats(parser: argparse.ArgumentParser, spelling: Callable[[argparse.Action], str] | None = None) -> None:
    """Make every `type=float` flag of `parser` (and of its subcommands) refuse non-finite values.

    Args:
        parser: the parser, whose actions are changed in place.
        spelling: how a flag is named in the message (default: its first option string).
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                finite_floats(sub, spelling)
        elif action.type is float:
            action.type = _finite_float(spelling(action) if spelling else action.option_strings[0])


def _finite_float(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)  # a ValueError here is argparse's own "invalid float value" line
        if not math.isfinite(value):
            raise UsageError(not_finite(name, value))
        return value

    parse.__name__ = "float"  # argparse names the type in its "invalid float value" message
    return parse
