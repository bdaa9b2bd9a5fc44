"""How closely llama.cpp runs a model's GGUF files (f32, f16, bf16, q8_0) against transformers, side by side.

For the first N records of a data file that leave room for the answer, the training-format prompt goes through the
hf_sft model in transformers and through each GGUF in llama.cpp (llama-cpp-python): the largest difference of the
next-token logits over every prompt position, and how many prompts give the same greedy tokens as transformers.

    python scripts/gguf_agreement.py out/sft --data_path data/dolly.jsonl --prompts 10 --new_tokens 24 [--kv_cache f32]

Prints one line per file type, then `gguf_agreement f32=A/N f16=B/N bf16=C/N q8_0=D/N`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--data_path", required=True, help="records whose prompts are run")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument(
        "--kv_cache", choices=("f16", "f32"), default="f16", help="llama.cpp's KV-cache type (its default: f16)"
    )
    args = parser.parse_args()

    import llama_cpp

    from hf_sft.data import encode_prompt, format_of
    from hf_sft.export import load_hfsft_model
    from hf_sft.export.gguf_check import records_for_check
    from hf_sft.export.gguf_file import export_gguf
    from hf_sft.tokenizer import load_tokenizer

    model = load_hfsft_model(args.model_dir).float()
    tokenizer = load_tokenizer(args.model_dir)
    template, limit = format_of(tokenizer), model.config.max_position_embeddings
    prompts = []
    for record in records_for_check(args.data_path):
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
            greedy.append(out[0, len(ids) :].tolist())
    agree = {}
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in OUTTYPES:
            path = export_gguf(args.model_dir, Path(tmp) / f"model-{outtype}.gguf", outtype=outtype).path
            kv = {"type_k": KV_TYPES[args.kv_cache], "type_v": KV_TYPES[args.kv_cache]}
            llm = llama_cpp.Llama(str(path), n_ctx=limit, logits_all=True, verbose=False, n_threads=2, **kv)
            worst, same = 0.0, 0
            for ids, ours, tokens in zip(prompts, logits, greedy, strict=True):
                llm.reset()
                llm.eval(ids)
                worst = max(worst, (torch.tensor(llm.scores[: len(ids)]) - ours).abs().max().item())
                theirs = []
                for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                    theirs.append(token)
                    if len(theirs) == len(tokens):
                        break
                same += theirs == tokens  # transformers stops at EOS, llama.cpp's generator does not
            llm.close()
            agree[outtype] = same
            print(f"{outtype:5s} max |logit difference| {worst:.2e}  same greedy tokens {same}/{len(prompts)}")
    spread = max(x.std().item() for x in logits)
    print(f"(transformers' logits: largest standard deviation over a position's vocabulary {spread:.2f})")
    print("gguf_agreement " + " ".join(f"{t}={agree[t]}/{len(prompts)}" for t in OUTTYPES))


if __name__ == "__main__":
    main()
