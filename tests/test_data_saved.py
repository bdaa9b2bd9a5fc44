"""Tokenise once: `hf-sft data --save_to` then `hf-sft train --data_path DIR` reuses it untokenised, or refuses it."""

import json
import shutil
from pathlib import Path

import pytest

import hf_sft.data.pipeline as pipeline
from hf_sft.cli import main
from hf_sft.data.masking import Encoder
from hf_sft.data.saved import MANIFEST

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "tests" / "fixtures" / "tiny_bpe.json")
DATA = str(REPO / "hf_sft" / "demo" / "demo_sample.jsonl")
DATA_FLAGS = ["--tokenizer_path", TOKENIZER, "--max_seq_len", "40", "--val_split", "0.1", "--seed", "7"]
TRAIN = [
    "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "128",
    "--learning_rate", "1e-3", "--batch_size", "4", "--gradient_accumulation_steps", "1", "--max_iters", "3",
    "--save_interval", "3", "--eval_steps", "1000", "--sample_max_new_tokens", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tokenised"
    assert main(["data", "--data_path", DATA, *DATA_FLAGS, "--save_to", str(folder)]) == 0
    return folder


def forbid_tokenisation(monkeypatch) -> list[str]:
    """Every way into tokenisation raises; returns the list of calls attempted (none expected)."""
    calls: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return call

    monkeypatch.setattr(pipeline, "tokenize_records", refuse("tokenize_records"))
    monkeypatch.setattr(pipeline, "tokenize_and_mask", refuse("tokenize_and_mask"))
    for method in ("encode_prompts", "encode_responses", "encode_continuations"):
        monkeypatch.setattr(Encoder, method, refuse(f"Encoder.{method}"))
    return calls


def test_the_saved_folder_holds_the_splits_and_their_counts(saved, tmp_path, capsys):
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["settings"]["max_seq_len"] == 40 and manifest["settings"]["format"] == "seed"
    assert manifest["sources"][0]["path"] == DATA and len(manifest["sources"][0]["sha256"]) == 64
    assert set(manifest["splits"]) == {"train", "eval"}
    assert main(["data", "--data_path", DATA, *DATA_FLAGS]) == 0
    from_source = capsys.readouterr().out
    assert main(["data", "--data_path", str(saved), *DATA_FLAGS]) == 0
    from_saved = capsys.readouterr().out
    # The same report (counts, drops, lengths, padding, preview) from the folder as from the source.
    assert from_saved == from_source
    # A folder saved before its manifest recorded the supervised tokens: counted from its labels, the same figure.
    older = shutil.copytree(saved, tmp_path / "older")
    for split in manifest["splits"].values():
        split.pop("supervised_tokens")
    (older / MANIFEST).write_text(json.dumps(manifest))
    assert main(["data", "--data_path", str(older), *DATA_FLAGS]) == 0
    assert capsys.readouterr().out == from_source.replace(str(saved), str(older))


def test_training_reuses_the_saved_folder_without_tokenising(saved, tmp_path, monkeypatch):
    calls = forbid_tokenisation(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", *TRAIN, *DATA_FLAGS, "--data_path", str(saved), "--out_dir", str(out)]) == 0
    assert calls == []
    log = (out / "train.log").read_text()
    manifest = json.loads((saved / MANIFEST).read_text())
    assert f"train data: {manifest['splits']['train']['examples']} examples from {DATA}" in log


@pytest.mark.parametrize(
    ("flags", "difference"),
    [
        (["--max_seq_len", "64"], "--max_seq_len 40 (this run: 64)"),
        (["--template", "alpaca"], "--template seed (this run: alpaca); the prompt format's text (sha256) {}"),
        (["--tokenizer_path", "OTHER"], "the tokenizer (fingerprint) {}"),
    ],
    ids=["max_seq_len", "format", "tokenizer"],
)
def test_a_saved_folder_tokenised_differently_is_refused(saved, tmp_path, capsys, flags, difference):
    from hf_sft.data import DataArguments
    from hf_sft.data.saved import run_settings
    from hf_sft.data.template import get_format
    from hf_sft.tokenizer import load_tokenizer

    if "OTHER" in flags:  # the same tokenizer with two token ids swapped: other ids for the same text
        spec = json.loads(Path(TOKENIZER).read_text())
        vocab = spec["model"]["vocab"]
        first, second = sorted(vocab, key=vocab.get)[10:12]
        vocab[first], vocab[second] = vocab[second], vocab[first]
        (tmp_path / "other.json").write_text(json.dumps(spec))
        flags = ["--tokenizer_path", str(tmp_path / "other.json")]
    argv = ["train", *TRAIN, *DATA_FLAGS, *flags, "--data_path", str(saved), "--out_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    saved_settings = json.loads((saved / MANIFEST).read_text())["settings"]
    template = get_format(flags[1] if flags[0] == "--template" else "seed")
    tokenizer = load_tokenizer(flags[1] if flags[0] == "--tokenizer_path" else TOKENIZER)
    max_len = int(flags[1]) if flags[0] == "--max_seq_len" else 40
    now = run_settings(tokenizer, template, DataArguments(), max_seq_len=max_len, val_split=0.1, seed=7)
    if "{}" in difference:
        key = "tokenizer" if flags[0] == "--tokenizer_path" else "format_sha256"
        difference = difference.format(f"{saved_settings[key][:12]} (this run: {now[key][:12]})")
    assert err.strip().splitlines()[-1] == (
        f"error: --data_path {saved} was tokenised for another run: {difference}. Tokenise it again with this run's "
        f"flags (hf-sft data ... --save_to {saved} --overwrite) or train with the same ones"
    )
    assert not (tmp_path / "run").exists()  # refused before the run folder is claimed


def test_save_to_is_checked_before_any_work(saved, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["data", "--data_path", DATA, *DATA_FLAGS, "--save_to", str(taken)]) == 2
    assert "--save_to" in capsys.readouterr().err and (taken / "notes.txt").read_text() == "mine"
    # Its own earlier output is replaced without --overwrite.
    assert main(["data", "--data_path", DATA, *DATA_FLAGS, "--max_seq_len", "60", "--save_to", str(saved)]) == 0
    assert json.loads((saved / MANIFEST).read_text())["settings"]["max_seq_len"] == 60
    assert main(["data", "--data_path", DATA, *DATA_FLAGS, "--save_to", str(saved)]) == 0  # back as the fixture was


def test_a_token_id_beyond_the_vocabulary_is_refused_before_step_1(saved, tmp_path, capsys):
    """A saved folder holding an id the model has no embedding for failed with an IndexError at step 1."""
    import datasets

    from hf_sft.tokenizer import load_tokenizer

    folder = tmp_path / "beyond"
    loaded = datasets.load_from_disk(str(saved))
    big = 99_999
    loaded["train"] = loaded["train"].map(lambda row: {"input_ids": [big, *row["input_ids"][1:]]})  # every batch
    loaded.save_to_disk(str(folder))
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["files"] = {  # a folder that verifies: only its ids are wrong
        p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "run"
    assert main(["train", *TRAIN, *DATA_FLAGS, "--data_path", str(folder), "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    size = len(load_tokenizer(TOKENIZER))
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: --data_path {folder}: its train split holds token id {big} in input_ids; the tokenizer has {size} "
        f"tokens (ids 0 to {size - 1}): the model has no embedding for it"
    )
    assert not out.exists()  # refused before the run folder is claimed, so before step 1


@pytest.mark.parametrize("damage", ["cut", "removed"])
def test_a_saved_folder_changed_after_it_was_saved_is_refused(saved, tmp_path, capsys, damage):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    name = next(n for n in manifest["files"] if n.startswith("train/") and n.endswith(".arrow"))
    if damage == "cut":
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        what = f"{name} is {len(data) // 2} bytes, {MANIFEST} records {len(data)}"
    else:
        (folder / name).unlink()
        what = f"{name} is missing"
    assert main(["data", "--data_path", str(folder), *DATA_FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"error: --data_path {folder}: {what}: it was changed or cut short after it was saved; write it again "
        f"(hf-sft data ... --save_to {folder} --overwrite)"
    )
