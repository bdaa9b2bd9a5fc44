"""Tokens per second of `hf-sft eval`'s scoring against a training forward, on the same model, data and batches.

Both read the same examples, tokenised and masked by the data pipeline, in the same packed (or padded) batches:

  eval:     `hf_sft.evaluation.score` (no autograd; the LM head on supervised positions only; per-token losses and
            accuracy gathered per group);
  training: the forward of a training step as `Trainer` runs it (autograd on, `supervised_logits_only` as training
            sets it, `labels` given, the loss returned), without the backward pass.

After one untimed pass of each, runs alternate eval, training, eval, training, ...; the medians and the best runs
are printed: real (non-pad) tokens/s of each and their ratios (eval / training; above 1 means eval is faster per
token). On a shared machine the best runs are the least disturbed ones.

    python scripts/benchmark_eval.py                      # a nanoGPT-style model the size of the shared checkpoint
    python scripts/benchmark_eval.py --family llama --layers 6 --width 384 --repeats 5
    python scripts/benchmark_eval.py --packing false --batch_size 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "dolly" / "dolly_sample.jsonl"
TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "dolly_bpe_4k.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=str(DOLLY))
    parser.add_argument("--tokenizer_path", default=str(TOKENIZER))
    parser.add_argument("--family", default="nanogpt", choices=["nanogpt", "llama"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--packing", default="true", choices=["true", "false"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    packing = args.packing == "true"

    from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
    from hf_sft.data import FORMATS, install_chat_template
    from hf_sft.evaluation import load_model, prepare_data
    from hf_sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer_path)
    install_chat_template(tokenizer, FORMATS["seed"])
    config = HfSftGPTConfig(
        family=args.family,
        vocab_size=len(tokenizer),
        hidden_size=args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.max_seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        HfSftGPTForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        loaded = load_model(tmp, device="cpu")
    data = prepare_data(
        args.data_path, loaded.tokenizer, template=FORMATS["seed"], max_seq_len=args.max_seq_len, num_answers=0
    )
    real_tokens = sum(len(ids) for ids in data.dataset["input_ids"])
    print(
        f"{len(data.groups)} examples, {real_tokens} tokens; {args.family} {args.layers}x{args.width}, "
        f"batch {args.batch_size}, packing {packing}, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    eval_pass(loaded, data, args.batch_size, packing)  # warm-up: allocator, kernels, first-call caches
    training_forward(loaded, data, args.batch_size, packing)
    runs = {"eval": [], "training forward": []}
    for _ in range(args.repeats):
        runs["eval"].append(real_tokens / timed(lambda: eval_pass(loaded, data, args.batch_size, packing)))
        runs["training forward"].append(
            real_tokens / timed(lambda: training_forward(loaded, data, args.batch_size, packing))
        )
    medians = {name: statistics.median(values) for name, values in runs.items()}
    best = {name: max(values) for name, values in runs.items()}
    for name, value in medians.items():
        runs_text = ", ".join(f"{v:,.0f}" for v in runs[name])
        print(f"{name:>17}: median {value:,.0f}, best {best[name]:,.0f} tokens/s (runs: {runs_text})")
    # A shared machine only ever slows a run down: the best runs are the least disturbed.
    ratio, best_ratio = (m["eval"] / m["training forward"] for m in (medians, best))
    print(f"eval_vs_training_forward={ratio:.2f} best_eval_vs_best_training_forward={best_ratio:.2f}")


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def eval_pass(loaded, data, batch_size: int, packing: bool) -> None:
    from hf_sft.evaluation import score

    score(loaded.model, data, pad_token_id=loaded.tokenizer.pad_token_id, packing=packing, batch_size=batch_size)


def training_forward(loaded, data, batch_size: int, packing: bool) -> None:
    from hf_sft.data import make_collator

    model = loaded.model
    collate = make_collator(loaded.tokenizer.pad_token_id, packing=packing)
    model.supervised_logits_only = True  # as hf-sft train sets it
    try:
        for start in range(0, len(data.groups), batch_size):
            rows = data.dataset[start : start + batch_size]
            batch = collate([{name: rows[name][i] for name in rows} for i in range(len(rows["input_ids"]))])
            with torch.enable_grad():
                loss = model(**batch, use_cache=False).loss
            del loss  # the graph is built, as in a training step; the backward is not timed
    finally:
        model.supervised_logits_only = False


if __name__ == "__main__":
    main()
