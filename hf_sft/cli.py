"""The `hf-sft` command: one parser per subcommand, each living in `hf_sft.commands.<name>`.

Every subcommand exits 0 on success, 2 on bad usage or bad input (`UsageError`, a bad flag included: one line on
stderr), 130/143 when a command received SIGINT/SIGTERM (`RunInterrupted`: its last line says where the work is
and how to resume), and 1 on any other failure: a run stopped by a non-finite loss (`TrainingDiverged`), a write the
system refused (`WriteFailed`, naming the path and the cause) or anything else (one line too, unless `--debug` asks
for the traceback). Every message is printed on one line, whatever line breaks a library put in it.

Every command installs the signal handler first (`hf_sft.training.signals`), the one place it is entered. `train`
stops at its own safe points; every other command stops where it is at the first signal, its writes cleaned up by
`hf_sft.writer`, and exits 143/130 with one line. Called as the process's entry point (no `argv`), it leaves
SIGTERM/SIGINT ignored once the command has printed its last line, so that nothing that runs at interpreter exit is
interrupted; called with `argv` (a test, an application), it restores the previous handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hf_sft import flags
from hf_sft.errors import RunInterrupted, TrainingDiverged, UsageError, WriteFailed

COMMANDS = ("convert", "train", "data", "generate", "export", "push", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = flags.ArgumentParser(
        prog="hf-sft",
        description="Instruction fine-tuning of home-grown GPTs, the Hugging Face way.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"hf_sft.commands.{name}")
        sub = subparsers.add_parser(
            name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    flags.finite_floats(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    entry_point = argv is None
    argv = sys.argv[1:] if argv is None else argv
    # `hf-sft train` forwards its flags untouched to the training parser, which owns them.
    if argv[:1] == ["train"]:
        from hf_sft.training.signals import handling_signals

        with handling_signals(exiting=entry_point):
            from hf_sft.commands.train import run_argv

            rest = [arg for arg in argv[1:] if arg != "--debug"]
            status = _guarded(lambda: run_argv(rest), debug="--debug" in argv)
        if entry_point:
            _end_launched_process(status)
        return status

    from hf_sft.training.signals import handling_signals

    command = next((arg for arg in argv if not arg.startswith("-")), "")  # the subcommand, for the stop line
    with handling_signals(exiting=entry_point, at_once=command) as stop:

        def parse_and_run() -> int:
            try:
                args = build_parser().parse_args(argv)
                return args.run(args)
            finally:
                stop.at_once = None  # done (or failing): a signal from here on only ends the process as it is ending

        return _guarded(parse_and_run, debug="--debug" in argv)


def _guarded(action, debug: bool) -> int:
    try:
        return action() or 0
    except UsageError as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        sys.stdout.flush()
        if str(stop):  # only the main process says it
            print(_one_line(stop), file=sys.stderr, flush=True)
        return stop.status
    except (WriteFailed, TrainingDiverged) as err:
        if debug:
            raise
        if str(err):  # only the main process of a multi-process run says it
            print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence: one line, not a traceback wall
        if debug:
            raise
        print(f"error: {type(err).__name__}: {_one_line(err)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _end_launched_process(status: int) -> None:
    """End one process of a multi-process launch now that its status is decided and its last line printed.

    At interpreter exit, C++ objects that the distributed stack left behind are destroyed with their threads still
    joinable, and the process aborts ("terminate called without an active exception", SIGABRT) in a fraction of
    launches even after the process group was destroyed: the launcher then reports a finished run as failed. Once
    the streams and the log are flushed, nothing is left to do but leave with the status.
    """
    from hf_sft.training.engines import launched_processes

    if launched_processes() <= 1:
        return
    import logging
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
