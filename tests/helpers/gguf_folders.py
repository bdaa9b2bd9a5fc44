"""Model folders of both families for the GGUF tests: the shared legacy checkpoints converted, then fine-tuned."""

from pathlib import Path

from helpers.legacy_checkpoints import NANOGPT, SIMPLE_LLAMA, cli_special_flags, shared_checkpoint, shared_tokenizer

FAMILIES = {"nanogpt": NANOGPT, "llama": SIMPLE_LLAMA}
# Three optimizer steps at a learning rate high enough to move every weight (no warm-up): a few seconds.
FINE_TUNE_ARGS = [
    "--max_iters", "3", "--batch_size", "2", "--gradient_accumulation_steps", "1", "--warmup_steps", "0",
    "--learning_rate", "1e-3", "--device", "cpu", "--val_split", "0", "--max_seq_len", "128",
]  # fmt: skip


def dolly(shared: Path) -> Path:
    return shared / "data" / "dolly" / "dolly_sample.jsonl"


def build_folders(shared: Path, root: Path) -> dict[tuple[str, str], Path]:
    """`{(family, "converted" | "trained"): folder}`, converted and trained in this process."""
    from hf_sft.cli import main

    folders = {}
    for family, checkpoint in FAMILIES.items():
        converted, trained = root / f"{family}-base", root / f"{family}-sft"
        argv = ["convert", "--checkpoint", str(shared_checkpoint(shared, checkpoint))]
        argv += ["--tokenizer", str(shared_tokenizer(shared, checkpoint)), "--out", str(converted)]
        assert main([*argv, *cli_special_flags(checkpoint)]) == 0
        argv = ["train", "--pretrained_ckpt_path", str(converted), "--data_path", str(dolly(shared))]
        assert main([*argv, *FINE_TUNE_ARGS, "--out_dir", str(trained)]) == 0
        folders[family, "converted"], folders[family, "trained"] = converted, trained
    return folders
