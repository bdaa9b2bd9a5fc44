"""The `hf-sft data` report: percentiles, padding waste, masked preview, dump file."""

import doctest
import json
from pathlib import Path

import hf_sft.data.summary as summary_module
from hf_sft.data import build_datasets
from hf_sft.data.summary import padding_fraction, padding_report, percentile, render_preview, summary_lines, write_dump
from hf_sft.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = load_tokenizer(FIXTURES / "tiny_bpe.json")


def test_doctests():
    assert doctest.testmod(summary_module).failed == 0


def test_percentile_and_padding_fraction():
    values = list(range(1, 101))
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 50) == 7
    assert padding_fraction([3, 3, 3, 3], batch_size=2) == 0.0
    assert padding_fraction([1, 3], batch_size=2) == 2 / 6
    assert padding_fraction([1, 3], batch_size=1) == 0.0
    assert padding_fraction([4, 2, 4, 2], batch_size=2, order=[0, 2, 1, 3]) == 0.0
    assert padding_fraction([5], batch_size=1, multiple=8) == 3 / 8


def test_grouping_by_length_wastes_less_than_shuffling():
    lengths = [(i * 37) % 200 + 10 for i in range(400)]
    figures = dict(padding_report(lengths, batch_size=8))
    assert figures["padding-free packing"] == 0.0
    assert figures["dynamic padding, grouped by length"] < figures["dynamic padding, shuffled"] / 3
    assert figures["dynamic padding, shuffled, multiple of 8"] >= figures["dynamic padding, shuffled"]


def test_preview_marks_the_supervised_tokens():
    ids = TOKENIZER("[BOS] Instruction: Hi Response: Tope[EOS]", add_special_tokens=False)["input_ids"]
    n_supervised = len(TOKENIZER(" Tope[EOS]", add_special_tokens=False)["input_ids"])
    labels = [-100] * (len(ids) - n_supervised) + ids[-n_supervised:]
    text, boundary = render_preview(TOKENIZER, ids, labels)
    assert text == "[BOS] Instruction: Hi Response:[[ Tope[EOS]]]"
    assert boundary.endswith("':' | 'ĠTope' '[EOS]'")
    coloured, _ = render_preview(TOKENIZER, ids, labels, color=True)
    assert coloured == "\033[2m[BOS] Instruction: Hi Response:\033[0m\033[32m Tope[EOS]\033[0m"


def test_summary_and_dump(tmp_path):
    split = build_datasets(FIXTURES / "tiny_sft.jsonl", TOKENIZER, max_seq_len=30, cache_dir=tmp_path).train
    lines = summary_lines(split, 30, "drop", batch_size=4)
    assert lines[0] == "records: 6 read, 0 bad records skipped"
    n_dropped = sum(split.dropped.values())
    assert lines[1] == f"examples: {6 - n_dropped} kept, {n_dropped} dropped (max_seq_len 30, length policy drop)"
    assert any(line.startswith("tokens per example: min ") for line in lines)
    assert "padding waste at batch size 4:" in lines
    supervised = sum(label != -100 for row in split.dataset["labels"] for label in row)
    assert split.supervised_tokens == supervised > 0  # counted as the examples were tokenised
    assert any(line.startswith(f"tokens: {sum(split.lengths)} in all, {supervised} supervised") for line in lines)
    path = tmp_path / "dump.jsonl"
    assert write_dump(path, split) == len(split.index)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["index"] for row in rows] == split.index.tolist()
    assert [row["input_ids"] for row in rows] == split.dataset["input_ids"]
    assert all(set(row) == {"index", "input_ids", "labels"} for row in rows)
