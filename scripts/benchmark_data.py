"""Benchmark data preparation side by side, as `/usr/bin/time` sees it: ours, a plain `datasets` map, and TRL.

    python scripts/benchmark_data.py                                  # 400k records; num_proc 1
    python scripts/benchmark_data.py --sizes 400000 1000000 --stacks ours plain
    python scripts/benchmark_data.py --sizes 3000 --num_procs 1 2     # a smoke run

The shared Dolly sample is repeated to each size (a JSONL file of Dolly records, and the same records as TRL's
prompt/completion pairs). Every stack prepares the records for training with the shared 4k tokenizer, max length
`--max_seq_len` (2048), each run as a fresh process with fresh `datasets` and Hugging Face caches (nothing is a cache
hit):

- `ours`: the command a user runs, `hf-sft data --data_path FILE --tokenizer_path TOK --max_seq_len 2048
  --val_split 0` (validation, the seed format, exact label masking, length policy, the report and its preview);
- `plain`: a process that does `load_dataset("json")` and one batched `map` that formats each record in the seed
  format and tokenises it with the fast tokenizer (`truncation`, no masking, no validation): the floor of doing it by
  hand;
- `trl`: `load_dataset("json")` of the prompt/completion file and TRL's `SFTTrainer` construction, which tokenises
  and masks (`completion_only_loss`, no packing), as `scripts/throughput_stacks.py` drives it.

Measured per stack, size and `num_proc`, of the whole process from start to exit (imports and the tokenizer load
included, for every stack alike): records/s (records ÷ wall seconds), the CPU seconds, and the peak RSS of the process
tree, summed over the process and its worker processes by sampling `/proc` every 50 ms (`ru_maxrss` is the largest
single process, which is what `/usr/bin/time` prints, and misses workers that run beside the main process; the sum
counts the pages a forked worker shares with its parent once per process, so with workers it is an upper bound). Then
the ratios of this one run: ours/plain and ours/TRL (records/s; ours/plain also per CPU second, the figure that holds
when the machine is shared), and num_proc 2 / num_proc 1 per stack. Last comes the markdown table that
`docs/benchmarks.md` shows. The tokenizers library's own threads are off (`TOKENIZERS_PARALLELISM=false`) for every
stack, so `num_proc` is the parallelism.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
SIZES = (400000,)
SAMPLE_S = 0.05
EXAMPLES = re.compile(r"^examples: (\d+) kept", re.MULTILINE)  # the line `hf-sft data` prints, and the children


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared fixtures folder")
    parser.add_argument("--stacks", nargs="+", choices=STACKS, default=list(STACKS), help="stacks to run")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="records per run")
    parser.add_argument("--num_procs", nargs="+", type=int, default=[1], help="num_proc values")
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
        f"Dolly sample repeated, {tokenizer.name}, max_seq_len {args.max_seq_len}; each run a fresh process with "
        "fresh caches (records/s of the whole process; peak RSS of its process tree, and of its largest process)"
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
                        "num_proc": num_proc,
                        "max_seq_len": args.max_seq_len,
                    }
                    result = run_stack(stack, spec, root)
                    result["records_per_s"] = size / result["seconds"]
                    results[stack, size, num_proc] = result
                    print(
                        f"  {stack:<6} {size:>9,} records  num_proc {num_proc}  {result['records_per_s']:>9,.0f} "
                        f"records/s  {result['seconds']:8.1f} s ({result['cpu_s']:.1f} CPU s)  peak RSS "
                        f"{result['tree_mb']:>6,.0f} MB"
                        f" (largest process {result['maxrss_mb']:,.0f} MB)  {result['examples']:,} examples",
                        flush=True,
                    )
            for path in files.values():
                path.unlink()
        print_ratios(results, args)
        print()
        print("\n".join(table(results, args)))
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


def run_stack(stack: str, spec: dict, root: Path) -> dict:
    """One stack as a fresh process with fresh caches: wall seconds, peak RSS of its tree, examples kept."""
    cache = root / f"cache-{stack}"
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache / "datasets"), "HF_HOME": str(cache / "hf_home")}
    if stack == "ours":
        command = [sys.executable, "-m", "hf_sft.cli", "data", "--data_path", spec["data"], "--tokenizer_path"]
        command += [spec["tokenizer"], "--max_seq_len", str(spec["max_seq_len"]), "--val_split", "0"]
        command += ["--num_proc", str(spec["num_proc"])]
    else:
        spec_path = root / "spec.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, str(Path(__file__).resolve()), "--child", stack, str(spec_path)]
    out, err = root / "stdout.txt", root / "stderr.txt"
    try:
        with out.open("w") as stdout, err.open("w") as stderr:
            seconds, cpu_seconds, tree_mb, maxrss_mb = measured(command, env, stdout, stderr)
        found = EXAMPLES.search(out.read_text())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    examples = int(found[1]) if found else 0
    return {"seconds": seconds, "cpu_s": cpu_seconds, "tree_mb": tree_mb, "maxrss_mb": maxrss_mb, "examples": examples}


def measured(command: list[str], env: dict, stdout, stderr) -> tuple[float, float, float, float]:
    """Run `command` to its end: wall and CPU seconds, the peak of its tree's summed RSS, its `ru_maxrss` (both MB).

    `ru_maxrss` from `wait4` is what `/usr/bin/time` prints: the largest single process of the tree. The CPU seconds
    (user + system, workers included) do not grow when other work shares the machine, as wall seconds do.
    """
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
    peak = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, tree_rss_kb(process.pid))
        time.sleep(SAMPLE_S)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if process.returncode:
        stderr.flush()
        tail = Path(stderr.name).read_text()[-2000:]
        raise SystemExit(f"{' '.join(command)} failed with exit status {process.returncode}:\n{tail}")
    cpu_seconds = usage.ru_utime + usage.ru_stime
    return seconds, cpu_seconds, max(peak, usage.ru_maxrss) / 1024, usage.ru_maxrss / 1024


def tree_rss_kb(pid: int) -> int:
    """Resident memory of `pid` and all its descendants, in kB (0 for processes that are gone)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


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
            if ours and ("plain", size, num_proc) in results:
                plain = results["plain", size, num_proc]
                parts.append(f"ours/plain per CPU second {plain['cpu_s'] / ours['cpu_s']:.2f}x")
                parts.append(f"ours - plain peak RSS {ours['tree_mb'] - plain['tree_mb']:+,.0f} MB")
            if parts:
                print(f"  {size:>9,} records, num_proc {num_proc}: " + ", ".join(parts))
        for stack in args.stacks:
            one, two = results.get((stack, size, 1)), results.get((stack, size, 2))
            if one and two:
                ratio = two["records_per_s"] / one["records_per_s"]
                print(f"  {size:>9,} records, {stack}: num_proc 2 / num_proc 1 {ratio:.2f}x")


