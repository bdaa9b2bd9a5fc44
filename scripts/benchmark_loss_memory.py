"""Peak memory of the loss computation: LM head + cross-entropy on every position versus on supervised ones only.

Setting: vocabulary 32,000, batch 8, length 1,024, width 512. The labels come from real Dolly examples laid
end to end in each row (no padding, the layout where supervised-only saves the least): prompt tokens are -100, the
response and EOS are supervised. Each path runs in a fresh process as Trainer runs a training step: forward through
`HfSftGPTForCausalLM`'s head and loss (only the loss is kept), then backward. Reported: the peak RSS of the process,
and the peak above the RSS reached once the weights, hidden states and labels exist (the loss path's own memory).

    python scripts/benchmark_loss_memory.py                 # the stated setting
    python scripts/benchmark_loss_memory.py --tiny          # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DOLLY = SHARED / "dolly" / "dolly_sample.jsonl"
TOKENIZER = SHARED / "tokenizers" / "dolly_bpe_4k.json"


def dolly_labels(batch: int, length: int) -> list[list[bool]]:
    """Which positions are supervised when Dolly examples (seed format) fill `batch` rows of `length` tokens."""
    from hf_sft.data import DEFAULT_FORMAT
    from hf_sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    records = [json.loads(line) for line in DOLLY.read_text(encoding="utf-8").splitlines() if line.strip()]
    flags: list[bool] = []
    for record in records * (1 + batch * length // 20000):
        prompt = DEFAULT_FORMAT.prompt_text(record["instruction"], record["context"], bos_token=tokenizer.bos_token)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        response = DEFAULT_FORMAT.response_text(record["response"])
        n_response = len(tokenizer(response, add_special_tokens=False).input_ids) + 1
        flags += [False] * n_prompt + [True] * n_response
        if len(flags) >= batch * length:
            break
    return [flags[row * length : (row + 1) * length] for row in range(batch)]


def rss_mb() -> float:
    """Current resident set size."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def measure(mode: str, vocab: int, batch: int, length: int, width: int) -> dict:
    """Forward + backward of the loss path in this process; peak RSS in MB."""
    import torch

    from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
    from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM

    torch.manual_seed(0)
    supervised = torch.tensor(dolly_labels(batch, length))
    labels = torch.where(supervised, torch.randint(0, vocab, (batch, length)), -100)
    config = HfSftGPTConfig(
        family="llama",
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=0,
        num_attention_heads=8,
        max_position_embeddings=length,
    )
    model = HfSftGPTForCausalLM(config).train()
    model.supervised_logits_only = mode == "supervised"
    model.model.norm = torch.nn.Identity()  # no blocks, no norm: the hidden states below reach the head as they are
    hidden = torch.randn(batch, length, width, requires_grad=True)
    num_items = int((labels[:, 1:] != -100).sum())
    base = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # As in Trainer's training step: only the loss is kept, then backward.
    loss = model(inputs_embeds=hidden, labels=labels, num_items_in_batch=num_items).loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": mode,
        "peak_rss_mb": peak,
        "loss_path_mb": peak - max(base, peak_before),
        "loss": float(loss),
        "supervised_fraction": num_items / labels.numel(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="vocab 1000, batch 2, length 256")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.tiny:
        options.vocab, options.batch, options.length = 1000, 2, 256
    sizes = (options.vocab, options.batch, options.length, options.width)
    if options.worker:
        print(json.dumps(measure(options.worker, *sizes)))
        return 0
    results = {}
    for mode in ("full", "supervised"):
        argv = [sys.executable, __file__, "--worker", mode]
        argv += ["--vocab", str(options.vocab), "--batch", str(options.batch)]
        argv += ["--length", str(options.length), "--width", str(options.width)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    full, sup = results["full"], results["supervised"]
    print(f"vocab {options.vocab}, batch {options.batch}, length {options.length}, width {options.width}; ", end="")
    print(f"{sup['supervised_fraction']:.1%} of positions supervised")
    for r in (full, sup):
        print(f"{r['mode']:>10} logits: peak RSS {r['peak_rss_mb']:7.0f} MB, loss path {r['loss_path_mb']:7.0f} MB")
    print(f"losses equal: {abs(full['loss'] - sup['loss']) < 1e-4 * abs(full['loss'])}")
    print(f"loss_path_ratio={sup['loss_path_mb'] / full['loss_path_mb']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
