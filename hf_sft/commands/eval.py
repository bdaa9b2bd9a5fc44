"""Measure a model folder on instruction data: did it learn, and where? Optionally against the model it started from.

MODEL is a folder written by `hf-sft convert` or `hf-sft train` (or a `checkpoint-STEP/` folder). The records are
read, formatted, tokenised, limited in length and masked exactly as `hf-sft train` does with the same data flags
(--template defaults to the folder's own prompt format), and batched as training batches them (padding-free packing
unless `--packing false`). Over the supervised tokens only (the responses and their EOS) it reports the mean loss,
perplexity (exp of the loss) and next-token accuracy (the share of those tokens the model ranks first), overall and
per group of records: `--group_by FIELD`, by default `category` when the records have one (Dolly's open_qa,
closed_qa, summarization, ...); records without the field form a group of their own.

Evaluated: all of --data_path; with --val_split, exactly the records `hf-sft train` held out with the same
--val_split and --seed; with --eval_data_path, that file.

--compare BASE scores a second model on the same tokens (a folder, a legacy .pt/.pth with --tokenizer_path, or a Hub
id) and reports the difference per group (model minus base: a negative loss difference is an improvement). The
greedy answers of the model (and the base) to the first --num_answers records are shown beside the reference answer.

Written into MODEL (or --out DIR), together, only once everything is computed: eval_results.json (every figure, the
data files' sizes and sha256, the models' paths and revisions, this command), eval_report.html (one self-contained
page: the table, a bar chart of the loss per group, the answers side by side) and, in MODEL, the model card
(README.md) with the results as Hub model-index metadata (its text kept), which `hf-sft push` uploads. An
evaluation killed while moving its files in leaves the folder marked incomplete; the next `hf-sft eval` of it removes
that evaluation's results and runs.

examples:
  hf-sft eval out/finetune --data_path data/dolly_test.jsonl
  hf-sft eval out/finetune --data_path data/dolly.jsonl --val_split 0.05 --compare models/base
  hf-sft eval out/finetune --data_path dolly.jsonl --compare out/pretrain/best_model.pt \\
      --tokenizer_path data/tokenizer/custom_gpt_tokenizer.json --num_answers 5
"""

from __future__ import annotations

import argparse
import shlex
import sys

