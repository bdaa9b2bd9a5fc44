"""Export a model to a stock transformers architecture, or back to the legacy checkpoint format.

--to gpt2       a GPT2LMHeadModel folder (nanoGPT-style models: LayerNorm, learned positions, GELU MLP)
--to llama      a LlamaForCausalLM folder (LLaMA-style models: RMSNorm, rotary positions, SwiGLU MLP)
--to legacy-pt  one .pt file in the layout the original training code loads: nanoGPT's
                {"model_state_dict", "model_args"}, or simple_llama's {"model_state_dict", "config"}

The stock folders hold the same weights (same logits), the generation config and the tokenizer, with no model code
and no auto_map: `AutoModelForCausalLM.from_pretrained(DIR)` and serving engines that know only stock architectures
load them without trust_remote_code. A model the target cannot express is refused with the features that prevent it.

--out may not be the model folder, lie inside it or hold it. An existing --out is replaced only with --overwrite
(an earlier export to the same target may be rewritten without it); the export is written beside it and renamed
into place, so --out never holds half an export.

example:
  hf-sft export models/sft --to gpt2 --out models/sft-gpt2
  hf-sft export models/sft-llama --to llama --out models/sft-llama-stock
  hf-sft export models/sft --to legacy-pt --out out/finetune/best_model.pt
"""

from __future__ import annotations

import argparse

HELP = "export a model as a stock GPT-2 / LLaMA folder, or as a legacy nanoGPT / simple_llama checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_sft.export import TARGETS

    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model folder or checkpoint-STEP folder")
    parser.add_argument("--to", required=True, choices=tuple(TARGETS), help="target format")
    parser.add_argument("--out", required=True, help="output folder (gpt2, llama) or .pt file (legacy-pt)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out that this export did not write"
    )
    parser.add_argument(
        "--mask_buffers",
        action="store_true",
        help="legacy-pt of a nanoGPT-style model: also write the attn.bias causal masks that nanoGPT saves when "
        "PyTorch lacks flash attention (its load_state_dict then finds every key it expects)",
    )


def run(args: argparse.Namespace) -> int:
    """Export and say what was written."""
    from transformers.utils import logging as hf_logging

    from hf_sft.export import export_model

    hf_logging.disable_progress_bar()
    out = export_model(args.model_dir, args.to, args.out, mask_buffers=args.mask_buffers, overwrite=args.overwrite)
    print(f"exported {args.model_dir} to {args.to}: {out}")
    return 0