def table(results: dict, args: argparse.Namespace) -> list[str]:
    """The markdown table of `docs/benchmarks.md`: one row per size and num_proc."""
    stacks = [stack for stack in STACKS if stack in args.stacks]
    head = ["records", "num_proc", *(f"{stack} records/s" for stack in stacks)]
    head += [f"{stack} peak RSS" for stack in stacks] + ["ours / plain", "ours / plain per CPU s", "ours - plain RSS"]
    rows = [f"| {' | '.join(head)} |", "|" + "---:|" * len(head)]
    for size in args.sizes:
        for num_proc in args.num_procs:
            got = {stack: results.get((stack, size, num_proc)) for stack in stacks}
            cells = [f"{size:,}", str(num_proc)]
            cells += [f"{got[s]['records_per_s']:,.0f}" if got[s] else "" for s in stacks]
            cells += [f"{got[s]['tree_mb']:,.0f} MB" if got[s] else "" for s in stacks]
            ours, plain = got.get("ours"), got.get("plain")
            both = ours and plain
            cells.append(f"{ours['records_per_s'] / plain['records_per_s']:.2f}x" if both else "")
            cells.append(f"{plain['cpu_s'] / ours['cpu_s']:.2f}x" if both else "")
            cells.append(f"{ours['tree_mb'] - plain['tree_mb']:+,.0f} MB" if both else "")
            rows.append(f"| {' | '.join(cells)} |")
    return rows


def child(stack: str, spec_path: str) -> int:
    """One stack other than ours, its whole preparation; prints `examples: N kept` as `hf-sft data` does."""
    import datasets

    from hf_sft.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    spec = json.loads(Path(spec_path).read_text())
    tokenizer = load_tokenizer(spec["tokenizer"])
    prepare = {"plain": setup_plain, "trl": setup_trl}[stack](spec, tokenizer)
    print(f"examples: {prepare()} kept")
    return 0


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
        loaded = datasets.load_dataset("json", data_files=spec["data"], split="train")
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
        output_dir=str(Path(os.environ["HF_HOME"]) / "trl_out"),
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
        loaded = datasets.load_dataset("json", data_files=spec["data"], split="train")
        trainer = SFTTrainer(model=model, args=args, train_dataset=loaded, processing_class=tokenizer)
        return len(trainer.train_dataset)

    return prepare


if __name__ == "__main__":
    sys.exit(main())
