"""The final folder is one change: a final save cut short is refused by every reader, and `latest` writes it again."""

import os
from pathlib import Path

import pytest
from helpers.runs import snapshot, train
from test_resume import last_error, same_weights

from hf_sft.cli import main
from hf_sft.writer import OUTPUT_RECORD, PENDING_RECORD, incomplete, leftovers


class Killed(BaseException):
    """Stands in for SIGKILL in this process: nothing catches it, so nothing cleans up after it."""


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("output") / "full"
    assert train(out, "--max_iters", "4", "--save_interval", "2") == 0
    return out


def killed_at_rename(monkeypatch, out: Path, n: int) -> None:
    """Die at the `n`-th rename into `out` itself (the final swap's: its record first, then the files)."""
    real, calls = os.replace, []

    def replace(src, dst):
        if Path(dst).parent == out and Path(dst).name != OUTPUT_RECORD:  # the claim's mark is not the final swap
            calls.append(dst)
            if len(calls) == n:
                raise Killed
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_an_interrupted_final_save_is_refused_and_latest_repairs_it(full_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    killed_at_rename(monkeypatch, out, 3)  # the record and one file are in place
    with pytest.raises(Killed):
        train(out, "--max_iters", "4", "--save_interval", "2")
    monkeypatch.undo()
    assert (out / PENDING_RECORD).is_file() and (out / "README.md").is_file()  # the card (sorted first) is in place,
    assert not (out / "model.safetensors").exists()  # the weights are not: a mix, marked as one
    checkpoints = {name: data for name, data in snapshot(out).items() if name.startswith("checkpoint-")}
    line = (
        f"{out} is incomplete: its final save was interrupted; complete it with "
        f"`hf-sft train --resume_from_ckpt_path latest --out_dir {out}`"
    )
    readers = {
        "generate": ["generate", str(out), "--instruction", "Name a colour."],
        "export": ["export", str(out), "--to", "llama", "--out", str(tmp_path / "stock")],
        "push": ["push", str(out), "--repo_id", "someone/model"],
        "train": ["train", "--pretrained_ckpt_path", str(out), "--out_dir", str(tmp_path / "next")],
    }
    for command, argv in readers.items():
        capsys.readouterr()
        assert main(argv) == 2, command  # on main: each read the mixed folder
        prefix = "--pretrained_ckpt_path: " if command == "train" else ""
        assert last_error(capsys) == f"error: {prefix}{line}", command
    assert not (tmp_path / "stock").exists() and not (tmp_path / "next").exists()

    assert main(["train", "--resume_from_ckpt_path", "latest", "--out_dir", str(out)]) == 0
    assert incomplete(out) is None and leftovers(out) == []
    assert same_weights(out, full_run)  # the final model of step 4, from checkpoint-4
    assert {name: data for name, data in snapshot(out).items() if name.startswith("checkpoint-")} == checkpoints
    assert "resumed from checkpoint-4 (step 4 of 4)" in (out / "train.log").read_text()
    assert main(readers["generate"]) == 0


def test_a_final_save_that_fails_before_the_swap_leaves_the_old_final_folder(full_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(out, "--max_iters", "4", "--save_interval", "2")
    before = snapshot(out)

    def no_plot(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hf_sft.training.final_folder.plot_losses", no_plot)
    assert main(["train", "--resume_from_ckpt_path", "latest", "--out_dir", str(out)]) == 1
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"
    }
    assert incomplete(out) is None and leftovers(out) == []
