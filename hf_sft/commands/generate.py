"""Answer an instruction with a fine-tuned model, using the prompt template it was trained with.

MODEL_DIR is a folder written by `hf-sft convert` or `hf-sft train`, or a `checkpoint-STEP/` folder of a run.
Only the response is printed. Decoding is greedy (deterministic) unless --temperature, --top_p or --top_k is given;
generation stops at the EOS token or after --max_new_tokens tokens.

With --interactive, each line read from standard input is an instruction and its answer is printed; an empty line is
skipped, `exit`, `quit` or end of input (Ctrl-D) stops. --input, if given, is the context of every instruction.
Text that is not valid UTF-8 (in --instruction, --input or a line of stdin) is refused with one line (exit 2).

example:
  hf-sft generate models/sft --instruction "Name three colours."
  hf-sft generate out/finetune/checkpoint-400 --instruction "Summarise this." --input "$(cat note.txt)"
  hf-sft generate models/sft --instruction "Write a haiku." --temperature 0.8 --top_p 0.95 --seed 1
  hf-sft generate models/sft --interactive
"""

from __future__ import annotations

import argparse
import sys

from hf_sft.errors import UsageError

HELP = "answer an instruction (or a stream of them) with a fine-tuned model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model folder or checkpoint-STEP folder")
    parser.add_argument("--instruction", help="the instruction to answer (required unless --interactive)")
    parser.add_argument("--input", default="", help="optional context for the instruction")
    parser.add_argument("--interactive", action="store_true", help="read instructions from stdin, one per line")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="most tokens to generate [default: 256]")
    parser.add_argument("--temperature", type=float, default=None, help="sample with this temperature (0: greedy)")
    parser.add_argument("--top_p", type=float, default=None, help="sample from the top-p probability mass")
    parser.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... [default: cuda when available]")


def run(args: argparse.Namespace) -> int:
    """Load the model once, then answer one instruction or every line of stdin."""
    if not args.interactive and not args.instruction:
        raise UsageError("give --instruction TEXT, or --interactive to read instructions from stdin")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    for name in ("instruction", "input"):
        check_text(getattr(args, name), f"--{name}")

    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from hf_sft.generate import Sampling, generate_response, load_for_generation

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    sampling.generate_kwargs()  # refuse bad values before the model is loaded
    if args.device is not None:
        check_device(args.device)
    if args.seed is not None:
        set_seed(args.seed)
    hf_logging.disable_progress_bar()  # stdout/stderr carry the answers and errors only
    model, tokenizer = load_for_generation(args.model_dir, device=args.device)

    def answer(instruction: str) -> None:
        print(generate_response(model, tokenizer, instruction, args.input, args.max_new_tokens, sampling), flush=True)

    if not args.interactive:
        answer(args.instruction)
        return 0
    if args.instruction:
        answer(args.instruction)
    for instruction in _instructions(sys.stdin):
        answer(instruction)
    return 0


def check_device(name: str) -> None:
    """Refuse a device torch does not know, or one this machine does not have.

    Raises:
        UsageError: naming the device and what the machine has.
    """
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cpu":
        return
    present = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if present is None or present.type != device.type:
        raise UsageError(
            f"--device {name}: this machine has no {device.type} device (it has: cpu"
            f"{f', {present.type}' if present is not None else ''})"
        )
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(
            f"--device {name}: this machine has {count} {device.type} device(s), {device.type}:0 "
            f"to {device.type}:{count - 1}"
        )


def check_text(value: str | None, where: str) -> None:
    """Refuse text that is not valid UTF-8: Python hands undecodable bytes of the command line (or of a stream read
    with `surrogateescape`) on as lone surrogates, which no tokenizer takes.

    Raises:
        UsageError: naming where the text came from and the first undecodable byte.
    """
    try:
        (value or "").encode("utf-8")
    except UnicodeEncodeError as err:
        point = ord(value[err.start])
        what = f"byte 0x{point - 0xDC00:02x}" if 0xDC80 <= point <= 0xDCFF else f"lone surrogate U+{point:04X}"
        raise UsageError(f"{where} is not valid UTF-8 text ({what} at character {err.start})") from None


def _instructions(stream):
    """Non-empty lines of `stream` until `exit`/`quit` or its end; shows a prompt when a person is typing.

    Raises:
        UsageError: a line that is not valid UTF-8 (named by its number).
    """
    tty = stream.isatty()
    if hasattr(stream, "reconfigure"):  # undecodable bytes reach `check_text`, which names their line
        stream.reconfigure(errors="surrogateescape")
    number = 0
    while True:
        if tty:
            print("instruction> ", end="", file=sys.stderr, flush=True)
        number += 1
        line = stream.readline()
        if not line:
            return
        check_text(line, f"standard input line {number}")
        line = line.strip()
        if line in ("exit", "quit"):
            return
        if line:
            yield line
