"""Export a model to a stock transformers architecture, back to the legacy checkpoint format, or to GGUF.

--to gpt2       a GPT2LMHeadModel folder (nanoGPT-style models: LayerNorm, learned positions, GELU MLP)
--to llama      a LlamaForCausalLM folder (LLaMA-style models: RMSNorm, rotary positions, SwiGLU MLP)
--to legacy-pt  one .pt file in the layout the original training code loads: nanoGPT's
                {"model_state_dict", "model_args"}, or simple_llama's {"model_state_dict", "config"}
--to gguf       one .gguf file for llama.cpp (llama-server) / Ollama / LM Studio (nanoGPT-style -> llama.cpp's
                gpt2, LLaMA-style -> llama), with the tokenizer, the chat template and NAME.Modelfile for Ollama;
                its tokenizer is checked on the written file (llama.cpp itself when the prebuilt xllamacpp wheel is
                installed: pip install 'hf-sft[llama-cpp]')

The stock folders hold the same weights (same logits), the generation config and the tokenizer, with no model code
and no auto_map: `AutoModelForCausalLM.from_pretrained(DIR)` and serving engines that know only stock architectures
load them without trust_remote_code. A model the target cannot express is refused with the features that prevent it.

--out may not be the model folder or the --check_data file, lie inside them or hold them, whatever the flags. An
existing --out is replaced only with --overwrite (an earlier export to the same target may be rewritten without it,
and so may a Modelfile an earlier GGUF export wrote); the export is written beside it and renamed into place, so
--out never holds half an export, and a GGUF never appears without its Modelfile.

example:
  hf-sft export models/sft --to gpt2 --out models/sft-gpt2
  hf-sft export models/sft-llama --to llama --out models/sft-llama-stock
  hf-sft export models/sft --to legacy-pt --out out/finetune/best_model.pt
  hf-sft export models/sft --to gguf --out models/sft.gguf --outtype q8_0 --check_data data/dolly.jsonl
"""

from __future__ import annotations

import argparse

HELP = "export a model as a stock GPT-2 / LLaMA folder, a legacy nanoGPT / simple_llama checkpoint, or a GGUF"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_sft.export import TARGETS

    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model folder or checkpoint-STEP folder")
    parser.add_argument("--to", required=True, choices=tuple(TARGETS), help="target format")
    parser.add_argument("--out", required=True, help="output folder (gpt2, llama), .pt file (legacy-pt), .gguf file")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out that this export did not write"
    )
    parser.add_argument(
        "--mask_buffers",
        action="store_true",
        help="legacy-pt of a nanoGPT-style model: also write the attn.bias causal masks that nanoGPT saves when "
        "PyTorch lacks flash attention (its load_state_dict then finds every key it expects)",
    )
    gguf = parser.add_argument_group("--to gguf")
    gguf.add_argument("--outtype", default="f32", help="type of the weight matrices: f32 (default), f16, bf16, q8_0")
    gguf.add_argument(
        "--check_data", metavar="PATH", help="also check the tokenizer on these records' prompts and training texts"
    )
    gguf.add_argument(
        "--allow_tokenizer_mismatch", action="store_true", help="write the file even if some checked text differs"
    )


def run(args: argparse.Namespace) -> int:
    """Export and say what was written."""
    from transformers.utils import logging as hf_logging

    from hf_sft.export import export_model

    hf_logging.disable_progress_bar()
    if args.to == "gguf":
        return _run_gguf(args)
    out = export_model(args.model_dir, args.to, args.out, mask_buffers=args.mask_buffers, overwrite=args.overwrite)
    print(f"exported {args.model_dir} to {args.to}: {out}")
    return 0


def _run_gguf(args: argparse.Namespace) -> int:
    from hf_sft.errors import UsageError
    from hf_sft.export.gguf_file import export_gguf

    if args.mask_buffers:
        raise UsageError("--mask_buffers only applies to --to legacy-pt")
    done = export_gguf(
        args.model_dir,
        args.out,
        outtype=args.outtype,
        check_data=args.check_data,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
        overwrite=args.overwrite,
    )
    print(f"exported {args.model_dir} to gguf ({done.arch}, {done.outtype}): {done.path}")
    print(done.check)
    for note in done.notes:
        print(f"note: {note}")
    print(f"Ollama: ollama create NAME -f {done.modelfile}")
    return 0