HELP = "loss, perplexity and accuracy of a model on a dataset, per category, against its base model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_sft.data import DataArguments
    from hf_sft.evaluation import EvalSettings
    from hf_sft.training.arguments import SFTTrainingArguments, add_dataclass_arguments

    parser.add_argument("model_dir", metavar="MODEL", help="model folder or checkpoint-STEP folder to evaluate")
    add_dataclass_arguments(parser, DataArguments)
    compare = parser.add_argument_group("comparison")
    compare.add_argument("--compare", default=None, metavar="BASE", help="folder, legacy .pt/.pth or Hub id")
    compare.add_argument("--tokenizer_path", default=None, help="the tokenizer of a legacy --compare checkpoint")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        compare.add_argument(f"--{name}", default=None, help=f"{name} of a legacy --compare checkpoint's tokenizer")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--group_by", default=None, metavar="FIELD", help="record field naming each group")
    evaluation.add_argument(
        "--batch_size",
        type=int,
        default=SFTTrainingArguments.per_device_eval_batch_size,
        help=f"examples per forward [default: {SFTTrainingArguments.per_device_eval_batch_size}]",
    )
    evaluation.add_argument(
        "--packing",
        type=_boolean,
        default=SFTTrainingArguments.packing,
        metavar="{true,false}",
        help=f"padding-free packing of each batch, as training [default: {SFTTrainingArguments.packing}]",
    )
    answers = EvalSettings.num_answers, EvalSettings.max_new_tokens
    evaluation.add_argument(
        "--num_answers", type=int, default=answers[0], help=f"records answered side by side [default: {answers[0]}]"
    )
    evaluation.add_argument(
        "--max_new_tokens", type=int, default=answers[1], help=f"longest answer [default: {answers[1]}]"
    )
    evaluation.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... [default: cuda when available]")
    evaluation.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="autocast dtype [default: float32]",
    )
    evaluation.add_argument(
        "--seed", type=int, default=SFTTrainingArguments.seed, help="seed of the --val_split held-out part"
    )
    evaluation.add_argument("--cache_dir", default=None, help="datasets cache folder")
    evaluation.add_argument("--out", default=None, metavar="DIR", help="where the results go [default: MODEL]")
    evaluation.add_argument(
        "--no_model_card", action="store_true", help="leave MODEL's README.md unchanged (results and report only)"
    )
    # Evaluation reads all of --data_path unless a held-out part is asked for, and the folder's own format.
    parser.set_defaults(val_split=0.0, template=None, eval_parser=parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from hf_sft.commands.generate import check_device
    from hf_sft.data import format_of, get_format, parse_field_map, resolve_max_seq_len
    from hf_sft.errors import UsageError
    from hf_sft.evaluation import (
        EvalSettings,
        evaluate,
        load_model,
        prepare_data,
        recover_interrupted_write,
        write_outputs,
    )
    from hf_sft.model_folder import resolve_model_dir

    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_answers < 0:
        raise UsageError(f"--num_answers must be 0 or more, got {args.num_answers}")
    if not args.data_path:
        raise UsageError("--data_path is required")
    if args.streaming:
        raise UsageError("--streaming: hf-sft eval reads its records whole; drop the flag")
    if args.device is not None:
        check_device(args.device)
    out_dir = args.out or args.model_dir
    _check_destinations(args, out_dir)
    for folder in {args.model_dir, out_dir}:
        if recover_interrupted_write(folder):
            print(f"{folder}: removed the results of an evaluation cut short while writing them", file=sys.stderr)
    model_dir = resolve_model_dir(args.model_dir)  # an incomplete folder is refused before anything is read
    data_path = args.data_path[0] if len(args.data_path) == 1 else args.data_path
    if args.data_weights and isinstance(data_path, str):
        raise UsageError("--data_weights mixes several --data_path sources; one source was given")

    model = load_model(model_dir, device=args.device)
    template = get_format(args.template) if args.template else format_of(model.tokenizer)
    max_seq_len = resolve_max_seq_len(args.max_seq_len, model.model.config)
    data = prepare_data(
        data_path,
        model.tokenizer,
        template=template,
        max_seq_len=max_seq_len,
        field_map=parse_field_map(args.field_map),
        group_by=args.group_by,
        num_answers=args.num_answers,
        val_split=args.val_split,
        eval_data_path=args.eval_data_path,
        seed=args.seed,
        cache_dir=args.cache_dir,
        length_policy=args.length_policy,
        skip_bad_records=args.skip_bad_records,
        num_proc=args.num_proc,
        data_weights=args.data_weights,
        dataset_config=args.dataset_config,
        dataset_split=args.dataset_split,
        dataset_revision=args.dataset_revision,
    )
    base = None
    if args.compare:
        specials = {name: getattr(args, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        base = load_model(
            args.compare,
            tokenizer_path=args.tokenizer_path,
            special_tokens=specials,
            device=str(model.model.device),
        )
    settings = EvalSettings(
        batch_size=args.batch_size,
        packing=args.packing,
        num_answers=args.num_answers,
        max_new_tokens=args.max_new_tokens,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
    )
    data_settings = {
        "template": template.name,
        "max_seq_len": max_seq_len,
        "length_policy": args.length_policy,
        "val_split": args.val_split,
        "seed": args.seed if args.val_split else None,
    }
    results = evaluate(
        model,
        data,
        template=template,
        settings=settings,
        base=base,
        command=command_line(args),
        data_settings=data_settings,
    )
    written = write_outputs(results, out_dir, card_folder=None if args.no_model_card else model_dir)
    _print_summary(results)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _check_destinations(args: argparse.Namespace, out_dir: str) -> None:
    """Declare what this command reads and writes to the writer, before anything is loaded (exit 2 if refused).

    The results go into a folder that holds other things (by default the model's own folder; the models are read,
    never replaced): the folder may not be one of the data inputs or hold one, and each of its two files must be
    absent or an earlier evaluation's (`OUTPUT_MARKERS`); this command has no flag to replace anything else.
    """
    from pathlib import Path

    from hf_sft.data import cache_root
    from hf_sft.evaluation import OUTPUT_MARKERS
    from hf_sft.writer import check_cache, check_destination

    given = [*args.data_path, args.eval_data_path, args.tokenizer_path, args.template]
    sources = [Path(path) for path in given if path and Path(path).exists()]
    flag = "--out" if args.out else "MODEL"
    common = {"command": "eval", "sources": sources, "overwrite_flag": None}
    check_destination(out_dir, kind="files", flag=flag, **common)
    for name, marker in OUTPUT_MARKERS.items():
        check_destination(Path(out_dir) / name, kind="file", flag=flag, marker=marker, **common)
    check_cache(cache_root(args.cache_dir), "--cache_dir" if args.cache_dir else "the datasets cache", sources)


def command_line(args: argparse.Namespace) -> str:
    """The command as a user would type it again: MODEL and every flag whose value is not its default."""
    parser = args.eval_parser
    words = ["hf-sft", "eval", args.model_dir]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "debug"):
            continue
        value = getattr(args, action.dest, None)
        if value == parser.get_default(action.dest):
            continue
        if action.nargs == 0:
            words.append(action.option_strings[0])
        elif isinstance(value, list):
            words += [action.option_strings[0], *map(str, value)]
        else:
            words += [action.option_strings[0], str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(words)


def _print_summary(results: dict) -> None:
    roles = ["model", "base"] if results["base"] else ["model"]
    header = f"{'group':<24} {'examples':>8} {'tokens':>8}" + "".join(
        f" {role + ' ' + short:>12}" for role in roles for short in ("loss", "ppl", "acc")
    )
    print(header)
    rows = [("all", results["overall"]), *results["groups"].items()]
    for name, entry in rows:
        line = f"{name[:24]:<24} {entry['model']['examples']:>8} {entry['model']['tokens']:>8}"
        line += "".join(f" {entry[role][m]:>12.4f}" for role in roles for m in ("loss", "perplexity", "accuracy"))
        print(line)


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
