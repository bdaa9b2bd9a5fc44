"""Benchmark the data pipeline: records/s of both record paths, and padding waste, on Dolly-shaped records.

    python scripts/benchmark_data.py
    python scripts/benchmark_data.py --shared ../shared --records 15000 --template alpaca

The Dolly sample repeated to `--records` records goes through the pipeline twice, each time in a fresh `datasets`
cache (nothing is a cache hit), with the package's default prompt format and length policy unless given:

- JSONL round trip: a local `.jsonl` file, read line by line, validated in Python, its valid records written to a
  normalised JSONL copy and loaded back (what a Hub dataset id also went through before it stayed in Arrow);
- Arrow: the same records as a `datasets` object saved with `save_to_disk` (what a Hub download is), validated with
  `Dataset.map`/`filter` and never leaving Arrow.

"records" times validation and loading, "tokenise" the batched masking map, "end to end" both; each path runs
`--repeats` times in alternating order and its fastest run counts. Ratios are of this one run. Padding: the share
of batch positions that are padding at `--batch_size`, for dynamic padding (shuffled, and grouped by length as
`train_sampling_strategy="group_by_length"` does) and for padding-free packing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main(argv: list[str] | None = None) -> int:
    from hf_sft.training.arguments import DataArguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared fixtures folder")
    parser.add_argument("--records", type=int, default=15000, help="records for the throughput test")
    parser.add_argument("--batch_size", type=int, default=8, help="batch size for the padding figures")
    parser.add_argument("--max_seq_len", type=int, default=2048, help="length limit")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path (the best counts)")
    parser.add_argument("--template", default=DataArguments.template, help="prompt format (as --template)")
    parser.add_argument("--length_policy", default=DataArguments.length_policy, help="as --length_policy")
    args = parser.parse_args(argv)

    import datasets

    from hf_sft.data import Encoder, build_datasets, get_format, load_records, tokenize_records
    from hf_sft.data.report import padding_report
    from hf_sft.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    sample = args.shared / "data" / "dolly" / "dolly_sample.jsonl"
    tokenizer_path = args.shared / "data" / "tokenizers" / "dolly_bpe_4k.json"
    if not sample.is_file():
        print(f"{sample} not found; pass --shared", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(tokenizer_path)
    template = get_format(args.template)
    lines = sample.read_text(encoding="utf-8").splitlines()
    options = {"template": template, "max_seq_len": args.max_seq_len, "length_policy": args.length_policy}

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "dolly_repeated.jsonl"
        big.write_text("\n".join(lines[i % len(lines)] for i in range(args.records)) + "\n", encoding="utf-8")
        in_memory = datasets.Dataset.from_list([json.loads(line) for line in big.read_text().splitlines()])
        print(
            f"{args.records} Dolly-shaped records, format {template.name}, {tokenizer_path.name}, "
            f"max_seq_len {args.max_seq_len}, num_proc 1 (records/s):"
        )
        rates: dict[str, list[tuple[float, float, float]]] = {}
        # Alternating order, best run per path: on a shared machine no two runs are alike.
        order = [("JSONL round trip", "Arrow"), ("Arrow", "JSONL round trip")] * args.repeats
        for attempt, name in enumerate(name for pair in order[: args.repeats] for name in pair):
            cache = Path(tmp) / f"cache-{attempt}"
            source = big
            if name == "Arrow":  # a fresh copy: datasets caches maps beside the Arrow files of a saved dataset
                source = Path(tmp) / f"saved-{attempt}"
                in_memory.save_to_disk(source)
            start = time.perf_counter()
            records = load_records(source, cache_dir=cache)
            loaded = time.perf_counter()
            split = tokenize_records(records.dataset, Encoder.from_tokenizer(tokenizer), **options)
            done = time.perf_counter()
            assert len(split.index) + sum(split.dropped.values()) == args.records
            n = args.records
            rates.setdefault(name, []).append((n / (done - start), n / (loaded - start), n / (done - loaded)))
        for name, runs in rates.items():
            end_to_end, load_rate, tokenise_rate = max(runs)
            print(
                f"  {name:<17} records {load_rate:8.0f} | tokenise {tokenise_rate:8.0f} | end to end {end_to_end:8.0f}"
            )
        ratio = max(rates["Arrow"])[0] / max(rates["JSONL round trip"])[0]
        print(f"  Arrow / JSONL round trip, end to end: {ratio:.2f}x (best of {args.repeats} runs each, alternating)")
        again = time.perf_counter()
        build_datasets(next(Path(tmp).glob("saved-*")), tokenizer, cache_dir=Path(tmp) / "cache-1", **options)
        print(f"  rerun of the Arrow path from the datasets cache: {time.perf_counter() - again:.2f} s")

        data = build_datasets(sample, tokenizer, cache_dir=Path(tmp) / "sample", **options)
    lengths = data.train.lengths
    print(f"\npadding at batch size {args.batch_size}, Dolly sample ({len(lengths)} examples, {sum(lengths)} tokens):")
    for name, fraction in padding_report(lengths, args.batch_size):
        print(f"  {name:<42} {fraction:6.1%} padding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
