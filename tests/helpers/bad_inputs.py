"""Broken inputs for the bad-input tests: model folders, checkpoints and tokenizers that are wrong in one way each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_bpe.json"
# name -> how a copy of a good model folder is broken
BROKEN_FOLDERS = {
    "no_config": lambda folder: (folder / "config.json").unlink(),
    "bad_config": lambda folder: (folder / "config.json").write_text("{not json"),
    "bad_values": lambda folder: _edit_config(folder, num_attention_heads=5),  # width 32 over 5 heads
    "no_weights": lambda folder: (folder / "model.safetensors").unlink(),
    "cut_weights": lambda folder: _cut(folder / "model.safetensors", 100),
    "bad_tokenizer": lambda folder: (folder / "tokenizer.json").write_text("garbage"),
    "bad_tokenizer_config": lambda folder: (folder / "tokenizer_config.json").write_text("{bad"),
}


def build_bad_inputs(root: Path) -> Path:
    """A good model folder `root/model`, each of BROKEN_FOLDERS beside it, and broken files."""
    from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
    from hf_sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = HfSftGPTConfig(
        family="nanogpt", vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **ids
    )
    torch.manual_seed(0)
    HfSftGPTForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for name, breaks in BROKEN_FOLDERS.items():
        shutil.copytree(root / "model", root / name)
        breaks(root / name)
    (root / "garbage.json").write_text("garbage")
    (root / "empty.pt").write_bytes(b"")
    (root / "tokenizer_dir").mkdir()
    shutil.copy(root / "model" / "tokenizer.json", root / "tokenizer_dir" / "tokenizer.json")
    (root / "tokenizer_dir" / "tokenizer_config.json").write_text("{bad")
    return root


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])
