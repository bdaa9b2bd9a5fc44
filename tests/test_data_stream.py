"""--streaming: the map-style run's examples, order and losses, bad records as map-style, resume without re-reading."""

import dataclasses
import gzip
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import hf_sft.data.stream as stream_module
from hf_sft.cli import main
from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
from hf_sft.data import build_datasets, make_collator, resolve_fields
from hf_sft.data.stream import index_records
from hf_sft.errors import UsageError
from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
from hf_sft.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
TOKENIZER_PATH = str(FIXTURES / "tiny_bpe.json")
TOKENIZER = load_tokenizer(TOKENIZER_PATH)
DATA = str(REPO / "hf_sft" / "demo" / "demo_sample.jsonl")  # 320 short records: none is dropped at 160 tokens
TINY = [
    "--device", "cpu", "--tokenizer_path", TOKENIZER_PATH, "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
    "--block_size", "160", "--max_seq_len", "160", "--learning_rate", "1e-3", "--warmup_steps", "2",
    "--log_interval", "1", "--seed", "3", "--batch_size", "4", "--gradient_accumulation_steps", "2",
    "--eval_steps", "1000",
]  # fmt: skip


def loader_batches(dataset, n: int, seed: int = 3, batch_size: int = 4) -> list[dict]:
    """The first `n` batches of the training data loader Trainer builds for `dataset`."""
    config = HfSftGPTConfig(vocab_size=len(TOKENIZER), hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    args = TrainingArguments(
        output_dir="unused", per_device_train_batch_size=batch_size, seed=seed, use_cpu=True, max_steps=10,
        report_to="none", remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(
        HfSftGPTForCausalLM(config), args, train_dataset=dataset, data_collator=make_collator(0, packing=False)
    )
    batches = iter(trainer.get_train_dataloader())
    return [next(batches) for _ in range(n)]


def converted(kind: str, folder: Path) -> str:
    """`DATA` as a source of `kind`: the `.jsonl` itself, gzip-compressed, or three parquet shards in a folder."""
    if kind == "jsonl":
        return DATA
    if kind == "jsonl.gz":
        path = folder / "demo.jsonl.gz"
        path.write_bytes(gzip.compress(Path(DATA).read_bytes()))
        return str(path)
    rows = [json.loads(line) for line in Path(DATA).read_text(encoding="utf-8").splitlines()]
    shards = folder / "shards"
    shards.mkdir()
    for number, start in enumerate(range(0, len(rows), 120)):
        pq.write_table(pa.Table.from_pylist(rows[start : start + 120]), shards / f"part-{number}.parquet")
    return str(shards)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet"])
def test_the_stream_gives_the_map_style_examples_in_trainer_s_order(tmp_path, kind):
    options = {"max_seq_len": 160, "val_split": 0.2, "seed": 5}
    mapped = build_datasets(DATA, TOKENIZER, **options)
    source = converted(kind, tmp_path)
    streamed = build_datasets(source, TOKENIZER, data_seed=3, **options, streaming=True, cache_dir=tmp_path / "cache")
    assert mapped.train.dropped == {} and streamed.train.records == len(mapped.train.index) == 256
    # The held-out split is the map-style one, tokenised up front.
    assert streamed.eval.dataset[:] == mapped.eval.dataset[:]
    # 64 batches of 4: one whole epoch, in the order of Trainer's own sampler over the map-style dataset.
    expected, got = loader_batches(mapped.train.dataset, 64), loader_batches(streamed.train.dataset, 64)
    for want, have in zip(expected, got, strict=True):
        assert all(torch.equal(want[key], have[key]) for key in want)
    assert streamed.train.dataset.tokenized <= 256 + 2 * stream_module.CHUNK_SIZE  # read as consumed, not up front


def test_dropped_examples_are_passed_over_and_counted():
    # Every third record is too long for 40 tokens: the stream keeps the others in its order over all records.
    mapped = build_datasets(DATA, TOKENIZER, max_seq_len=40)
    assert mapped.train.dropped  # some are dropped at this length
    stream = build_datasets(DATA, TOKENIZER, max_seq_len=40, data_seed=1, streaming=True).train.dataset
    stream.chunk_size = 7  # chunk edges land anywhere
    kept = {row: tuple(ids) for row, ids in zip(mapped.train.index, mapped.train.dataset["input_ids"], strict=True)}
    order = [row for row in stream.permutation(0).tolist() if row in kept]
    examples = iter(stream)
    assert [tuple(next(examples)["input_ids"]) for _ in order] == [kept[row] for row in order]
    stream.chunk_size, stream.status = 320, Counter()  # a new pass, the whole epoch in one chunk
    next(iter(stream))
    assert {key: n for key, n in stream.status.items() if key.startswith("drop:")} == {
        f"drop:{reason}": n for reason, n in mapped.train.dropped.items()
    }


def test_bad_records_fail_or_are_skipped_exactly_as_map_style(tmp_path):
    rows = [json.dumps({"instruction": f"Say {i}.", "response": f"{i}"}) for i in range(30)]
    for line, bad in ((3, "{not json"), (8, '{"instruction": "x"}'), (17, '{"instruction": "", "output": "y"}')):
        rows[line - 1] = bad
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(UsageError) as streamed:
        index_records(path, resolve_fields(), skip_bad_records=False)
    with pytest.raises(UsageError) as mapped:
        build_datasets(path, TOKENIZER, cache_dir=tmp_path / "cache")
    assert str(streamed.value) == str(mapped.value)
    assert str(streamed.value).startswith(f"{path}:3: invalid JSON")
    source = index_records(path, resolve_fields(), skip_bad_records=True)
    split = build_datasets(path, TOKENIZER, skip_bad_records=True, cache_dir=tmp_path / "cache").train
    assert source.skipped == split.skipped and source.skipped_messages == split.skipped_messages
    assert len(source.offsets) == len(split.index) == 27


@pytest.mark.parametrize(
    "first, later",
    [
        ({"question": "Say hi.", "answer": "hi"}, None),  # no known shape: the --field_map to use
        ({"instruction": "Say hi.", "output": "hi"}, {"messages": [{"role": "assistant", "content": "hi"}]}),
    ],
)
def test_the_stream_index_refuses_a_source_as_map_style_does(tmp_path, first, later):
    path = tmp_path / "data.jsonl"
    path.write_text("\ufeff" + "".join(json.dumps(row) + "\n" for row in (first, later) if row), encoding="utf-8")
    with pytest.raises(UsageError) as streamed:
        index_records(path, resolve_fields(), skip_bad_records=True)
    with pytest.raises(UsageError) as mapped:
        build_datasets(path, TOKENIZER, skip_bad_records=True, cache_dir=tmp_path / "cache")
    assert str(streamed.value) == str(mapped.value)
    assert str(streamed.value).startswith(f"{path}:{1 if later is None else 2}: ")


def test_streaming_takes_one_source_and_the_run_s_checks(tmp_path):
    with pytest.raises(UsageError, match="--streaming reads one source; --data_path names 2 sources"):
        build_datasets([DATA, DATA], TOKENIZER, streaming=True)
    with pytest.raises(UsageError, match=r"--val_split must be in \[0, 1\)"):
        build_datasets(DATA, TOKENIZER, val_split=1.5, streaming=True)
    with pytest.raises(UsageError, match="unknown length policy"):
        build_datasets(DATA, TOKENIZER, length_policy="squeeze", streaming=True)


def test_streaming_refuses_what_it_cannot_stream(tmp_path, capsys):
    # What the map-style path cannot read, the stream refuses with the same line (zstd is not a supported compression).
    for name, text in (("data.json", "[]"), ("data.jsonl.zst", "{}")):
        (tmp_path / name).write_text(text)
        flags = [*TINY, "--data_path", str(tmp_path / name)]
        assert main(["train", *flags, "--streaming", "--out_dir", str(tmp_path / "a")]) == 2
        streamed = capsys.readouterr().err.strip().splitlines()[-1]
        assert main(["train", *flags, "--out_dir", str(tmp_path / "b")]) == 2
        assert streamed == capsys.readouterr().err.strip().splitlines()[-1]
        assert streamed.startswith("error: ") and str(tmp_path / name) in streamed
    grouped = ["--train_sampling_strategy", "group_by_length", "--out_dir", str(tmp_path / "b")]
    assert main(["train", *TINY, "--streaming", "--data_path", DATA, *grouped]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --train_sampling_strategy group_by_length needs every example's length before the first step and "
        "cannot stream: drop --streaming or choose random or sequential"
    )


def losses(run_dir: Path, step: int) -> list[float]:
    history = json.loads((run_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.parametrize("packing", ["true", "false"])
def test_streaming_trains_with_the_map_style_losses(tmp_path, packing):
    flags = [*TINY, "--data_path", DATA, "--val_split", "0.1", "--max_iters", "6", "--save_interval", "6"]
    flags += ["--packing", packing]
    assert main(["train", *flags, "--out_dir", str(tmp_path / "mapped")]) == 0
    assert main(["train", *flags, "--streaming", "--out_dir", str(tmp_path / "streamed")]) == 0
    mapped, streamed = losses(tmp_path / "mapped", 6), losses(tmp_path / "streamed", 6)
    assert len(mapped) == 6
    assert streamed == pytest.approx(mapped, abs=1e-5, rel=0)
    final_mapped, final_streamed = (
        load_file(tmp_path / "mapped" / "model.safetensors"),
        load_file(tmp_path / "streamed" / "model.safetensors"),
    )
    for name in final_mapped:
        torch.testing.assert_close(final_streamed[name], final_mapped[name], atol=1e-5, rtol=0, msg=name)


class ReadLog:
    """Records the byte offsets every stream reads (wraps `read_records` where the stream calls it)."""

    def __init__(self, monkeypatch):
        self.offsets: list[int] = []
        original = stream_module.read_records

        def read(source, handle, offsets):
            self.offsets += offsets.tolist()
            return original(source, handle, offsets)

        monkeypatch.setattr(stream_module, "read_records", read)


def test_a_resumed_stream_is_bit_identical_and_reads_nothing_consumed(tmp_path, monkeypatch, capsys):
    flags = [*TINY, "--data_path", DATA, "--val_split", "0", "--streaming", "--max_iters", "8", "--save_interval", "4"]
    reads = ReadLog(monkeypatch)
    started = time.perf_counter()
    assert main(["train", *flags, "--out_dir", str(tmp_path / "full")]) == 0
    fresh_seconds = time.perf_counter() - started
    full_reads, reads.offsets = reads.offsets, []

    (tmp_path / "resumed").mkdir()  # a run that stopped after step 4
    checkpoint = shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    started = time.perf_counter()
    assert main(["train", "--resume_from_ckpt_path", str(checkpoint), "--out_dir", str(tmp_path / "resumed")]) == 0
    resume_seconds = time.perf_counter() - started
    full, resumed = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert "resumed from checkpoint-4 (step 4 of 8)" in (tmp_path / "resumed" / "train.log").read_text()
    consumed = 4 * 4 * 2  # steps x batch x accumulation: nothing is dropped from this file
    assert reads.offsets[: len(full_reads) - consumed] == full_reads[consumed:][: len(reads.offsets)]
    assert not set(reads.offsets) & set(full_reads[:consumed])  # the resumed stream starts after them
    with capsys.disabled():
        print(
            f"\nstreaming: 8 steps from scratch {fresh_seconds:.1f} s; from step 4 to 8 resumed {resume_seconds:.1f} s"
        )


@pytest.fixture(scope="module")
def mapped_run(tmp_path_factory) -> Path:
    """8 steps without --streaming, a checkpoint at 4: the run every stream is held against."""
    out = tmp_path_factory.mktemp("mapped") / "run"
    flags = [*TINY, "--data_path", DATA, "--val_split", "0", "--max_iters", "8", "--save_interval", "4"]
    assert main(["train", *flags, "--out_dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("kind", ["jsonl.gz", "parquet"])
def test_compressed_and_parquet_sources_stream_and_resume_bit_identically(tmp_path, mapped_run, kind):
    source = converted(kind, tmp_path)
    flags = [*TINY, "--data_path", source, "--val_split", "0", "--max_iters", "8", "--save_interval", "4"]
    assert main(["train", *flags, "--streaming", "--out_dir", str(tmp_path / "full")]) == 0
    assert losses(tmp_path / "full", 8) == pytest.approx(losses(mapped_run, 8), abs=1e-5, rel=0)
    assert f"streaming 320 records from {source}" in (tmp_path / "full" / "train.log").read_text()

    (tmp_path / "resumed").mkdir()  # a run that stopped after step 4
    checkpoint = shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    assert main(["train", "--resume_from_ckpt_path", str(checkpoint), "--out_dir", str(tmp_path / "resumed")]) == 0
    full, resumed = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert losses(tmp_path / "resumed", 8) == losses(tmp_path / "full", 8)


def test_two_processes_stream_the_one_process_batches(tmp_path):
    import subprocess
    import sys

    from helpers.ports import free_port
    from test_training import subprocess_env

    flags = [*TINY, "--data_path", DATA, "--val_split", "0", "--streaming", "--max_iters", "4", "--save_interval", "4"]
    flags += ["--gradient_accumulation_steps", "1"]
    config = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launch += ["--main_process_port", str(free_port()), str(REPO / "scripts" / "train.py")]
    two = subprocess.run(
        [*launch, *flags, "--batch_size", "2", "--out_dir", str(tmp_path / "two")],
        env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "engine DDP | world size 2" in (tmp_path / "two" / "train.log").read_text()
    assert main(["train", *flags, "--batch_size", "4", "--out_dir", str(tmp_path / "one")]) == 0
    one, both = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(both[name], one[name], atol=1e-5, rtol=0, msg=name)
    # Both processes recorded the same stream position: 4 steps of 2 x 2 examples.
    state = json.loads((tmp_path / "two" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["StreamPositionCallback"]["attributes"] == {"epoch": 0, "position": 16}


def test_steps_follow_from_epochs_and_records():
    from types import SimpleNamespace

    from hf_sft.training.arguments import SFTTrainingArguments
    from hf_sft.training.config import streaming_arguments

    args = SFTTrainingArguments(output_dir="unused", num_train_epochs=2, per_device_train_batch_size=4, use_cpu=True)
    split = SimpleNamespace(dataset=SimpleNamespace(shuffle=True), records=250)
    derived = streaming_arguments(args, split)
    # As a map-style run of 250 examples: 63 batches per epoch, 8 per optimizer step.
    assert derived.max_steps == 16 and derived.ignore_data_skip and not derived.accelerator_config.dispatch_batches
    sequential = dataclasses.replace(args, train_sampling_strategy="sequential", max_steps=5)
    assert streaming_arguments(sequential, split).max_steps == 5 and split.dataset.shuffle is False


def test_an_eval_file_is_tokenised_up_front():
    eval_file = str(FIXTURES / "tiny_sft.jsonl")
    mapped = build_datasets(DATA, TOKENIZER, max_seq_len=160, eval_data_path=eval_file)
    streamed = build_datasets(DATA, TOKENIZER, max_seq_len=160, eval_data_path=eval_file, streaming=True)
    assert streamed.eval.dataset[:] == mapped.eval.dataset[:] and list(streamed.eval.index) == list(mapped.eval.index)
    assert streamed.train.records == 320
