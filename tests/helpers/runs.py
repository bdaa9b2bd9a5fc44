"""Tiny training runs shared by the training tests: their flags, one call that trains, a folder's bytes."""

from pathlib import Path

from hf_sft.cli import main

REPO = Path(__file__).resolve().parents[2]
# A tiny new model on the built-in demo data (its tokenizer trained on it): every run here takes seconds.
TINY = [
    "--demo", "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "128",
    "--tokenizer_vocab_size", "300", "--max_seq_len", "128", "--val_split", "0", "--learning_rate", "1e-3",
    "--warmup_steps", "2", "--log_interval", "1", "--seed", "0", "--dropout", "0",
]  # fmt: skip
# The same tiny model on the shipped fixture tokenizer (nothing trained before the run), batch 2; callers add the
# logging interval, the accumulation, the steps and the checkpoint interval.
FIXTURE_RUN = [
    "--tokenizer_path", str(REPO / "tests" / "fixtures" / "tiny_bpe.json"),
    "--data_path", str(REPO / "hf_sft" / "demo" / "demo_sample.jsonl"),
    "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "128",
    "--max_seq_len", "128", "--val_split", "0", "--learning_rate", "1e-3", "--warmup_steps", "2",
    "--seed", "0", "--dropout", "0", "--batch_size", "2",
]  # fmt: skip


def train(out: Path, *flags: str) -> int:
    """`hf-sft train` of the `TINY` run into `out`, in this process; its exit status."""
    return main(["train", *TINY, "--out_dir", str(out), *flags])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative name, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
