"""`hf-sft data` end to end: report sections, dump file, preview choice, options, the same counts as training."""

import json
import re
from itertools import groupby
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hf_sft.cli import main
from hf_sft.data.masking import IGNORE_INDEX
from hf_sft.data.template import FORMATS, format_of, prompt_text
from hf_sft.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
DEMO_DATA = Path(__file__).resolve().parents[1] / "hf_sft" / "demo" / "demo_sample.jsonl"
SIMPLE_LLAMA_FLAGS = ["--bos_token", "<SOS>", "--eos_token", "<EOS>", "--pad_token", "<PAD>", "--unk_token", "<UNK>"]


def test_data_command_on_the_tiny_fixture(tmp_path, capsys):
    dump = tmp_path / "dump.jsonl"
    argv = [
        "data",
        "--data_path",
        str(FIXTURES / "tiny_sft.jsonl"),
        "--tokenizer_path",
        str(FIXTURES / "tiny_bpe.json"),
        "--val_split",
        "0",
    ]
    status = main(
        [*argv, "--cache_dir", str(tmp_path), "--dump", str(dump), "--preview_index", "1", "--batch_size", "2"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "records: 6 read, 0 bad records skipped" in out and "examples: 6 kept, 0 dropped" in out
    assert "padding waste at batch size 2:" in out and "padding-free packing" in out
    assert "preview of record 1 (supervised tokens between [[ and ]]):" in out
    assert "[BOS] Instruction: Which is a fish? Input: Tope or Rope Response:[[ Tope[EOS]]]" in out
    assert f"wrote 6 examples to {dump}" in out
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(6))
    assert rows[1]["labels"][-2:] == rows[1]["input_ids"][-2:] and rows[1]["labels"][0] == IGNORE_INDEX


def test_data_command_on_dolly_with_simple_llama(shared_dir, tmp_path, capsys):
    data = shared_dir / "data" / "dolly" / "dolly_sample.jsonl"
    tokenizer = shared_dir / "data" / "tokenizers" / "simple_llama_bpe_8k.json"
    dump = tmp_path / "dump.jsonl"
    argv = [
        "data",
        "--data_path",
        str(data),
        "--tokenizer_path",
        str(tokenizer),
        *SIMPLE_LLAMA_FLAGS,
        "--val_split",
        "0",
    ]
    status = main([*argv, "--max_seq_len", "256", "--dump", str(dump), "--cache_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    kept = len(rows)
    assert f"examples: {kept} kept, {198 - kept} dropped (max_seq_len 256, length policy drop)" in out
    assert f"  dropped, too_long: {198 - kept}" in out
    assert "warning: 43 records contain characters the tokenizer cannot represent and drops: '\\t' '{'" in out
    assert all(len(row["input_ids"]) <= 256 and row["input_ids"][0] == 0 and row["labels"][-1] == 1 for row in rows)
    first = json.loads(data.read_text().splitlines()[rows[0]["index"]])
    assert prompt_text(first["instruction"], first["context"], bos_token="<SOS>") in out  # the preview


def test_data_command_rejects_bad_options(tmp_path, capsys):
    argv = [
        "data",
        "--data_path",
        str(FIXTURES / "tiny_sft.jsonl"),
        "--tokenizer_path",
        str(FIXTURES / "tiny_bpe.json"),
    ]
    assert main([*argv, "--cache_dir", str(tmp_path), "--preview_index", "99"]) == 2
    assert "--preview_index 99 is not a kept example" in capsys.readouterr().err
    assert main([*argv, "--batch_size", "0"]) == 2
    assert main([*argv, "--length_policy", "squeeze"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: argument --length_policy")


def _data_lines(output: str) -> list[str]:
    return re.findall(r"(?:train|eval) data: \d+ examples .*", output)


def test_data_and_train_report_the_same_counts_for_the_same_flags(tmp_path, capsys):
    """New model (its --block_size cuts records), then a saved model folder whose positions cut them."""
    data_flags = ["--data_path", str(DEMO_DATA), "--tokenizer_path", str(FIXTURES / "tiny_bpe.json")]
    data_flags += ["--val_split", "0.1", "--length_policy", "drop"]
    new_model = ["--block_size", "40", "--n_layer", "1", "--n_head", "2", "--n_embd", "16"]
    train_flags = ["--device", "cpu", "--max_iters", "1", "--save_interval", "100", "--eval_interval", "100"]
    for model_flags in (new_model, None):
        if model_flags is None:  # the folder just trained: 40 positions, read from its config.json
            model_flags = ["--pretrained_ckpt_path", str(tmp_path / "new")]
        assert main(["data", *data_flags, *model_flags, "--cache_dir", str(tmp_path / "cache")]) == 0
        reported = _data_lines(capsys.readouterr().out)
        out = tmp_path / ("new" if model_flags is new_model else "folder")
        assert main(["train", *data_flags, *model_flags, *train_flags, "--out_dir", str(out)]) == 0
        logged = _data_lines((out / "train.log").read_text())
        assert reported == logged and len(logged) == 2
        assert "train data: " in logged[0] and "too_long" in logged[0]  # the model's positions did cut records


@pytest.mark.parametrize("name", ["chatml", "seed"])
def test_a_multi_turn_messages_file_trains_on_the_assistant_turns_only(tmp_path, capsys, name):
    records = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()[:24]]
    path = tmp_path / "chat.jsonl"
    with path.open("w") as out:
        for start in range(0, len(records), 2):
            turns = [{"role": "system", "content": "Answer in one sentence."}]
            for record in records[start : start + 2]:
                turns += [{"role": "user", "content": record["instruction"]}]
                turns += [{"role": "assistant", "content": record["response"]}]
            out.write(json.dumps({"messages": turns}) + "\n")
    flags = ["--data_path", str(path), "--tokenizer_path", str(FIXTURES / "tiny_bpe.json"), "--template", name]
    flags += ["--val_split", "0", "--block_size", "512", "--n_layer", "1", "--n_head", "2", "--n_embd", "16"]
    dump = tmp_path / "dump.jsonl"
    assert main(["data", *flags, "--dump", str(dump), "--cache_dir", str(tmp_path / "c")]) == 0
    assert "examples: 12 kept, 0 dropped" in capsys.readouterr().out
    tokenizer = load_tokenizer(FIXTURES / "tiny_bpe.json")
    conversations = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    for row in map(json.loads, dump.read_text().splitlines()):
        pairs = zip(row["input_ids"], row["labels"], strict=True)
        runs = [[t for t, _ in run] for on, run in groupby(pairs, lambda p: p[1] != IGNORE_INDEX) if on]
        answers = [turn["content"] for turn in conversations[row["index"]] if turn["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in runs] == [FORMATS[name].response_text(a) + "[EOS]" for a in answers]
    train = ["--device", "cpu", "--max_iters", "2", "--save_interval", "100", "--out_dir", str(tmp_path / "run")]
    assert main(["train", *flags, *train]) == 0
    assert "train data: 12 examples" in (tmp_path / "run" / "train.log").read_text()
    assert format_of(AutoTokenizer.from_pretrained(tmp_path / "run")) is FORMATS[name]


def test_a_dump_cut_short_leaves_the_earlier_file_whole(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from hf_sft.data import summary

    dump = tmp_path / "dump.jsonl"
    dump.write_text("the earlier dump\n")
    written = []

    def dumps(value, **kwargs):
        written.append(value)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        return json.dumps(value, **kwargs)

    monkeypatch.setattr(summary, "json", SimpleNamespace(dumps=dumps))
    argv = ["data", "--data_path", str(FIXTURES / "tiny_sft.jsonl")]
    argv += ["--tokenizer_path", str(FIXTURES / "tiny_bpe.json")]
    argv += ["--val_split", "0", "--cache_dir", str(tmp_path / "cache"), "--dump", str(dump), "--overwrite"]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: cannot write {dump}: no space left on device"
    assert dump.read_text() == "the earlier dump\n"  # on main: opened for writing, two lines, then the error
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf_sft-")] == []
