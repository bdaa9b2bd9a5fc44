"""Benchmark data preparation side by side: ours, a plain `datasets` map, and TRL's SFTTrainer preparation.

    python scripts/benchmark_data.py                                  # 15k, 400k, 1M records; num_proc 1 and 2
    python scripts/benchmark_data.py --sizes 3000 --num_procs 1       # a smoke run
    python scripts/benchmark_data.py --stacks ours plain --sizes 400000 --num_procs 1 2

The shared Dolly sample is repeated to each size (a JSONL file of Dolly records, and the same records as TRL's
prompt/completion pairs). Every stack prepares the records for training with the shared 4k tokenizer, max length
`--max_seq_len` (2048), each run in a fresh process with a fresh `datasets` cache (nothing is a cache hit):

- `ours`: `hf_sft.data.build_datasets` end to end (validation, the seed format, exact label masking, length policy,
  counts), as `hf-sft train` calls it;
- `plain`: `load_dataset("json")` and one batched `map` that formats each record in the seed format and tokenises it
  with the fast tokenizer (`truncation`, no masking, no validation): the floor of doing it by hand;
- `trl`: `load_dataset("json")` of the prompt/completion file and TRL's `SFTTrainer` construction, which tokenises
  and masks (`completion_only_loss`, no packing), as `scripts/throughput_stacks.py` drives it.

Printed per stack, size and `num_proc`: records/s (records ÷ wall seconds of the preparation; imports, the
tokenizer load and TRL's model excluded), the peak RSS of the process (`ru_maxrss`) and of its worker processes,
then the ratios of this one run: ours/plain, ours/TRL, and num_proc 2 / num_proc 1 per stack. The tokenizers
library's own threads are off (`TOKENIZERS_PARALLELISM=false`) for every stack, so `num_proc` is the parallelism.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STACKS = ("ours", "plain", "trl")
SIZES = (15000, 400000, 1000000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared fixtures folder")
    parser.add_argument("--stacks", nargs="+", choices=STACKS, default=list(STACKS), help="stacks to run")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="records per run")
    parser.add_argument("--num_procs", nargs="+", type=int, default=[1, 2], help="num_proc values")
    parser.add_argument("--max_seq_len", type=int, default=2048, help="length limit")
    parser.add_argument("--workdir", type=Path, default=None, help="where the files and caches go (default: tmp)")
    parser.add_argument("--child", nargs=2, metavar=("STACK", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)

    sample = args.shared / "data" / "dolly" / "dolly_sample.jsonl"
    tokenizer = args.shared / "data" / "tokenizers" / "dolly_bpe_4k.json"
    if not sample.is_file() or not tokenizer.is_file():
        print(f"{sample} or {tokenizer} not found; pass --shared", file=sys.stderr)
        return 2
    lines = sample.read_text(encoding="utf-8").splitlines()
    root = Path(tempfile.mkdtemp(prefix="benchmark_data-", dir=args.workdir))
    print(
        f"Dolly sample repeated, {tokenizer.name}, max_seq_len {args.max_seq_len}; each run in a fresh process and "
        f"datasets cache (records/s; peak RSS of the process, and of its workers)"
    )
    results: dict[tuple[str, int, int], dict] = {}
    try:
        for size in args.sizes:
            files = write_inputs(root, lines, size)
            for num_proc in args.num_procs:
                for stack in args.stacks:
                    spec = {
                        "data": str(files["trl" if stack == "trl" else "dolly"]),
                        "tokenizer": str(tokenizer),
                        "records": size,
                        "num_proc": num_proc,
                        "max_seq_len": args.max_seq_len,
                        "cache": str(root / f"cache-{stack}-{size}-{num_proc}"),
                        "result": str(root / "result.json"),
                    }
                    result = run_child(stack, spec, root)
                    results[stack, size, num_proc] = result
                    print(
                        f"  {stack:<6} {size:>9,} records  num_proc {num_proc}  {result['records_per_s']:>9,.0f} "
                        f"records/s  {result['seconds']:8.1f} s  peak RSS {result['rss_mb']:>6,.0f} MB"
                        f" (workers {result['workers_rss_mb']:,.0f} MB)  {result['examples']:,} examples",
                        flush=True,
                    )
            for path in files.values():
                path.unlink()
        print_ratios(results, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def write_inputs(root: Path, lines: list[str], size: int) -> dict[str, Path]:
    """The repeated Dolly JSONL and its prompt/completion twin (the package's seed prompt, as TRL records)."""
    from hf_sft.data import DEFAULT_FORMAT

    dolly, trl = root / f"dolly-{size}.jsonl", root / f"trl-{size}.jsonl"
    records = [json.loads(line) for line in lines]
    pairs = [
        json.dumps(
            {
                "prompt": DEFAULT_FORMAT.prompt_text(r["instruction"], r.get("context") or "", bos_token="[BOS]"),
                "completion": DEFAULT_FORMAT.response_text(r["response"]),
            }
        )
        for r in records
    ]
    with dolly.open("w", encoding="utf-8") as a, trl.open("w", encoding="utf-8") as b:
        for i in range(size):
            a.write(lines[i % len(lines)] + "\n")
            b.write(pairs[i % len(pairs)] + "\n")
    return {"dolly": dolly, "trl": trl}


def run_child(stack: str, spec: dict, root: Path) -> dict:
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_DATASETS_CACHE": spec["cache"], "HF_HOME": str(root / "hf_home")}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", stack, str(spec_path)]
    subprocess.run(command, check=True, env=env)
    result = json.loads(Path(spec["result"]).read_text())
    shutil.rmtree(spec["cache"], ignore_errors=True)
    return result


