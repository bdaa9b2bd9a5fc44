"""Validate and tokenise an instruction dataset exactly as training will, and show what the model will learn.

Takes the model and data flags of `hf-sft train` (the same `ModelArguments` and `DataArguments`), so the same flags
give the same examples, and the same maximum length when a model is named: `--max_seq_len`, else the model's
positions (`--pretrained_ckpt_path`, or the new model that `--block_size` describes). With no model named, no model
limit applies: `--max_seq_len` is taken as given, and without it no example is too long. Prints the kept and dropped
counts (with reasons), token-length percentiles, the padding waste at a batch size with and without packing, and one
example with its supervised tokens marked ([[...]], or green on a terminal).

Examples:
  hf-sft data --data_path data/dolly.jsonl --pretrained_ckpt_path models/base
  hf-sft data --data_path dolly.jsonl --tokenizer_path tok.json --max_seq_len 256 --dump tokens.jsonl
  hf-sft data --data_path chat.jsonl --tokenizer_path simple_llama_bpe_8k.json \\
      --bos_token '<SOS>' --eos_token '<EOS>' --pad_token '<PAD>' --unk_token '<UNK>'

`--save_to DIR` writes the tokenised, masked splits and a manifest of how they were made (tokenizer, format, length
limit and policy, split, sources, counts): `hf-sft train --data_path DIR` then trains on them without tokenising again,
and refuses them, naming the difference, if its own tokenizer, format or length settings differ.

`--dump FILE.jsonl` writes one line per kept example: {"index": position of the record in the input (0-based),
"input_ids": [...], "labels": [...]} with labels unshifted and -100 where not supervised.

Destinations (checked before anything is read): --save_to and --dump may not be an input (the data, the tokenizer,
the model, a template file), lie inside one or hold one, whatever the flags. This command's own earlier output is
replaced without --overwrite: a --save_to folder by its record, a --dump file by its first bytes (`{"index":`);
anything else needs --overwrite, and a training run's folder is never a --save_to folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

HELP = "validate and tokenise a dataset; show counts, lengths, padding waste and a masked preview"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_sft.data import DataArguments
    from hf_sft.training.arguments import ModelArguments, add_dataclass_arguments

    add_dataclass_arguments(parser, DataArguments)
    add_dataclass_arguments(parser, ModelArguments)
    report = parser.add_argument_group("report")
    report.add_argument("--batch_size", type=int, default=8, help="batch size for the padding-waste figures")
    report.add_argument(
        "--dump", default=None, metavar="FILE.jsonl", help="write index, input_ids, labels per example"
    )
    report.add_argument("--preview_index", type=int, default=None, help="record index to preview (default: first)")
    report.add_argument("--seed", type=int, default=None, help="seed of the held-out split (default: training's)")
    report.add_argument("--cache_dir", default=None, help="datasets cache folder")
    report.add_argument(
        "--save_to", default=None, metavar="DIR", help="write the tokenised splits for `hf-sft train --data_path DIR`"
    )
    report.add_argument(
        "--overwrite", action="store_true", help="let --save_to or --dump replace what this command did not write"
    )
    # Unset unless given: a data check names a new model only by giving its --block_size.
    parser.set_defaults(block_size=None)


def _check_destinations(args: argparse.Namespace, model_args, data_args) -> None:
    """Declare what this command reads and writes to the writer, before anything is loaded (exit 2 if refused)."""
    from hf_sft.data.saved import SAVE_COMMAND
    from hf_sft.data.summary import DUMP_COMMAND, DUMP_MARKER
    from hf_sft.data.text_records import cache_root
    from hf_sft.writer import check_cache, check_destination

    sources = [*data_args.input_paths(), *model_args.input_paths()]
    for dest, kind, command, flag, marker in (
        (args.save_to, "folder", SAVE_COMMAND, "--save_to", None),
        (args.dump, "file", DUMP_COMMAND, "--dump", DUMP_MARKER),
    ):
        if dest:
            check_destination(
                dest, kind=kind, command=command, sources=sources, overwrite=args.overwrite, flag=flag, marker=marker
            )
    check_cache(cache_root(args.cache_dir), "--cache_dir" if args.cache_dir else "the datasets cache", sources)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from hf_sft.data import DataArguments, build_run_datasets, get_format, resolve_max_seq_len
    from hf_sft.data.splits import plural
    from hf_sft.data.summary import render_preview, summary_lines, write_dump
    from hf_sft.errors import UsageError
    from hf_sft.training.arguments import ModelArguments, SFTTrainingArguments, from_namespace
    from hf_sft.training.model_and_data import base_config, load_run_tokenizer

    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    model_named = args.pretrained_ckpt_path is not None or args.block_size is not None
    if args.block_size is None:
        args.block_size = ModelArguments.block_size
    model_args = from_namespace(ModelArguments, args)
    # The report covers the whole source: --streaming changes how training reads it, not what it holds.
    data_args = dataclasses.replace(from_namespace(DataArguments, args), streaming=False)
    if not data_args.data_path:
        raise UsageError("--data_path is required")
    _check_destinations(args, model_args, data_args)
    template = get_format(data_args.template)
    tokenizer = load_run_tokenizer(model_args, data_args)
    config = base_config(model_args, tokenizer) if model_named else None
    max_seq_len = resolve_max_seq_len(data_args.max_seq_len, config)
    seed = args.seed if args.seed is not None else SFTTrainingArguments.seed
    data = build_run_datasets(
        data_args, tokenizer, template, max_seq_len=max_seq_len, seed=seed, cache_dir=args.cache_dir
    )
    split = data.train
    print(f"data: {split.source} (format {template.name})")
    specials = ", ".join(
        f"{name} {getattr(tokenizer, name)!r}={getattr(tokenizer, name + '_id')}"
        for name in ("bos_token", "eos_token", "pad_token")
    )
    print(
        f"tokenizer: {model_args.tokenizer_path or model_args.pretrained_ckpt_path or 'trained on the data'} "
        f"(vocabulary {len(tokenizer)}; {specials})"
    )
    if config is None:
        given = f"--max_seq_len {max_seq_len} as given" if max_seq_len else "no length limit"
        print(f"length limit: {given} (no model named: no model limit applied)")
    n_skipped = sum(split.skipped.values())
    if n_skipped:
        print(f"skipped {plural(n_skipped, 'bad record')}:")
        print("\n".join(f"  {message}" for message in split.skipped_messages))
    for line in summary_lines(split, max_seq_len, data_args.length_policy, args.batch_size):
        print(line)
    # The lines training logs for the same flags.
    print("\n".join(data.describe()))

    row = 0
    if args.preview_index is not None:
        if args.preview_index not in split.index:
            raise UsageError(f"--preview_index {args.preview_index} is not a kept example")
        row = int(np.flatnonzero(split.index == args.preview_index)[0])
    example = split.dataset[row]
    color = sys.stdout.isatty()
    legend = "supervised tokens in green" if color else "supervised tokens between [[ and ]]"
    print(f"\npreview of record {split.index[row]} ({legend}):")
    for line in render_preview(tokenizer, example["input_ids"], example["labels"], color=color):
        print(line)
    if args.dump:
        written = write_dump(args.dump, *(part for part in (split, data.eval) if part))
        print(f"\nwrote {plural(written, 'example')} to {args.dump}")
    if args.save_to:
        from hf_sft.data.saved import run_settings, save_tokenized, source_fingerprints

        val_split = 0.0 if data_args.eval_data_path else data_args.val_split
        settings = run_settings(
            tokenizer, template, data_args, max_seq_len=max_seq_len, val_split=val_split, seed=seed
        )
        sources = source_fingerprints(*data_args.data_paths(), data_args.eval_data_path)
        written = save_tokenized(data, args.save_to, settings, sources)
        print(f"\nsaved {plural(written, 'tokenised example')} to {args.save_to}")
        print(f"train on them with: hf-sft train --data_path {args.save_to} (and this tokenizer and these flags)")
    return 0
