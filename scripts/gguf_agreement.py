"""How closely llama.cpp runs a model's GGUF files (f32, f16, bf16, q8_0) against transformers, side by side.

For the first N records of a data file that leave room for the answer, the training-format prompt goes through the
hf_sft model in transformers and through each GGUF in llama.cpp's own server (xllamacpp): the largest difference of
the next-token log-probabilities (the logits up to a constant per position; llama-server reports no raw logits) over
every prompt position, and how many prompts give the same greedy tokens as transformers (up to our EOS, which the
server stops at and leaves out).

    python scripts/gguf_agreement.py out/sft --data_path data/dolly.jsonl --prompts 10 --new_tokens 24 \
        [--kv_cache f32] [--flash_attention off]

Prints one line per file type, then `gguf_agreement f32=A/N f16=B/N bf16=C/N q8_0=D/N`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--data_path", required=True, help="records whose prompts are run")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument(
        "--kv_cache", choices=("f16", "f32"), default="f16", help="llama.cpp's KV-cache type (its default: f16)"
    )
    parser.add_argument(
        "--flash_attention", choices=("auto", "on", "off"), default="auto", help="llama-server's --flash-attn"
    )
    args = parser.parse_args()

    from hf_sft.data import encode_prompt, format_of
    from hf_sft.export import load_hfsft_model
    from hf_sft.export.gguf_check import records_for_check
    from hf_sft.export.gguf_file import export_gguf
    from hf_sft.export.llama_server import LlamaServer
    from hf_sft.tokenizer import load_tokenizer

    model = load_hfsft_model(args.model_dir).float()
    tokenizer = load_tokenizer(args.model_dir)
    template, limit = format_of(tokenizer), model.config.max_position_embeddings
    prompts = []
    records, _ = records_for_check(args.data_path)
    for record in records:
        if "instruction" in record:
            ids = encode_prompt(tokenizer, record["instruction"], record["input"], template=template)
            if len(ids) + args.new_tokens <= limit:
                prompts.append(ids)
        if len(prompts) == args.prompts:
            break
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0] for ids in prompts]
        greedy = []
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False)
            tokens = out[0, len(ids) :].tolist()
            greedy.append(tokens[:-1] if tokens[-1] == tokenizer.eos_token_id else tokens)
    agree = {}
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in OUTTYPES:
            path = export_gguf(args.model_dir, Path(tmp) / f"model-{outtype}.gguf", outtype=outtype).path
            vocab = model.config.vocab_size
            with LlamaServer(path, limit, kv_cache=args.kv_cache, flash_attention=args.flash_attention) as llm:
                worst, same = 0.0, 0
                for ids, ours, tokens in zip(prompts, logits, greedy, strict=True):
                    difference = torch.tensor(llm.logprobs(ids, vocab)) - torch.log_softmax(ours.float(), dim=-1)
                    worst = max(worst, difference.abs().nan_to_num(nan=float("inf")).max().item())  # not reported: inf
                    same += llm.complete(ids, args.new_tokens)["tokens"] == tokens
            agree[outtype] = same
            print(f"{outtype:5s} max |log-probability difference| {worst:.2e}  same greedy {same}/{len(prompts)}")
    spread = max(x.std().item() for x in logits)
    print(f"(transformers' logits: largest standard deviation over a position's vocabulary {spread:.2f})")
    print("gguf_agreement " + " ".join(f"{t}={agree[t]}/{len(prompts)}" for t in OUTTYPES))


if __name__ == "__main__":
    main()
