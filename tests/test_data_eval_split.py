"""The held-out evaluation split of a small file falls back to no evaluation, with a warning, instead of failing."""

import json
import logging
from pathlib import Path

import datasets
import pytest

from hf_sft.data import build_datasets
from hf_sft.errors import UsageError
from hf_sft.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = load_tokenizer(FIXTURES / "tiny_bpe.json")


def write_records(path: Path, long_rows: set[int], n: int) -> Path:
    rows = [
        {"instruction": f"Say {i}.", "response": ("a long answer " * 40) if i in long_rows else f"{i}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def held_out_rows(n: int, val_split: float, seed: int) -> set[int]:
    # The split depends only on the number of records and the seed, not on their content.
    return set(datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(val_split, seed=seed)["test"]["i"])


def test_held_out_records_that_are_all_dropped_mean_no_evaluation(tmp_path, caplog):
    held_out = held_out_rows(60, 0.05, seed=3)
    path = write_records(tmp_path / "small.jsonl", held_out, n=60)
    with caplog.at_level(logging.WARNING, logger="hf_sft.data.pipeline"):
        data = build_datasets(path, TOKENIZER, max_seq_len=64, val_split=0.05, seed=3, cache_dir=tmp_path / "c")
    assert data.eval is None and len(data.train.index) == 57
    assert f"no evaluation example is left in {path} (held out) (too_long: 3): training without evaluation" in (
        caplog.text
    )


def test_too_few_records_for_a_split_train_on_all(tmp_path, caplog):
    path = write_records(tmp_path / "one.jsonl", set(), n=1)
    with caplog.at_level(logging.WARNING, logger="hf_sft.data.pipeline"):
        data = build_datasets(path, TOKENIZER, val_split=0.05, cache_dir=tmp_path / "c")
    assert data.eval is None and data.train.index.tolist() == [0]
    assert "--val_split 0.05 of 1 records leaves no evaluation record: training on all of them, no evaluation" in (
        caplog.text
    )


def test_an_explicit_evaluation_file_with_nothing_left_is_still_refused(tmp_path):
    train = write_records(tmp_path / "train.jsonl", set(), n=4)
    evaluation = write_records(tmp_path / "eval.jsonl", {0, 1}, n=2)
    with pytest.raises(UsageError, match=r"no evaluation example with a supervised token is left in .*eval.jsonl"):
        build_datasets(train, TOKENIZER, max_seq_len=64, eval_data_path=evaluation, cache_dir=tmp_path / "c")


def test_training_on_a_small_file_runs_without_evaluation(tmp_path, capsys):
    from hf_sft.cli import main

    path = write_records(tmp_path / "small.jsonl", held_out_rows(60, 0.05, seed=0), n=60)
    out = tmp_path / "out"
    flags = ["--data_path", str(path), "--tokenizer_path", str(FIXTURES / "tiny_bpe.json"), "--out_dir", str(out)]
    flags += ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "64"]
    flags += ["--max_seq_len", "64", "--seed", "0", "--max_iters", "1", "--save_interval", "100"]
    assert main(["train", *flags]) == 0  # the default --val_split 0.05 holds out the 3 over-long records
    log = (out / "train.log").read_text()
    assert "no evaluation example is left" in log and "training without evaluation" in log
    assert "eval_loss" not in log and (out / "model.safetensors").is_file()
