"""Training throughput on Dolly: `hf-sft train` against a hand-written PyTorch loop and TRL's SFTTrainer.

The three stacks train the same model (saved once, loaded by each) on the same records in the same order (the file
is shuffled once here, then read sequentially by all), with the same examples per optimizer step, maximum length,
precision, optimizer settings and number of optimizer steps:

  (a) `hf-sft train` as users run it: our defaults (batch 2 x accumulation 8, ...), only data, model, steps and
      `--val_split 0` given (and `--dtype bfloat16` for bf16);
  (b) a loop in the style of the seed `finetune_gpt.py`: format, tokenize, right-pad each micro-batch, mask the
      prompt, model logits -> cross-entropy, AdamW, clipping, cosine schedule;
  (c) `trl.SFTTrainer` on {"prompt", "completion"} records (completion-only loss), no packing.

Each run is a fresh process; runs alternate a b c a b c ... and the medians are reported. Timing starts after the
warm-up steps. Per stack: real (non-pad) tokens/s, supervised tokens/s, padding fraction (pad / all positions
computed), peak RSS, loss of the last optimizer step (summed token losses / supervised tokens), and model-FLOPs
utilisation = 6 x parameters x real tokens/s / the matmul peak measured first in this process.

    python scripts/benchmark_throughput.py --quick            # nanoGPT-style, fp32, < 10 min on 2 CPU cores
    python scripts/benchmark_throughput.py                    # both models, fp32 and bf16, more steps
    python scripts/benchmark_throughput.py --tiny             # seconds: a smoke test of the machinery

The last line reads `ratio_vs_loop=X ratio_vs_trl=Y mfu=Z pad_frac=W` for the first model and precision.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput_stacks import SEED, prompt_text, run_worker

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DOLLY = SHARED / "dolly" / "dolly_sample.jsonl"
TOKENIZER = SHARED / "tokenizers" / "dolly_bpe_4k.json"
STACKS = {"a": "hf-sft train", "b": "hand-written loop", "c": "TRL SFTTrainer"}

MODELS = {
    # About 21M parameters (19M in the blocks): the size the MFU target refers to.
    "nanogpt": {"family": "nanogpt", "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8},
    # About 17M parameters, untied head, grouped-query attention.
    "llama": {
        "family": "llama",
        "hidden_size": 384,
        "num_hidden_layers": 8,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "multiple_of": 32,
    },
    "tiny": {"family": "nanogpt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
}


def measure_matmul_peak(dtype_name: str, seconds: float = 2.0) -> float:
    """Best GFLOP/s of square matmuls (1024 and 2048) in this process, on all the cores torch uses."""
    import torch

    dtype, best = getattr(torch, dtype_name), 0.0
    for size in (1024, 2048):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


# ----------------------------------------------------------------------------------------------------------------
# Preparation: data files, the model folder


def prepare(work: Path, model_name: str, max_len: int, num_records: int, num_eval: int) -> dict:
    """Write the training/eval records (both layouts) and the initial model; returns the run spec."""
    import torch

    from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
    from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
    from hf_sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    records = [json.loads(line) for line in DOLLY.read_text(encoding="utf-8").splitlines() if line.strip()]
    # Keep records that every stack fits whole (a small margin covers tokenisation differences at the boundary).
    fits = [r for r in records if len(tokenizer(prompt_text(r) + " " + r["response"]).input_ids) + 8 <= max_len]
    rng = random.Random(SEED)
    eval_records = rng.sample(fits, min(num_eval, len(fits) // 4))
    pool, train = [r for r in fits if r not in eval_records], []
    while len(train) < num_records:
        block = list(pool)
        rng.shuffle(block)
        train += block
    train = train[:num_records]
    work.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", eval_records)):
        with (work / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for r in rows:
                handle.write(json.dumps({k: r[k] for k in ("instruction", "context", "response")}) + "\n")
    torch.manual_seed(SEED)
    config = HfSftGPTConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODELS[model_name],
    )
    model = HfSftGPTForCausalLM(config)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    return {"parameters": sum(p.numel() for p in model.parameters()), "records": len(train), "max_len": max_len}


# ----------------------------------------------------------------------------------------------------------------
# Workers: one stack, one process


# ----------------------------------------------------------------------------------------------------------------
# The driver


def run_stack(stack: str, spec: dict, work: Path, index: int) -> dict:
    spec = dict(spec, out_dir=str(work / f"out_{stack}_{index}"), result=str(work / f"result_{stack}_{index}.json"))
    spec_path = work / f"spec_{stack}_{index}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", stack, str(spec_path)], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"stack {stack} failed (exit {proc.returncode})")
    return json.loads(Path(spec["result"]).read_text())


def median_results(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def benchmark(model_name: str, dtype: str, options: argparse.Namespace, work: Path) -> dict:
    info = prepare(work / f"{model_name}", model_name, options.max_len, options.records, options.eval_records)
    base = work / model_name
    spec = {
        "model_dir": str(base / "model"),
        "train": str(base / "train.jsonl"),
        "eval": str(base / "eval.jsonl"),
        "max_len": options.max_len,
        "steps": options.warmup + options.steps,
        "warmup": options.warmup,
        "dtype": dtype,
        "extra_args": options.hf_sft_args.split(),
    }
    runs: dict[str, list[dict]] = {stack: [] for stack in options.stacks}
    for repeat in range(options.repeats):
        for stack in options.stacks:
            result = run_stack(stack, spec, base, f"{dtype}_{repeat}")
            runs[stack].append(result)
            print(f"  [{model_name} {dtype} #{repeat + 1}] {stack}: {result['real_tok_s']:.0f} real tok/s", flush=True)
    return {"info": info, "medians": {stack: median_results(r) for stack, r in runs.items()}}


def report(model_name: str, dtype: str, outcome: dict, peak: float) -> dict:
    params = outcome["info"]["parameters"]
    medians = outcome["medians"]
    print(f"\n{model_name}-style, {params / 1e6:.1f}M parameters, {dtype}, matmul peak {peak:.0f} GFLOP/s")
    header = f"{'stack':<20}{'real tok/s':>11}{'sup tok/s':>11}{'pad frac':>10}{'peak RSS MB':>13}"
    print(header + f"{'final loss':>12}{'MFU':>8}{'eval loss':>11}")
    for stack, m in medians.items():
        mfu = 6 * params * m["real_tok_s"] / (peak * 1e9)
        m["mfu"] = mfu
        line = f"{STACKS[stack]:<20}{m['real_tok_s']:>11.0f}{m['sup_tok_s']:>11.0f}{m['pad_frac']:>10.3f}"
        line += f"{m['peak_rss_mb']:>13.0f}{m['final_loss']:>12.4f}{mfu:>8.1%}"
        print(line + (f"{m['eval_loss']:>11.4f}" if "eval_loss" in m else ""))
    ratios = {}
    if "a" in medians:
        for other, name in (("b", "ratio_vs_loop"), ("c", "ratio_vs_trl")):
            if other in medians:
                ratios[name] = medians["a"]["real_tok_s"] / medians[other]["real_tok_s"]
                loss_gap = abs(medians["a"]["final_loss"] / medians[other]["final_loss"] - 1)
                print(f"(a)/({other}) real tokens/s: {ratios[name]:.2f}x; final losses differ by {loss_gap:.2%}")
    return {"params": params, "peak": peak, "medians": medians, **ratios}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="nanoGPT-style, fp32, 3 repeats of 1+5 steps.")
    parser.add_argument("--tiny", action="store_true", help="Tiny model, 1 repeat of 1+1 steps: checks the machinery.")
    parser.add_argument("--models", default="nanogpt,llama", help="Comma-separated: nanogpt, llama, tiny.")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="Comma-separated: float32, bfloat16.")
    parser.add_argument("--stacks", default="abc", help="Which stacks: a (hf-sft), b (loop), c (TRL).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="Optimizer steps before the clock starts.")
    parser.add_argument("--steps", type=int, default=20, help="Timed optimizer steps.")
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--records", type=int, default=1500)
    parser.add_argument("--eval_records", type=int, default=32)
    parser.add_argument(
        "--hf_sft_args", default="", help="Extra flags for (a), given with '=': --hf_sft_args='--packing false'."
    )
    parser.add_argument("--work_dir", default=None, help="Keep data, models and logs here (default: a temp dir).")
    parser.add_argument("--json", default=None, help="Also write all figures to this JSON file.")
    parser.add_argument("--worker", nargs=2, metavar=("STACK", "SPEC"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.quick:
        options.models, options.dtypes, options.repeats, options.warmup, options.steps = "nanogpt", "float32", 3, 1, 5
    if options.tiny:
        options.models, options.dtypes, options.repeats, options.warmup, options.steps = "tiny", "float32", 1, 1, 1
        options.records, options.max_len, options.eval_records = 64, 256, 8
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.worker:
        run_worker(*options.worker)
        return 0
    if not DOLLY.is_file():
        raise SystemExit(f"needs the shared Dolly sample at {DOLLY}")
    options.stacks = list(options.stacks)
    with tempfile.TemporaryDirectory(prefix="hf_sft_bench_") as tmp:
        work = Path(options.work_dir or tmp)
        dtypes = options.dtypes.split(",")
        peaks = {dtype: measure_matmul_peak(dtype) for dtype in dtypes}
        print("matmul peak: " + ", ".join(f"{d} {p:.0f} GFLOP/s" for d, p in peaks.items()), flush=True)
        summary = {}
        for model_name in options.models.split(","):
            for dtype in dtypes:
                outcome = benchmark(model_name, dtype, options, work)
                summary[f"{model_name}/{dtype}"] = report(model_name, dtype, outcome, peaks[dtype])
    for model_name in options.models.split(","):
        fp32, bf16 = summary.get(f"{model_name}/float32"), summary.get(f"{model_name}/bfloat16")
        if fp32 and bf16 and "a" in fp32["medians"] and "a" in bf16["medians"]:
            speed = bf16["medians"]["a"]["real_tok_s"] / fp32["medians"]["a"]["real_tok_s"]
            gap = bf16["medians"]["a"]["eval_loss"] / fp32["medians"]["a"]["eval_loss"] - 1
            print(f"{model_name}: (a) bf16/fp32 real tokens/s {speed:.2f}x; eval loss bf16 vs fp32 {gap:+.2%}")
    if options.json:
        Path(options.json).write_text(json.dumps(summary, indent=1))
    first = next(iter(summary.values()))
    a = first["medians"].get("a", {})
    print(
        f"ratio_vs_loop={first.get('ratio_vs_loop', float('nan')):.2f} "
        f"ratio_vs_trl={first.get('ratio_vs_trl', float('nan')):.2f} "
        f"mfu={a.get('mfu', float('nan')):.3f} pad_frac={a.get('pad_frac', float('nan')):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
