"""build_datasets: model columns, counted drops, held-out splits (small: no evaluation), caching, processes."""

import json
import logging
from pathlib import Path

import datasets
import pytest
from transformers.trainer_pt_utils import LengthGroupedSampler

from hf_sft.data import MODEL_COLUMNS, Encoder, build_datasets
from hf_sft.data.pipeline import tokenization_fingerprint
from hf_sft.data.template import DEFAULT_FORMAT
from hf_sft.errors import UsageError
from hf_sft.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "tiny_sft.jsonl"
TOKENIZER = load_tokenizer(FIXTURES / "tiny_bpe.json")


def many_records(tmp_path: Path, n: int = 40) -> Path:
    path = tmp_path / "many.jsonl"
    rows = [
        {"instruction": f"Give me number {i}.", "context": "Numbers 1 2 3." * (i % 4), "response": f"{i}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_trainer_gets_exactly_the_model_columns(tmp_path):
    data = build_datasets(DATA, TOKENIZER, cache_dir=tmp_path)
    split = data.train
    assert split.dataset.column_names == list(MODEL_COLUMNS) and data.eval is None
    assert split.index.tolist() == list(range(6)) and split.status == {"ok": 6} and split.dropped == {}
    assert split.lengths.tolist() == [len(row["input_ids"]) for row in split.dataset]
    # v5 length grouping (train_sampling_strategy="group_by_length") measures input_ids itself.
    assert LengthGroupedSampler(2, dataset=split.dataset).lengths == split.lengths.tolist()


def test_drops_are_counted_and_rows_keep_their_record_index(tmp_path):
    full = build_datasets(DATA, TOKENIZER, cache_dir=tmp_path).train
    limit = sorted(full.lengths)[3]
    split = build_datasets(DATA, TOKENIZER, max_seq_len=limit, cache_dir=tmp_path).train
    kept = [i for i, n in enumerate(full.lengths) if n <= limit]
    assert split.index.tolist() == kept and split.dropped == {"too_long": 6 - len(kept)}
    assert [row["input_ids"] for row in split.dataset] == [full.dataset[i]["input_ids"] for i in kept]


def test_a_dataset_with_nothing_to_train_on_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"no training example .* \(too_long: 6\)"):
        build_datasets(DATA, TOKENIZER, max_seq_len=5, cache_dir=tmp_path)
    with pytest.raises(UsageError, match=r"no_supervised_tokens: 6"):
        build_datasets(DATA, TOKENIZER, max_seq_len=5, length_policy="truncate", cache_dir=tmp_path)


def test_val_split_is_deterministic_under_the_seed(tmp_path):
    path = many_records(tmp_path)
    first = build_datasets(path, TOKENIZER, val_split=0.25, seed=1, cache_dir=tmp_path)
    again = build_datasets(path, TOKENIZER, val_split=0.25, seed=1, cache_dir=tmp_path)
    other = build_datasets(path, TOKENIZER, val_split=0.25, seed=2, cache_dir=tmp_path)
    assert len(first.eval.index) == 10 and len(first.train.index) == 30
    assert sorted([*first.train.index, *first.eval.index]) == list(range(40))
    assert first.eval.index.tolist() == again.eval.index.tolist()
    assert first.train.index.tolist() == again.train.index.tolist()
    assert set(first.eval.index) != set(other.eval.index)
    assert first.eval.dataset.column_names == list(MODEL_COLUMNS)


def test_eval_file_and_option_errors(tmp_path):
    data = build_datasets(many_records(tmp_path), TOKENIZER, eval_data_path=DATA, cache_dir=tmp_path)
    assert len(data.train.index) == 40 and data.eval.index.tolist() == list(range(6)) and data.eval.source == str(DATA)
    with pytest.raises(UsageError, match="not both"):
        build_datasets(DATA, TOKENIZER, val_split=0.1, eval_data_path=DATA, cache_dir=tmp_path)
    with pytest.raises(UsageError, match=r"--val_split must be in \[0, 1\)"):
        build_datasets(DATA, TOKENIZER, val_split=1.5, cache_dir=tmp_path)
    with pytest.raises(UsageError, match="unknown length policy"):
        build_datasets(DATA, TOKENIZER, length_policy="squeeze", cache_dir=tmp_path)


def test_tokenisation_is_cached_and_the_fingerprint_is_stable(tmp_path):
    first = build_datasets(DATA, TOKENIZER, cache_dir=tmp_path).train.dataset
    cache_files = [Path(f["filename"]) for f in first.cache_files]
    stamps = [f.stat().st_mtime_ns for f in cache_files]
    second = build_datasets(DATA, load_tokenizer(FIXTURES / "tiny_bpe.json"), cache_dir=tmp_path).train.dataset
    assert [Path(f["filename"]) for f in second.cache_files] == cache_files
    assert [f.stat().st_mtime_ns for f in cache_files] == stamps  # reused, not rewritten
    fingerprints = {
        tokenization_fingerprint(
            "parent", Encoder.from_tokenizer(load_tokenizer(FIXTURES / "tiny_bpe.json")), DEFAULT_FORMAT, 64, "drop"
        )
        for _ in range(2)
    }
    assert len(fingerprints) == 1
    assert (
        tokenization_fingerprint("parent", Encoder.from_tokenizer(TOKENIZER), DEFAULT_FORMAT, 65, "drop")
        not in fingerprints
    )


def test_two_processes_give_the_same_examples(tmp_path):
    path = many_records(tmp_path)
    one = build_datasets(path, TOKENIZER, max_seq_len=20, cache_dir=tmp_path / "one").train
    two = build_datasets(path, TOKENIZER, max_seq_len=20, num_proc=2, cache_dir=tmp_path / "two").train
    assert one.dropped and two.status == one.status and two.index.tolist() == one.index.tolist()
    assert two.dataset.to_list() == one.dataset.to_list()


def test_characters_the_tokenizer_drops_are_reported(tmp_path, caplog):
    spec = json.loads((FIXTURES / "tiny_bpe.json").read_text())
    del spec["model"]["vocab"]["Ã"]
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "Ã" not in str(m)]
    (tmp_path / "tok.json").write_text(json.dumps(spec))
    (tmp_path / "data.jsonl").write_text(
        '{"instruction": "Say café.", "output": "café"}\n{"instruction": "Say hi.", "output": "hi"}\n'
    )
    with caplog.at_level(logging.WARNING, logger="hf_sft.data.pipeline"):
        split = build_datasets(
            tmp_path / "data.jsonl", load_tokenizer(tmp_path / "tok.json"), cache_dir=tmp_path
        ).train
    assert split.lost_characters == "é" and split.records_losing_characters == 1
    assert "1 training records contain characters the tokenizer cannot represent" in caplog.text


# The held-out evaluation split of a small file falls back to no evaluation, with a warning, instead of failing.


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
