"""A prepared split, streamed or map-style: one interface (`streamed`, `dataset`, `source`, `describe`)."""

from collections import Counter
from pathlib import Path

import numpy as np

from hf_sft.data import StreamedSplit, TokenizedSplit, build_datasets, split_line
from hf_sft.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = load_tokenizer(REPO / "tests" / "fixtures" / "tiny_bpe.json")
DATA = str(REPO / "hf_sft" / "demo" / "demo_sample.jsonl")


def test_both_kinds_describe_themselves_without_being_told_apart(tmp_path):
    options = {"max_seq_len": 40, "val_split": 0.2, "seed": 5, "cache_dir": tmp_path}
    mapped, streamed = (
        build_datasets(DATA, TOKENIZER, **options),
        build_datasets(DATA, TOKENIZER, **options, streaming=True),
    )
    assert not mapped.train.streamed and streamed.train.streamed and not streamed.eval.streamed
    assert mapped.train.describe("train").startswith(f"train data: {len(mapped.train.index)} examples from {DATA}; ")
    assert streamed.train.describe("train") == (
        f"train data: streaming 256 records from {DATA}, tokenised as consumed"
    )
    assert streamed.eval.describe("eval") == mapped.eval.describe("eval")
    assert streamed.describe() == [streamed.train.describe("train"), streamed.eval.describe("eval")]
    assert [split_line(role, part) for role, part in (("train", streamed.train), ("eval", streamed.eval))] == (
        streamed.describe()
    )


def test_skipped_records_are_counted_in_the_line():
    empty = np.zeros(0, dtype=np.int64)
    one = TokenizedSplit(None, empty, empty, Counter({"drop:too_long": 2}), Counter({"invalid_json": 1}), source="a")
    assert one.describe("eval") == "eval data: 0 examples from a; dropped: 2 too_long; skipped 1 bad record"
    stream = StreamedSplit(None, "b", 10, Counter({"invalid_json": 2, "missing_field": 1}))
    assert stream.describe("train") == (
        "train data: streaming 10 records from b, tokenised as consumed; skipped 3 bad records"
    )
