"""What the throughput benchmark trains on: the data files, the initial model, and the machine's matmul peaks."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from throughput_stacks import SEED, prompt_text, response_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DOLLY = SHARED / "dolly" / "dolly_sample.jsonl"
TOKENIZER = SHARED / "tokenizers" / "dolly_bpe_4k.json"

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
    # GPU sizes, about 124M parameters each (GPT-2 small; the vocabularies pad the 4k tokenizer's ids).
    "nanogpt124m": {
        "family": "nanogpt",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "vocab_size": 50304,
    },
    "llama124m": {
        "family": "llama",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "multiple_of": 256,
        "vocab_size": 32000,
    },
}


def measure_matmul_peak(dtype_name: str, seconds: float, device: str = "cpu") -> float:
    """Best GFLOP/s of square matmuls in this process (CPU: 1024 and 2048 on all the cores torch uses; CUDA: 8192)."""
    import torch

    dtype, best = getattr(torch, dtype_name), 0.0
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    for size in (1024, 2048) if device == "cpu" else (8192,):
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        torch.mm(a, b)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            sync()
            start = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def prepare(work: Path, model_name: str, max_len: int, num_records: int, num_eval: int) -> None:
    """Write the training/eval records and the initial model (with its parameter count)."""
    import torch

    from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
    from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
    from hf_sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    records = [json.loads(line) for line in DOLLY.read_text(encoding="utf-8").splitlines() if line.strip()]
    # Keep records that every stack fits whole (a small margin covers tokenisation differences at the boundary).
    fits = [r for r in records if len(tokenizer(prompt_text(r) + response_text(r)).input_ids) + 8 <= max_len]
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
        max_position_embeddings=max_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{"vocab_size": len(tokenizer), **MODELS[model_name]},
    )
    model = HfSftGPTForCausalLM(config)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    (work / "model" / "params.json").write_text(json.dumps(sum(p.numel() for p in model.parameters())))
