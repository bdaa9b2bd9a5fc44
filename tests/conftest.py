"""Test-wide set-up: never reach the Hub, keep CPU threads predictable, locate ../shared."""

import os
import subprocess

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


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs(size)` mounts a tmpfs of `size` (e.g. "1m") for real where the test may mount (root, or a user
    namespace) and returns its folder, else skips; `tmpfs.resize(size)` remounts it with another size."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        done = subprocess.run(command, capture_output=True)
        if done.returncode != 0:
            reason = done.stderr.decode().strip()
            pytest.skip(f"cannot mount a tmpfs here ({reason}); the injected ENOSPC tests cover it")
        mounts.append(folder)
        return folder

    def resize(folder: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True)

    mount.resize = resize
    yield mount
    for folder in mounts:  # lazily: a file a failed write left open would keep it busy
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmpfs) -> Path:
    """A 1 MiB tmpfs (see `tmpfs`)."""
    return tmpfs("1m")


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
