"""Turn a pretraining checkpoint and its tokenizer into a Hugging Face model folder.

Accepted checkpoints: nanoGPT `train.py` (`ckpt.pt`), `finetune_gpt.py` (`best_model.pt`) and simple_llama (`.pth`);
`_orig_mod.` (torch.compile) and `module.` (DDP) key prefixes are removed. The file is read without running any code
it contains, so the original training code does not need to be installed.

The folder holds config.json, model.safetensors, generation_config.json, the tokenizer and the model code: it loads
with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` even where hf_sft is not installed.

--out may not be the checkpoint or the tokenizer, or hold them, whatever the flags, nor lie under a regular file or on
a read-only file system. A non-empty --out that an earlier conversion did not
write (a training run's folder, say) is refused unless --overwrite, which replaces it whole: the folder then holds
exactly the converted model. It is written beside --out and renamed into place, never half-written.

example:
  hf-sft convert --checkpoint out/pretrain/best_model.pt --tokenizer data/tokenizer/custom_gpt_tokenizer.json \\
      --out models/base
  hf-sft convert --checkpoint ckpt.pth --tokenizer bpe_8k.json --out models/base \\
      --bos_token '<SOS>' --eos_token '<EOS>' --pad_token '<PAD>' --unk_token '<UNK>'
"""

from __future__ import annotations

import argparse

HELP = "convert a nanoGPT / finetune_gpt.py / simple_llama checkpoint into a HF model folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="legacy checkpoint (.pt / .pth)")
    parser.add_argument("--tokenizer", required=True, help="`tokenizers` JSON file (or HF tokenizer folder)")
    parser.add_argument("--out", required=True, help="output folder (created; see --overwrite)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out that an earlier hf-sft convert did not write (everything in it goes)",
    )
    parser.add_argument("--bos_token", default=None, help="beginning-of-sequence token [default: [BOS]]")
    parser.add_argument("--eos_token", default=None, help="end-of-sequence token [default: [EOS]]")
    parser.add_argument("--pad_token", default=None, help="padding token [default: [PAD], else the EOS token]")
    parser.add_argument("--unk_token", default=None, help="unknown token [default: [UNK] when present]")
    parser.add_argument(
        "--allow_vocab_mismatch",
        action="store_true",
        help="accept a tokenizer smaller than the checkpoint's embedding beyond its padding rule",
    )


def run(args: argparse.Namespace) -> int:
    """Convert, save and print a short summary."""
    from transformers.utils import logging as hf_logging

    from hf_sft.legacy import SOURCES, convert_to_folder

    hf_logging.disable_progress_bar()  # stderr carries errors only

    model, tokenizer, source = convert_to_folder(
        args.checkpoint,
        args.tokenizer,
        args.out,
        bos_token=args.bos_token,
        eos_token=args.eos_token,
        pad_token=args.pad_token,
        unk_token=args.unk_token,
        allow_vocab_mismatch=args.allow_vocab_mismatch,
        overwrite=args.overwrite,
    )
    config = model.config
    print(f"converted {args.checkpoint} ({SOURCES[source]}, {config.family} family)")
    print(f"  parameters: {model.num_parameters():,}")
    print(f"  layers: {config.num_hidden_layers}, heads: {config.num_attention_heads}, width: {config.hidden_size}")
    print(f"  vocab: {config.vocab_size} (tokenizer: {len(tokenizer)})")
    specials = ", ".join(f"{name} {tok!r}" for name, tok in tokenizer.special_tokens_map.items())
    print(f"  special tokens: {specials}")
    print(f"  saved to: {args.out}")
    return 0
