"""Which checkpoint a run resumes: `latest` is the newest that verifies; an older one while newer exist is refused."""

import json
import shutil
from pathlib import Path

import pytest
from helpers.runs import snapshot, train
from test_resume import last_error, same_weights

from hf_sft.cli import main
from hf_sft.training.resume import RUN_ARGS_FILE


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """6 steps with checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("checkpoints") / "full"
    assert train(out, "--max_iters", "6", "--save_interval", "2") == 0
    return out


def resume(*flags: str) -> int:
    return main(["train", "--resume_from_ckpt_path", *flags])


def test_latest_skips_a_damaged_newest_checkpoint_and_says_why(full_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    weights = out / "checkpoint-6" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 3])  # cut short, as a full disk or a bad copy leaves it
    assert resume("latest", "--out_dir", str(out)) == 0  # on main: a raw exception, exit 1
    skipped = (
        f"--resume_from_ckpt_path latest: skipping checkpoint-6: {weights} has {size // 3} bytes, {size} when the "
        "checkpoint was sealed"
    )
    assert skipped in capsys.readouterr().err
    log = (out / "train.log").read_text()
    assert skipped in log and "resumed from checkpoint-4 (step 4 of 6)" in log
    assert same_weights(out, full_run)  # steps 5 and 6 again, bit for bit
    assert same_weights(out / "checkpoint-6", full_run / "checkpoint-6")  # written again, whole


def test_an_explicit_checkpoint_that_does_not_verify_is_refused_naming_the_file(full_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"")  # what a kill mid-save left on main
    before = snapshot(out)
    assert resume(str(out / "checkpoint-6")) == 2
    assert last_error(capsys) == (
        f"error: --resume_from_ckpt_path {out / 'checkpoint-6'}: {out / 'checkpoint-6' / 'optimizer.pt'} has 0 bytes, "
        f"{(full_run / 'checkpoint-6' / 'optimizer.pt').stat().st_size} when the checkpoint was sealed; resume from "
        "another checkpoint (--resume_from_ckpt_path latest takes the newest one that verifies)"
    )
    assert snapshot(out) == before


def test_resuming_an_older_checkpoint_while_newer_ones_exist_is_refused(full_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    before = snapshot(out)
    assert resume(str(out / "checkpoint-2")) == 2  # on main: checkpoint-4 and -6 were rewritten in place
    assert last_error(capsys) == (
        f"error: --resume_from_ckpt_path {out / 'checkpoint-2'}: {out} holds newer checkpoints (checkpoint-4, "
        "checkpoint-6) that this run would replace: continue from the newest with --resume_from_ckpt_path latest, "
        "or delete them (and the final model) and continue from checkpoint-2 with --discard_newer_checkpoints"
    )
    assert snapshot(out) == before  # train.log included: nothing was written


def test_discard_newer_checkpoints_removes_them_and_the_final_model_first(full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"")  # a damaged newer one goes as well
    kept = snapshot(out / "checkpoint-2")
    assert resume(str(out / "checkpoint-2"), "--discard_newer_checkpoints") == 0
    log = (out / "train.log").read_text()
    removed = "--discard_newer_checkpoints: removed checkpoint-4, checkpoint-6 and the final model (resuming from "
    assert removed + "checkpoint-2)" in log
    assert log.index(removed) < log.index("resumed from checkpoint-2 (step 2 of 6)")  # before training started
    assert snapshot(out / "checkpoint-2") == kept  # never modified in place
    assert same_weights(out, full_run)  # the same arguments: the same branch again
    assert same_weights(out / "checkpoint-6", full_run / "checkpoint-6")
    record = json.loads((out / "checkpoint-6" / RUN_ARGS_FILE).read_text())
    assert "discard_newer_checkpoints" not in record["values"]  # the next resume does not discard again


def test_the_resume_path_is_resolved_once_in_a_whole_run(full_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"")
    assert resume("latest", "--out_dir", str(out)) == 0
    skipped = "--resume_from_ckpt_path latest: skipping checkpoint-6:"
    assert capsys.readouterr().err.count(skipped) == 1
    assert (out / "train.log").read_text().count(skipped) == 1
