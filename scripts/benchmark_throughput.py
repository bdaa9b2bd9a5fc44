"""Training throughput on Dolly: `hf-sft train`, eager and compiled, against a hand-written loop and TRL's SFTTrainer.

The stacks train the same model (saved once, loaded by each) on the same records in the same order (the file
is shuffled once here, then read sequentially by all), with the same examples per optimizer step, maximum length,
precision, optimizer settings and number of optimizer steps:

  (a) `hf-sft train` as users run it: our defaults (packing, token-budget micro-batches, ...), only data, model,
      steps and `--val_split 0` given (plus `--dtype bfloat16`, and the batch flags off the default point);
  (b) a loop in the style of the seed `finetune_gpt.py`: format, tokenize, right-pad each micro-batch, mask the
      prompt, model logits -> cross-entropy, AdamW, clipping, cosine schedule;
  (c) `trl.SFTTrainer` on {"prompt", "completion"} records (completion-only loss), no packing;
  (d) (a) with `--torch_compile true` (at the first operating point only); the seconds spent compiling are reported
      beside its tokens/s, never counted in them (compilation ends within the warm-up steps).

Two operating points: the seed's defaults (micro-batch 2 x accumulation 8) and 8 x 2, where padding costs the loop
and TRL most. The batch and accumulation each run used are read from the run itself (a Trainer callback), and the
prompt format is the package's. Each run is a fresh process; runs alternate a b c d a b c d ... and the medians
are reported. Timing starts after the warm-up steps. Per stack: real (non-pad) tokens/s, supervised tokens/s, padding
fraction (pad / all positions computed), peak RSS, loss of the last optimizer step (summed token losses / supervised
tokens), and model-FLOPs utilisation = 6 x parameters x real tokens/s / the matmul peak of that precision, both
peaks (fp32 and bf16) measured first in this process.

    python scripts/benchmark_throughput.py --quick            # nanoGPT-style: fp32 both points, bf16 (a) and (d)
    python scripts/benchmark_throughput.py                    # both models, all stacks, more steps
    python scripts/benchmark_throughput.py --tiny             # seconds: a smoke test of the machinery

Before it, hf-sft's four variants side by side (fp32 and bf16, eager and compiled: real tokens/s, MFU, eval loss,
compile time). The last line, for the first model: `ratio_vs_loop=X ratio_vs_trl=Y mfu=Z pad_frac=W bf16_of_peak=B
mfu_bf16=M` (fp32 at the seed's defaults; bf16_of_peak = (a)'s bf16/fp32 real tokens/s over the bf16/fp32 matmul
peak ratio), followed by `loop_8x2=X trl_8x2=Y`, the ratios at the second operating point, then
`compile_vs_eager=C` ((d)/(a) fp32 real tokens/s) and `bf16_loss_gap=G` ((a)'s bf16 eval loss / fp32's - 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from throughput_setup import DOLLY, measure_matmul_peak, prepare
from throughput_stacks import ACCUM, BATCH, run_worker

STACKS = {"a": "hf-sft train", "b": "hand-written loop", "c": "TRL SFTTrainer", "d": "hf-sft --torch_compile"}
# Stacks run at the first operating point only.
FIRST_POINT_ONLY = "d"

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
    return {key: statistics.median(run[key] for run in runs) for key in runs[0] if key not in ("batch", "accum")}


def benchmark(model_name: str, dtype: str, point: str, stacks: str, options: argparse.Namespace, work: Path) -> dict:
    base = work / model_name
    if not (base / "model").is_dir():
        prepare(base, model_name, options.max_len, options.records, options.eval_records)
    batch, accum = (int(n) for n in point.split("x"))
    spec = {
        "model_dir": str(base / "model"),
        "train": str(base / "train.jsonl"),
        "eval": str(base / "eval.jsonl"),
        "max_len": options.max_len,
        "steps": options.warmup + options.steps,
        "warmup": options.warmup,
        "dtype": dtype,
        "device": options.device,
        "batch": batch,
        "accum": accum,
        "hf_sft_args": options.hf_sft_args.split() + point_flags(batch, accum),
        "compile_backend": options.compile_backend,
    }
    runs: dict[str, list[dict]] = {stack: [] for stack in stacks}
    for repeat in range(options.repeats):
        for stack in stacks:
            result = run_stack(stack, spec, base, f"{dtype}_{point}_{repeat}")
            if (result["batch"], result["accum"]) != (batch, accum):
                raise SystemExit(f"stack {stack} ran {result['batch']}x{result['accum']}, not {point}")
            runs[stack].append(result)
            tag = f"[{model_name} {dtype} {point} #{repeat + 1}] {stack}"
            line = f"  {tag}: {result['real_tok_s']:.0f} real tok/s"
            if "compile_s" in result:
                line += f" ({result['compile_graphs']} graphs compiled in {result['compile_s']:.0f} s)"
            print(line, flush=True)
    params = json.loads((base / "model" / "params.json").read_text())
    return {"parameters": params, "medians": {stack: median_results(r) for stack, r in runs.items()}}


def point_flags(batch: int, accum: int) -> list[str]:
    """hf-sft's flags for an operating point: none at its defaults, so (a) runs as users run it."""
    if (batch, accum) == (BATCH, ACCUM):
        return []
    return ["--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accum)]


def report(title: str, outcome: dict, peak: float) -> dict:
    params, medians = outcome["parameters"], outcome["medians"]
    print(f"\n{title}, {params / 1e6:.1f}M parameters, matmul peak {peak:.0f} GFLOP/s")
    header = f"{'stack':<20}{'real tok/s':>11}{'sup tok/s':>11}{'pad frac':>10}{'peak RSS MB':>13}"
    print(header + f"{'final loss':>12}{'MFU':>8}{'eval loss':>11}")
    for stack, m in medians.items():
        m["mfu"] = 6 * params * m["real_tok_s"] / (peak * 1e9)
        line = f"{STACKS[stack]:<20}{m['real_tok_s']:>11.0f}{m['sup_tok_s']:>11.0f}{m['pad_frac']:>10.3f}"
        line += f"{m['peak_rss_mb']:>13.0f}{m['final_loss']:>12.4f}{m['mfu']:>8.1%}"
        print(line + (f"{m['eval_loss']:>11.4f}" if "eval_loss" in m else ""))
    ratios = {}
    for other, name in (("b", "ratio_vs_loop"), ("c", "ratio_vs_trl")):
        if "a" in medians and other in medians:
            ratios[name] = medians["a"]["real_tok_s"] / medians[other]["real_tok_s"]
            loss_gap = abs(medians["a"]["final_loss"] / medians[other]["final_loss"] - 1)
            print(f"(a)/({other}) real tokens/s: {ratios[name]:.2f}x; final losses differ by {loss_gap:.2%}")
    return {"params": params, "peak": peak, "medians": medians, **ratios}


def variants(summary: dict, model_name: str, point: str) -> dict[str, dict]:
    """hf-sft's four variants at `point`: (a) and (d), fp32 and bf16, as far as they ran."""
    found = {}
    for dtype in ("float32", "bfloat16"):
        medians = summary.get(f"{model_name}/{dtype}/{point}", {}).get("medians", {})
        for stack, mode in (("a", "eager"), ("d", "compiled")):
            if stack in medians:
                found[f"{dtype} {mode}"] = medians[stack]
    return found


def report_variants(summary: dict, model_name: str, point: str) -> None:
    found = variants(summary, model_name, point)
    print(f"\n{model_name}-style, hf-sft train at {point}: eager and compiled, fp32 and bf16")
    print(f"{'variant':<20}{'real tok/s':>11}{'MFU':>8}{'eval loss':>11}{'compiled':>24}")
    for name, m in found.items():
        compiled = f"{m['compile_graphs']:.0f} graphs in {m['compile_s']:.0f} s" if "compile_s" in m else ""
        print(f"{name:<20}{m['real_tok_s']:>11.0f}{m['mfu']:>8.1%}{m['eval_loss']:>11.4f}{compiled:>24}")


def last_line(summary: dict, model_name: str, points: list[str], peaks: dict) -> str:
    """The figures the targets are stated in, for one model (nan where not measured)."""
    nan, missing = {"medians": {}}, float("nan")
    fp32 = summary.get(f"{model_name}/float32/{points[0]}", nan)
    bf16 = summary.get(f"{model_name}/bfloat16/{points[0]}", nan)
    a32, a16 = fp32["medians"].get("a", {}), bf16["medians"].get("a", {})
    d32 = fp32["medians"].get("d", {})
    speed = a16.get("real_tok_s", missing) / a32.get("real_tok_s", missing)
    gap = a16.get("eval_loss", missing) / a32.get("eval_loss", missing) - 1
    compiled = d32.get("real_tok_s", missing) / a32.get("real_tok_s", missing)
    if a32 and a16:
        print(f"{model_name}: (a) bf16/fp32 real tokens/s {speed:.2f}x; eval loss bf16 vs fp32 {gap:+.2%}")
    if a32 and d32:
        print(f"{model_name}: fp32 compiled/eager real tokens/s {compiled:.2f}x")
    line = (
        f"ratio_vs_loop={fp32.get('ratio_vs_loop', missing):.2f} "
        f"ratio_vs_trl={fp32.get('ratio_vs_trl', missing):.2f} "
        f"mfu={a32.get('mfu', missing):.3f} pad_frac={a32.get('pad_frac', missing):.3f} "
        f"bf16_of_peak={speed / (peaks['bfloat16'] / peaks['float32']):.2f} "
        f"mfu_bf16={a16.get('mfu', missing):.3f}"
    )
    for point in points[1:]:
        other = summary.get(f"{model_name}/float32/{point}", nan)
        line += f" loop_{point}={other.get('ratio_vs_loop', missing):.2f}"
        line += f" trl_{point}={other.get('ratio_vs_trl', missing):.2f}"
    return line + f" compile_vs_eager={compiled:.2f} bf16_loss_gap={gap:.4f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="nanoGPT-style, 1 run of 1+5 steps each; bf16: (a), (d).")
    parser.add_argument("--tiny", action="store_true", help="Tiny model, 1 repeat of 1+1 steps: checks the machinery.")
    parser.add_argument("--models", default="nanogpt,llama", help="Comma-separated: nanogpt, llama, tiny.")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="Comma-separated: float32, bfloat16.")
    parser.add_argument("--points", default=f"{BATCH}x{ACCUM},8x2", help="Operating points, micro-batch x accum.")
    parser.add_argument(
        "--stacks", default="abcd", help="Which stacks: a (hf-sft), b (loop), c (TRL), d (hf-sft compiled)."
    )
    parser.add_argument("--bf16_stacks", default="abcd", help="Stacks run in bf16 (first point only, with fp32).")
    parser.add_argument(
        "--compile_backend", default=None, help="torch.compile backend of (d) (default: Trainer's, inductor)."
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="Optimizer steps before the clock starts.")
    parser.add_argument("--steps", type=int, default=20, help="Timed optimizer steps.")
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--records", type=int, default=1500)
    parser.add_argument("--eval_records", type=int, default=32)
    parser.add_argument("--peak_seconds", type=float, default=2.0, help="Per matrix size and precision.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where all stacks train.")
    parser.add_argument(
        "--hf_sft_args", default="", help="Extra flags for (a), given with '=': --hf_sft_args='--packing false'."
    )
    parser.add_argument("--work_dir", default=None, help="Keep data, models and logs here (default: a temp dir).")
    parser.add_argument("--json", default=None, help="Also write all figures to this JSON file.")
    parser.add_argument("--worker", nargs=2, metavar=("STACK", "SPEC"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.quick:
        options.models, options.bf16_stacks, options.repeats, options.warmup, options.steps = "nanogpt", "ad", 1, 1, 5
    if options.tiny:
        options.models, options.bf16_stacks, options.repeats, options.warmup, options.steps = "tiny", "a", 1, 1, 1
        options.records, options.max_len, options.eval_records = 64, 256, 8
        options.compile_backend = options.compile_backend or "aot_eager"  # traced, no code generated: seconds
        options.points, options.peak_seconds = f"{BATCH}x{ACCUM}", 0.2
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.worker:
        run_worker(*options.worker)
        return 0
    if not DOLLY.is_file():
        raise SystemExit(f"needs the shared Dolly sample at {DOLLY}")
    models, dtypes, points = (getattr(options, name).split(",") for name in ("models", "dtypes", "points"))
    with tempfile.TemporaryDirectory(prefix="hf_sft_bench_") as tmp:
        work = Path(options.work_dir or tmp)
        peaks = {d: measure_matmul_peak(d, options.peak_seconds, options.device) for d in ("float32", "bfloat16")}
        print("matmul peak: " + ", ".join(f"{d} {p:.0f} GFLOP/s" for d, p in peaks.items()), flush=True)
        summary = {}
        for model_name in models:
            for dtype in dtypes:
                for point in points if dtype == "float32" or "float32" not in dtypes else points[:1]:
                    stacks = options.stacks if dtype == "float32" else options.bf16_stacks
                    if point != points[0]:
                        stacks = "".join(stack for stack in stacks if stack not in FIRST_POINT_ONLY)
                    outcome = benchmark(model_name, dtype, point, stacks, options, work)
                    title = f"{model_name}-style, {dtype}, micro-batch x accumulation {point}"
                    summary[f"{model_name}/{dtype}/{point}"] = report(title, outcome, peaks[dtype])
    if options.json:
        Path(options.json).write_text(json.dumps({"peaks": peaks, **summary}, indent=1))
    for model_name in models:
        report_variants(summary, model_name, points[0])
    lines = [last_line(summary, model_name, points, peaks) for model_name in models]
    print("\n".join(lines[1:] + lines[:1]))  # the first model's line last
    return 0


if __name__ == "__main__":
    sys.exit(main())
