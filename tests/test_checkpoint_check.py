"""A sealed checkpoint verifies; any damage (cut short, missing, wrong step) is found and names the file."""

import json
import random
import shutil
from pathlib import Path

import pytest
from helpers.runs import train

from hf_sft.training.checkpoints import MANIFEST, digest, problem


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """4 steps with checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("check") / "run"
    assert train(out, "--max_iters", "4", "--save_interval", "2") == 0
    return out


def copy(run: Path, tmp_path: Path, step: int = 4) -> Path:
    folder = tmp_path / f"checkpoint-{step}"
    shutil.copytree(run / "checkpoint-4", folder)
    return folder


def as_legacy(folder: Path) -> Path:
    """What an older hf_sft sealed: a mark without the manifest's sizes."""
    (folder / MANIFEST).write_text("step 4\n")
    return folder


def test_a_sealed_checkpoint_verifies_and_its_manifest_lists_every_file(run):
    folder = run / "checkpoint-4"
    manifest = json.loads((folder / MANIFEST).read_text())
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": digest(p)}
        for p in folder.rglob("*")
        if p.is_file()
    }
    del files[MANIFEST]
    assert manifest == {"format": 2, "step": 4, "files": files, "absent": {}}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(files)
    assert {"run_args.json", "config.json", "tokenizer.json"} <= set(files)
    assert problem(folder) is None and problem(run / "checkpoint-2") is None


def test_seeded_damage_is_always_found_and_names_the_file(run, tmp_path):
    """40 seeded damages (a file cut short at a random length, emptied, or deleted), sealed and legacy marks."""
    rng = random.Random(404)
    for attempt in range(40):
        folder = copy(run, tmp_path / str(attempt))
        legacy = attempt % 2 == 1
        names = sorted(json.loads((folder / MANIFEST).read_text())["files"])
        if legacy:  # without sizes, the checks of the files' own structure must find it
            as_legacy(folder)
            names = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"]
        path = folder / rng.choice(names)
        size = path.stat().st_size
        damage = rng.choice(["cut", "empty", "delete"])
        if damage == "delete":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[: rng.randrange(1, size) if damage == "cut" else 0])
        found = problem(folder)
        assert found is not None and str(path) in found, (attempt, damage, path.name, found)


@pytest.mark.parametrize(
    ("legacy", "damage", "name", "message"),
    [
        (False, "delete", "optimizer.pt", "{p} is missing"),
        (False, "cut", "model.safetensors", "{p} has {n} bytes, {size} when the checkpoint was sealed"),
        (False, "delete", MANIFEST, "{f} has no checkpoint_complete: it was not completely written"),
        (True, "delete", "optimizer.pt", "{p} is missing (the optimizer state)"),
        (True, "delete", "rng_state.pth", "{p} is missing (the random-number state)"),
        (True, "cut", "model.safetensors", "{p} is cut short: {n} bytes, its safetensors header describes {size}"),
        (True, "cut", "optimizer.pt", "{p} is not a complete torch file (cut short: no zip directory at its end)"),
    ],
)
def test_each_kind_of_damage_has_its_own_line(run, tmp_path, legacy, damage, name, message):
    folder = as_legacy(copy(run, tmp_path)) if legacy else copy(run, tmp_path)
    path = folder / name
    size = path.stat().st_size
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: size // 2])
    assert problem(folder) == message.format(f=folder, p=path, n=size // 2, size=size)


def test_a_step_that_does_not_match_the_folder_is_named(run, tmp_path):
    folder = copy(run, tmp_path)
    state = folder / "trainer_state.json"
    state.write_text(state.read_text().replace('"global_step": 4', '"global_step": 5'))  # the same size
    assert problem(folder) == f"{state} says global_step 5, but the checkpoint is for step 4"
    moved = folder.rename(tmp_path / "checkpoint-6")
    assert problem(moved) == f"{moved / MANIFEST} is for step 4, not 6"
