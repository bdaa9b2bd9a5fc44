"""Where a training step's time goes: torch.profiler over the optimizer steps `hf-sft train` runs on Dolly.

The benchmark's nanoGPT-style model and data; each optimizer step is the seed's 2 x 8 examples, packed into
token-budget rows of 2 x 512 tokens as `hf-sft train` does, forward + backward in fp32 or under bf16 autocast,
clipping and AdamW.
Prints the ops by self CPU time, the step time of each precision, and the share of the matmuls: what is not matmul
bounds the speed-up that faster matmuls (bf16 on AMX, say) can give, by Amdahl's law.

    python scripts/profile_step.py                        # fp32 and bf16, 3 profiled steps each
    python scripts/profile_step.py --dtypes bfloat16 --rows 30
    python scripts/profile_step.py --compile_row          # one row's forward + backward, eager and compiled
    python scripts/profile_step.py --linear               # bf16 matmuls: reused, freshly cast, under autocast
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from throughput_setup import prepare
from throughput_stacks import ACCUM, BATCH, LR

from hf_sft.data import build_datasets, install_chat_template, make_collator
from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
from hf_sft.tokenizer import load_tokenizer
from hf_sft.training.trainer import WithSupervisedPositions, repack_micro_batches

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def optimizer_steps(work: Path, count: int, max_len: int) -> list[list[dict]]:
    """The packed micro-batches of the first `count` optimizer steps."""
    tokenizer = load_tokenizer(work / "model")
    install_chat_template(tokenizer)
    data = build_datasets(str(work / "train.jsonl"), tokenizer, max_seq_len=max_len).train.dataset
    collate = WithSupervisedPositions(make_collator(tokenizer.pad_token_id, packing=True))  # as a run does
    per_step = BATCH * ACCUM
    steps = []
    for start in range(0, count * per_step, per_step):
        micro = [collate([data[i] for i in range(j, j + BATCH)]) for j in range(start, start + per_step, BATCH)]
        steps.append([batch for batch in repack_micro_batches(micro, BATCH * max_len) if batch["input_ids"].numel()])
    return steps


def train_step(model, optimizer, micro_batches: list[dict], bf16: bool) -> None:
    num_items = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in micro_batches)
    for batch in micro_batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch, num_items_in_batch=torch.tensor(num_items)).loss
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(function, repeats: int) -> float:
    """Seconds per call, after two calls (compilation, caches)."""
    function()
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def compile_row(work: Path, max_len: int) -> None:
    """Real tokens/s of the forward + backward of the longest packed row of one step, eager and under each compile
    mode: what inductor can add around the matmuls, without the optimizer or the data."""
    row = max(optimizer_steps(work, 1, max_len)[0], key=lambda batch: batch["input_ids"].numel())
    num_items = torch.tensor(int((row["labels"][:, 1:] != -100).sum()))
    modes = {"eager": None, "static": {"dynamic": False}, "dynamic": {"dynamic": True}}
    modes["static, max_autotune"] = {"dynamic": False, "options": {"max_autotune": True}}
    for name, options in modes.items():
        torch._dynamo.reset()
        model = HfSftGPTForCausalLM.from_pretrained(work / "model", dtype=torch.float32).train()
        forward = model if options is None else torch.compile(model, **options)

        def step(forward=forward):
            forward(**row, num_items_in_batch=num_items).loss.backward()

        seconds = timed(step, repeats=8)
        print(f"one {row['input_ids'].shape[1]}-token row, fp32 forward + backward, {name}: "
              f"{row['input_ids'].numel() / seconds:.0f} tok/s")  # fmt: skip


def linear_speeds(rows: int = 1000, inputs: int = 512, outputs: int = 2048) -> None:
    """GFLOP/s of one of the model's linears in bf16: the weight reused, a fresh bf16 copy each call, and cast by
    autocast from fp32 (what every forward of a bf16 step does)."""
    x, weight = torch.randn(rows, inputs), torch.randn(outputs, inputs)
    x16, weight16 = x.bfloat16(), weight.bfloat16()
    flops = 2 * rows * inputs * outputs

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(x, weight)

    cases = {
        "fp32": lambda: torch.nn.functional.linear(x, weight),
        "bf16, weight reused": lambda: torch.nn.functional.linear(x16, weight16),
        "bf16, fresh weight copy": lambda: torch.nn.functional.linear(x16, weight16.clone()),
        "bf16 autocast from fp32": autocast,
    }
    for name, function in cases.items():
        print(f"linear {rows} x {inputs} by {outputs} x {inputs}, {name}: "
              f"{flops / timed(function, repeats=20) / 1e9:.0f} GFLOP/s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=3, help="Profiled optimizer steps (after one warm-up step).")
    parser.add_argument("--rows", type=int, default=20, help="Ops shown.")
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--compile_row", action="store_true", help="Time one row eager and compiled instead.")
    parser.add_argument("--linear", action="store_true", help="Time one linear's bf16 forms instead.")
    options = parser.parse_args()
    if options.linear:
        linear_speeds()
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, "nanogpt", options.max_len, num_records=(options.steps + 1) * BATCH * ACCUM, num_eval=4)
        if options.compile_row:
            compile_row(work, options.max_len)
            return
        steps = optimizer_steps(work, options.steps + 1, options.max_len)
        for dtype in options.dtypes.split(","):
            model = HfSftGPTForCausalLM.from_pretrained(work / "model", dtype=torch.float32).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
            bf16 = dtype == "bfloat16"
            train_step(model, optimizer, steps[0], bf16)
            start = time.perf_counter()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                for micro_batches in steps[1:]:
                    train_step(model, optimizer, micro_batches, bf16)
            seconds = (time.perf_counter() - start) / options.steps
            tokens = sum(batch["input_ids"].numel() for step in steps[1:] for batch in step) / options.steps
            print(f"\n{dtype}: {seconds:.2f} s per optimizer step ({tokens:.0f} tokens, profiler on)")
            averages = profiler.key_averages()
            print(averages.table(sort_by="self_cpu_time_total", row_limit=options.rows))
            total = sum(event.self_cpu_time_total for event in averages)
            share = sum(event.self_cpu_time_total for event in averages if event.key in MATMULS) / total
            print(
                f"{dtype}: matmuls ({', '.join(MATMULS)}) {share:.0%} of self CPU time: infinitely fast matmuls "
                f"would make this step at most {1 / (1 - share):.2f}x faster"
            )


if __name__ == "__main__":
    main()