def print_ratios(results: dict, args: argparse.Namespace) -> None:
    print("ratios (records/s, this run):")
    for size in args.sizes:
        for num_proc in args.num_procs:
            ours = results.get(("ours", size, num_proc))
            parts = [
                f"ours/{other} {ours['records_per_s'] / results[other, size, num_proc]['records_per_s']:.2f}x"
                for other in ("plain", "trl")
                if ours and (other, size, num_proc) in results
            ]
            if parts:
                print(f"  {size:>9,} records, num_proc {num_proc}: " + ", ".join(parts))
        for stack in args.stacks:
            one, two = results.get((stack, size, 1)), results.get((stack, size, 2))
            if one and two:
                ratio = two["records_per_s"] / one["records_per_s"]
                print(f"  {size:>9,} records, {stack}: num_proc 2 / num_proc 1 {ratio:.2f}x")


def child(stack: str, spec_path: str) -> int:
    """One stack, one size: the imports, the tokenizer and (for TRL) the model before the clock starts."""
    import datasets

    from hf_sft.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    spec = json.loads(Path(spec_path).read_text())
    tokenizer = load_tokenizer(spec["tokenizer"])
    prepare = {"ours": setup_ours, "plain": setup_plain, "trl": setup_trl}[stack](spec, tokenizer)
    start = time.perf_counter()
    examples = prepare()
    seconds = time.perf_counter() - start
    result = {
        "records_per_s": spec["records"] / seconds,
        "seconds": seconds,
        "examples": examples,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def setup_ours(spec: dict, tokenizer):
    from hf_sft.data import build_datasets

    def prepare() -> int:
        data = build_datasets(
            spec["data"],
            tokenizer,
            max_seq_len=spec["max_seq_len"],
            val_split=0.0,
            num_proc=spec["num_proc"],
            cache_dir=spec["cache"],
        )
        return len(data.train.dataset)

    return prepare


def setup_plain(spec: dict, tokenizer):
    import datasets

    from hf_sft.data import DEFAULT_FORMAT

    bos, eos, limit = tokenizer.bos_token, tokenizer.eos_token, spec["max_seq_len"]
    num_proc = spec["num_proc"] if spec["num_proc"] > 1 else None

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [
            DEFAULT_FORMAT.prompt_text(instruction, context or "", bos_token=bos) + DEFAULT_FORMAT.response_text(out)
            for instruction, context, out in zip(
                batch["instruction"], batch["context"], batch["response"], strict=True
            )
        ]
        return tokenizer([text + eos for text in texts], truncation=True, max_length=limit)

    def prepare() -> int:
        loaded = datasets.load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["cache"])
        return len(loaded.map(tokenize, batched=True, remove_columns=loaded.column_names, num_proc=num_proc))

    return prepare


def setup_trl(spec: dict, tokenizer):
    import datasets
    from transformers.utils import logging as transformers_logging
    from trl import SFTConfig, SFTTrainer

    from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM

    transformers_logging.set_verbosity_error()
    config = HfSftGPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=spec["max_seq_len"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = HfSftGPTForCausalLM(config)
    args = SFTConfig(
        output_dir=str(Path(spec["cache"]) / "trl_out"),
        max_length=spec["max_seq_len"],
        completion_only_loss=True,
        packing=False,
        dataset_num_proc=spec["num_proc"] if spec["num_proc"] > 1 else None,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )

    def prepare() -> int:
        loaded = datasets.load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["cache"])
        trainer = SFTTrainer(model=model, args=args, train_dataset=loaded, processing_class=tokenizer)
        return len(trainer.train_dataset)

    return prepare


if __name__ == "__main__":
    sys.exit(main())
