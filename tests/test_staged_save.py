"""Checkpoints are staged, sealed, renamed into place: never seen half-written, even after SIGKILL or a full disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.runs import snapshot, train
from safetensors.torch import load_file
from test_resume import last_error

from hf_sft.cli import main
from hf_sft.training.checkpoints import MANIFEST, problem
from hf_sft.writer import incomplete, leftovers

HELPERS = Path(__file__).parent / "helpers"
STEPS = ["--max_iters", "3", "--save_interval", "1"]


def test_a_checkpoint_is_written_aside_and_appears_only_once_sealed(tmp_path, monkeypatch):
    out, writes, real = tmp_path / "run", [], torch.save

    def watched(obj, f, *args, **kwargs):
        path = Path(f)
        if path.parent.name.startswith("checkpoint-"):
            # where Trainer writes, and whether the checkpoint already exists under its own name meanwhile
            writes.append((path.parent.parent.name, path.parent.name, (out / path.parent.name).exists()))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", watched)
    assert train(out, *STEPS) == 0
    staged = {f".hf_sft-tmp-checkpoint-{step}" for step in (1, 2, 3)}
    assert {name for name, _, _ in writes} == staged  # on main: "run", the checkpoints' own folder
    assert all(staging == f".hf_sft-tmp-{name}" and not there for staging, name, there in writes)
    for step in (1, 2, 3):
        assert problem(out / f"checkpoint-{step}") is None
        assert json.loads((out / f"checkpoint-{step}" / MANIFEST).read_text())["step"] == step
    assert leftovers(out) == []


def test_a_write_the_system_refuses_is_one_line_and_the_previous_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    """An injected ENOSPC while checkpoint-2 is written (where no tmpfs can be mounted, this is the disk-full test)."""
    out, real, kept = tmp_path / "run", torch.save, {}

    def full_disk(obj, f, *args, **kwargs):
        if Path(f).name == "scheduler.pt" and Path(f).parent.name == "checkpoint-2":
            kept.update(snapshot(out / "checkpoint-1"))
            raise OSError(28, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert train(out, *STEPS) == 1
    assert last_error(capsys) == (
        f"error: cannot write {out / 'checkpoint-2'}: no space left on device; the newest complete checkpoint is "
        "checkpoint-1: make room, then continue with --resume_from_ckpt_path latest"
    )
    assert not (out / "checkpoint-2").exists() and leftovers(out) == []
    assert snapshot(out / "checkpoint-1") == kept  # untouched by the failed save
    monkeypatch.undo()
    assert main(["train", "--resume_from_ckpt_path", "latest", "--out_dir", str(out)]) == 0  # the way forward works
    reference = tmp_path / "reference"
    assert train(reference, *STEPS) == 0
    assert_same_weights(out, reference)


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_resumes(tmp_path, tmpfs, capsys):
    reference = tmp_path / "reference"
    assert train(reference, *STEPS) == 0
    checkpoint = sum(p.stat().st_size for p in (reference / "checkpoint-1").rglob("*") if p.is_file())
    disk = tmpfs(f"{(checkpoint * 3 // 2) // 4096 * 4096}")  # room for one checkpoint, not for two
    out = disk / "run"
    assert train(out, *STEPS) == 1
    assert last_error(capsys) == (
        f"error: cannot write {out / 'checkpoint-2'}: no space left on device; the newest complete checkpoint is "
        "checkpoint-1: make room, then continue with --resume_from_ckpt_path latest"
    )  # on main: RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos
    assert problem(out / "checkpoint-1") is None and not (out / "checkpoint-2").exists() and leftovers(out) == []
    tmpfs.resize(disk, "64m")
    assert main(["train", "--resume_from_ckpt_path", "latest", "--out_dir", str(out)]) == 0
    assert_same_weights(out, reference)


@pytest.mark.slow
def test_sigkill_at_20_seeded_moments_then_latest_ends_bit_identical(tmp_path):
    """10 kills after random delays, 10 at random writes (5 inside the final save); each run then finished."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS.parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    driver = [sys.executable, str(HELPERS / "crash_driver.py"), str(tmp_path), "1709", "10", "10"]
    done = subprocess.run(driver, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    head, *attempts = [json.loads(line) for line in done.stdout.splitlines()]
    assert head["reference"] == 0 and len(attempts) == 20
    reference = load_file(tmp_path / "reference" / "model.safetensors")
    for attempt in attempts:
        out = tmp_path / f"attempt-{attempt['attempt']}"
        finish_log = (tmp_path / f"attempt-{attempt['attempt']}.finish.log").read_text()
        # What the kill left: every checkpoint under its own name verifies and reads back whole.
        assert attempt["unverified"] == {} and attempt["unreadable"] == {}, attempt
        assert attempt["finish"] == 0, (attempt, finish_log[-2000:])
        assert "Traceback" not in finish_log
        final = load_file(out / "model.safetensors")
        assert final.keys() == reference.keys(), attempt
        assert all(torch.equal(final[name], reference[name]) for name in reference), attempt
        assert incomplete(out) is None and leftovers(out) == [], attempt
    assert sum(attempt["killed"] for attempt in attempts) >= 15
    assert any(attempt["final_incomplete"] for attempt in attempts)  # some kills fell inside the final swap
    assert any(attempt["command"] == "latest" and attempt["checkpoints"] for attempt in attempts)
