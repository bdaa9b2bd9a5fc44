"""A run owns its --out_dir: another run's work is refused byte for byte, a live run's lock keeps others out."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.runs import snapshot

from hf_sft.cli import main
from hf_sft.errors import UsageError
from hf_sft.training.run_folder import LOCK_FILE, RunLock, check_run_folder, claim_run_folder, release_run_folders

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "scripts" / "train.py")
TINY = [
    "--demo", "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "128",
    "--tokenizer_vocab_size", "300", "--max_seq_len", "128", "--val_split", "0", "--seed", "0", "--dropout", "0",
]  # fmt: skip
HOST = socket.gethostname()


def train(out: Path, *flags: str) -> int:
    return main(["train", *TINY, "--out_dir", str(out), *flags])


def test_out_dir_of_another_run_is_refused_and_left_byte_identical(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--max_iters", "4", "--save_interval", "2") == 0
    before = snapshot(out)
    assert {"checkpoint-2/model.safetensors", "checkpoint-4/model.safetensors", "model.safetensors"} <= set(before)
    capsys.readouterr()
    assert train(out, "--max_iters", "6", "--save_interval", "3") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --out_dir {out} already holds another run (checkpoint-2, checkpoint-4, model.safetensors): "
        "continue it with --resume_from_ckpt_path latest, or replace it with --overwrite_output_dir "
        "(or choose another --out_dir)"
    )
    assert snapshot(out) == before

    assert train(out, "--max_iters", "2", "--save_interval", "100", "--overwrite_output_dir") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    log = (out / "train.log").read_text()
    assert "--overwrite_output_dir: removed the previous run's checkpoint-2, checkpoint-4, config.json" in log
    assert log.count("final model written") == 1  # a fresh log, not the old one appended to
    assert not (out / LOCK_FILE).exists()


def test_a_held_lock_refuses_a_second_run_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    lock = claim_run_folder(out, resume=None, overwrite=False)
    try:
        assert json.loads((out / LOCK_FILE).read_text()) == {"pid": os.getpid(), "host": HOST}
        expected = (
            f"--out_dir {out} is in use by another run: pid {os.getpid()} on host {HOST} "
            f"(lock file {out / LOCK_FILE}); wait for it to finish or choose another --out_dir"
        )
        with pytest.raises(UsageError) as early:
            check_run_folder(out, resume=None, overwrite=False)
        assert str(early.value) == expected
        with pytest.raises(UsageError) as late:
            RunLock(out).acquire()
        assert str(late.value) == expected
    finally:
        release_run_folders()
    assert not (out / LOCK_FILE).exists() and lock._fd is None
    check_run_folder(out, resume=None, overwrite=False)


def test_a_stale_lock_is_taken_over_and_logged(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 4194999, "host": HOST}))  # no process holds its flock
    check_run_folder(out, resume=None, overwrite=False)
    with caplog.at_level(logging.WARNING, logger="hf_sft.train"):
        claim_run_folder(out, resume=None, overwrite=False)
    release_run_folders()
    assert f"taking over the stale lock of pid 4194999 on host {HOST}: that run is no longer alive" in caplog.text


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 12, "host": "elsewhere"}))
    with pytest.raises(UsageError, match=r"pid 12 on host elsewhere .*if that run is no longer alive, delete "):
        claim_run_folder(out, resume=None, overwrite=False)


def test_without_flock_the_holder_pid_decides(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, mode):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": HOST}))  # a live process
    with pytest.raises(UsageError, match=f"in use by another run: pid {os.getppid()} on host {HOST}"):
        check_run_folder(out, resume=None, overwrite=False)
    with pytest.raises(UsageError, match=f"in use by another run: pid {os.getppid()} on host {HOST}"):
        RunLock(out).acquire()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 4194999, "host": HOST}))
    check_run_folder(out, resume=None, overwrite=False)
    claim_run_folder(out, resume=None, overwrite=False)
    assert json.loads((out / LOCK_FILE).read_text()) == {"pid": os.getpid(), "host": HOST}
    release_run_folders()
    assert not (out / LOCK_FILE).exists()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(UsageError, match="pass either --resume_from_ckpt_path or --overwrite_output_dir, not both"):
        check_run_folder(tmp_path, resume="latest", overwrite=True)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _start(out: Path, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, TRAIN, *TINY, "--out_dir", str(out), *flags]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_runs_at_once_one_trains_the_other_exits_2_then_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    flags = ["--max_iters", "100000", "--save_interval", "100000"]
    procs = [_start(out, *flags), _start(out, *flags)]
    try:
        deadline = time.monotonic() + 180
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither run stopped"
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert loser.returncode == 2, loser.stderr.read()[-2000:]
        assert winner.poll() is None  # still training
        assert loser.stderr.read().strip().splitlines()[-1] == (
            f"error: --out_dir {out} is in use by another run: pid {winner.pid} on host {HOST} "
            f"(lock file {out / LOCK_FILE}); wait for it to finish or choose another --out_dir"
        )
        winner.send_signal(signal.SIGKILL)
        winner.wait(timeout=30)
    finally:
        for p in procs:
            p.kill()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == winner.pid  # left behind by the killed run
    assert train(out, "--max_iters", "2", "--save_interval", "100") == 0
    log = (out / "train.log").read_text()
    assert f"taking over the stale lock of pid {winner.pid} on host {HOST}: that run is no longer alive" in log
    assert not (out / LOCK_FILE).exists()
