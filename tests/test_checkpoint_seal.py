"""A checkpoint's seal catches a same-size change in any file, and a state file that names a global outside Trainer's
allow-list is refused in our words (exit 2, naming the file and the global) before anything loads it."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from test_resume import last_error, same_weights
from test_training import train

from hf_sft.cli import main
from hf_sft.training.checkpoints import MANIFEST, digest, problem


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """4 steps with checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("seal") / "full"
    assert train(out, "--max_iters", "4", "--save_interval", "2") == 0
    return out


def copied(full_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    return out


def sealed_files(folder: Path) -> list[str]:
    return sorted(json.loads((folder / MANIFEST).read_text())["files"])


def flip_a_byte(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def reseal(folder: Path, name: str) -> None:
    """What anyone who can write the folder can do: make the seal agree with a replaced file."""
    manifest = json.loads((folder / MANIFEST).read_text())
    path = folder / name
    manifest["files"][name] = {"size": path.stat().st_size, "sha256": digest(path)}
    (folder / MANIFEST).write_text(json.dumps(manifest))


class Payload:
    """Unpickling this would run a shell command that leaves a file behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_seal_records_each_files_size_and_sha256(full_run):
    folder = full_run / "checkpoint-4"
    files = json.loads((folder / MANIFEST).read_text())["files"]
    for name, sealed in files.items():
        path = folder / name
        assert sealed == {"size": path.stat().st_size, "sha256": digest(path)}, name


def test_a_same_size_change_in_any_file_is_found_and_named(full_run, tmp_path):
    """Every sealed file, one seeded bit flipped in each of 3 places: the size stays, the verification finds it."""
    rng = random.Random(30)
    names = sealed_files(full_run / "checkpoint-4")
    assert len(names) >= 10
    for attempt, name in enumerate(names * 3):
        folder = tmp_path / str(attempt) / "checkpoint-4"
        shutil.copytree(full_run / "checkpoint-4", folder)
        path = folder / name
        size = path.stat().st_size
        flip_a_byte(path, rng)
        assert path.stat().st_size == size
        found = problem(folder)
        assert found is not None and str(path) in found, (attempt, name, found)


def test_an_explicit_resume_of_a_changed_checkpoint_exits_2_naming_the_file(full_run, tmp_path, capsys):
    rng = random.Random(31)
    for name in sealed_files(full_run / "checkpoint-4"):
        out = copied(full_run, tmp_path / name.replace("/", "_"))
        path = out / "checkpoint-4" / name
        flip_a_byte(path, rng)
        before = path.read_bytes()
        assert main(["train", "--resume_from_ckpt_path", str(out / "checkpoint-4")]) == 2, name
        line = last_error(capsys)
        assert line.startswith(f"error: --resume_from_ckpt_path {out / 'checkpoint-4'}: {path} "), line
        assert path.read_bytes() == before


def test_latest_skips_a_changed_newest_checkpoint(full_run, tmp_path, capsys):
    out = copied(full_run, tmp_path)
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    flip_a_byte(optimizer, random.Random(32))
    assert main(["train", "--resume_from_ckpt_path", "latest", "--out_dir", str(out)]) == 0
    skipped = (
        f"--resume_from_ckpt_path latest: skipping checkpoint-4: {optimizer} is not the file the checkpoint was "
        "sealed with: its content changed since"
    )
    assert skipped in capsys.readouterr().err
    assert "resumed from checkpoint-2 (step 2 of 4)" in (out / "train.log").read_text()
    assert same_weights(out, full_run)


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_a_state_file_that_would_call_a_function_is_refused_naming_it(full_run, tmp_path, capsys, name):
    out = copied(full_run, tmp_path)
    marker = tmp_path / "payload-ran"
    state = torch.load(out / "checkpoint-4" / name, weights_only=False)
    state = {"original": state, "extra": Payload(marker)}
    torch.save(state, out / "checkpoint-4" / name)
    reseal(out / "checkpoint-4", name)
    path = out / "checkpoint-4" / name

    assert main(["train", "--resume_from_ckpt_path", str(out / "checkpoint-4")]) == 2
    captured = capsys.readouterr()
    line = captured.err.strip().splitlines()[-1]
    assert line == (
        f"error: --resume_from_ckpt_path {out / 'checkpoint-4'}: {path} names {os.system.__module__}.system, which "
        "no checkpoint holds: refusing to load it; resume from another checkpoint (--resume_from_ckpt_path latest "
        "takes the newest one that verifies)"
    )
    assert main(["train", "--resume_from_ckpt_path", "latest", "--out_dir", str(out)]) == 0
    captured_latest = capsys.readouterr()
    assert f"skipping checkpoint-4: {path} names {os.system.__module__}.system" in captured_latest.err
    everything = captured.out + captured.err + captured_latest.out + captured_latest.err
    everything += (out / "train.log").read_text()
    assert "weights_only" not in everything and "Traceback" not in everything
    assert not marker.exists()  # the payload never ran
