"""Tiny model folders, grouped instruction records and the hand-computed figures the `hf-sft eval` tests check."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_bpe.json"
DEMO = Path(__file__).resolve().parents[2] / "hf_sft" / "demo" / "demo_sample.jsonl"
NO_GROUP = "(no group)"


def tiny_folder(folder: Path, family: str, seed: int = 0, max_positions: int = 128) -> Path:
    """A random-weight model folder of `family` with the tiny tokenizer and the seed prompt format."""
    from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
    from hf_sft.data import FORMATS, install_chat_template
    from hf_sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(seed)
    config = HfSftGPTConfig(
        family=family,
        vocab_size=400,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        **ids,
    )
    model = HfSftGPTForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # peaked logits: greedy answers without near-ties
    install_chat_template(tokenizer, FORMATS["seed"])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_records(path: Path, seed: int, n: int = 40, group_field: str = "category") -> Path:
    """`n` demo records drawn under `seed`; about a fifth lose their group field, a few blank lines in between."""
    rng = random.Random(seed)
    pool = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = []
    for record in rng.sample(pool, n):
        group = record.pop("category")
        if rng.random() > 0.2:
            record[group_field] = group
        lines.append(json.dumps(record))
        if rng.random() < 0.1:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record_groups(path: Path, group_field: str = "category") -> list[str]:
    """The group of each record of a JSON-lines file, in order (blank lines are not records)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [record.get(group_field) or NO_GROUP for record in records]


@torch.no_grad()
def hand_figures(folder: Path, data_path: Path, max_seq_len: int, group_field: str = "category") -> dict:
    """Loss, perplexity, accuracy and token counts computed one record at a time: logits, shift, mask, mean.

    The records are tokenised and masked by the data pipeline (as training does); everything after is by hand.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_sft.data import build_datasets, format_of

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    split = build_datasets(data_path, tokenizer, template=format_of(tokenizer), max_seq_len=max_seq_len).train
    groups = record_groups(data_path, group_field)
    sums = defaultdict(lambda: [0.0, 0, 0, 0])  # loss, tokens, correct, examples
    for row, index in enumerate(split.index):
        example = split.dataset[row]
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor(example["labels"])
        logits = model(ids).logits[0, :-1].double()
        targets = labels[1:]
        keep = targets != -100
        loss = F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        correct = (logits[keep].argmax(-1) == targets[keep]).sum().item()
        for name in ("all", groups[index]):
            total = sums[name]
            total[0] += loss
            total[1] += int(keep.sum())
            total[2] += correct
            total[3] += 1
    return {
        name: {
            "loss": loss / tokens,
            "perplexity": math.exp(loss / tokens),
            "accuracy": correct / tokens,
            "tokens": tokens,
            "examples": examples,
        }
        for name, (loss, tokens, correct, examples) in sums.items()
    }
