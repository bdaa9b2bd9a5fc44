"""Test-wide set-up: never reach the Hub, keep CPU threads predictable, locate ../shared."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the checkout: CI always has it, a user's clone may not."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the shared fixtures (Dolly sample, legacy checkpoints) live there")
    return SHARED


@pytest.fixture(scope="session")
def gguf_folders(shared_dir, tmp_path_factory) -> dict:
    """Both families from the shared legacy checkpoints, converted and briefly fine-tuned (for the GGUF tests)."""
    from helpers.gguf_folders import build_folders

    return build_folders(shared_dir, tmp_path_factory.mktemp("gguf_folders"))


@pytest.fixture(scope="session")
def gguf_files(gguf_folders, tmp_path_factory) -> dict:
    """The f32 GGUF of each folder of `gguf_folders`, exported once."""
    from hf_sft.export.gguf_file import export_gguf

    root = tmp_path_factory.mktemp("gguf_files")
    return {case: export_gguf(folder, root / f"{'-'.join(case)}.gguf").path for case, folder in gguf_folders.items()}
