"""Streaming at two source sizes 10x apart: peak RSS of a `--streaming` run, and a resume timed against a fresh start.

    python scripts/benchmark_streaming.py                                 # 50,000 and 500,000 records
    python scripts/benchmark_streaming.py --records 2000 --steps 4        # a smoke run

For each size (`--records` and ten times as many), the shared Dolly sample is repeated to that many records in a
`.jsonl` file and a tiny new model trains on it with `hf-sft train --streaming` for `--steps` steps, with a
checkpoint half-way, in a fresh child process; then the same run is resumed from that checkpoint in another one.
Each line gives the child's own peak RSS (`ru_maxrss` from `wait4`), its wall time (start-up, the index pass and
training included) and the records its stream read and tokenised (the run log's `streamed N records` line); for the
resumed run also the position in the epoch's permutation where its stream started (from the checkpoint): nothing
before it is read again. Constant memory shows as the same peak at both sizes, up to the 16 bytes per record of the
offsets and the epoch's permutation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRAIN = REPO / "scripts" / "train.py"


def write_source(sample: Path, records: int, dest: Path) -> Path:
    """`records` records: the sample's lines repeated."""
    lines = [line for line in sample.read_bytes().splitlines(keepends=True) if line.strip()]
    with dest.open("wb") as out:
        for i in range(records):
            out.write(lines[i % len(lines)])
    return dest


def child(command: list[str]) -> tuple[float, float]:
    """Run `command`; its wall time in seconds and its own peak RSS in MB."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-3000:])
        raise SystemExit(f"failed: {' '.join(command)}")
    return seconds, usage.ru_maxrss / 1024  # KB on Linux


def streamed(run_dir: Path) -> int:
    """The records the run's stream read and tokenised, from its log."""
    found = re.findall(r"streamed (\d+) records", (run_dir / "train.log").read_text())
    return int(found[-1]) if found else -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared fixtures folder")
    parser.add_argument("--records", type=int, default=50_000, help="the smaller size (the larger is 10x)")
    parser.add_argument("--steps", type=int, default=40, help="training steps (checkpoint at half of them)")
    parser.add_argument("--max_seq_len", type=int, default=512, help="length limit")
    args = parser.parse_args(argv)
    sample = args.shared / "data" / "dolly" / "dolly_sample.jsonl"
    tokenizer = args.shared / "data" / "tokenizers" / "dolly_bpe_4k.json"
    if not sample.is_file():
        print(f"{sample} not found; pass --shared", file=sys.stderr)
        return 2
    half = max(1, args.steps // 2)
    flags = ["--device", "cpu", "--tokenizer_path", str(tokenizer), "--n_layer", "2", "--n_head", "2"]
    flags += ["--n_embd", "64", "--block_size", str(args.max_seq_len), "--max_seq_len", str(args.max_seq_len)]
    flags += ["--val_split", "0", "--batch_size", "4", "--gradient_accumulation_steps", "1", "--streaming"]
    flags += ["--max_iters", str(args.steps), "--save_interval", str(half), "--eval_steps", "1000000"]
    print(f"--streaming, {args.steps} steps of 4 examples, tiny model, max_seq_len {args.max_seq_len}")
    with tempfile.TemporaryDirectory() as tmp:
        for records in (args.records, 10 * args.records):
            source = write_source(sample, records, Path(tmp) / f"dolly-{records}.jsonl")
            out = Path(tmp) / f"run-{records}"
            fresh, fresh_rss = child(
                [sys.executable, str(TRAIN), *flags, "--data_path", str(source), "--out_dir", str(out)]
            )
            resumed_dir = Path(tmp) / f"resumed-{records}"
            resumed_dir.mkdir()
            os.rename(out / f"checkpoint-{half}", resumed_dir / f"checkpoint-{half}")
            resume = [sys.executable, str(TRAIN), "--resume_from_ckpt_path", str(resumed_dir / f"checkpoint-{half}")]
            resumed, resumed_rss = child([*resume, "--out_dir", str(resumed_dir)])
            state = json.loads((resumed_dir / f"checkpoint-{half}" / "trainer_state.json").read_text())
            start = state["stateful_callbacks"]["StreamPositionCallback"]["attributes"]
            size = source.stat().st_size / 2**20
            print(
                f"{records:>9,} records ({size:,.0f} MB): fresh {args.steps} steps {fresh:6.1f} s, peak RSS "
                f"{fresh_rss:6.0f} MB, {streamed(out)} records tokenised | resumed at step {half} (stream position "
                f"{start['position']} of epoch {start['epoch']}): {resumed:6.1f} s, peak RSS {resumed_rss:6.0f} MB, "
                f"{streamed(resumed_dir)} records tokenised"
            )
            source.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
