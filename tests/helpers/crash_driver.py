"""A tiny run SIGKILLed at seeded moments, then finished by `--resume_from_ckpt_path latest`.

usage: crash_driver.py ROOT SEED N_TIMED N_INJECTED

Everything is imported once and every run is a fork of this process, so a run starts in milliseconds. ROOT/reference
is an uninterrupted run. Each attempt ROOT/attempt-I is killed either after a random delay (N_TIMED of them) or at
its N-th write (N_INJECTED: an fsync of `hf_sft.writer` or a `torch.save`, half of them during the final save), then
inspected, then finished with `--resume_from_ckpt_path latest` (or, when no checkpoint exists yet, the same command
again). Prints one JSON object per attempt: how it was killed, what the folder held after the kill (checkpoints,
those that do not verify, files that do not read back, an unfinished final save), and the finishing run's status.
"""

import json
import os
import random
import signal
import sys
import time
import zipfile
from pathlib import Path

import torch

torch.set_num_threads(1)

import hf_sft.training.final_folder  # noqa: E402
import hf_sft.writer  # noqa: E402
from hf_sft.cli import main  # noqa: E402
from hf_sft.training.checkpoints import list_checkpoints, problem  # noqa: E402

RUN = [
    "train", "--demo", "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "128",
    "--tokenizer_vocab_size", "300", "--max_seq_len", "128", "--val_split", "0", "--learning_rate", "1e-3",
    "--warmup_steps", "2", "--log_interval", "1", "--seed", "0", "--dropout", "0", "--max_iters", "6",
    "--save_interval", "1", "--save_total_limit", "2", "--batch_size", "2", "--gradient_accumulation_steps", "1",
]  # fmt: skip


def count_writes(kill_at: int | None) -> dict:
    """In a child: count fsyncs and torch.save calls, SIGKILL at the `kill_at`-th; note where the final save starts."""
    counter = {"writes": 0, "final_save_at": None}

    def counted(real):
        def write(*args, **kwargs):
            counter["writes"] += 1
            if counter["writes"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return write

    hf_sft.writer._fsync_path = counted(hf_sft.writer._fsync_path)
    torch.save = counted(torch.save)
    real_replace_files = hf_sft.training.final_folder.replace_files

    def replace_files(*args, **kwargs):
        counter["final_save_at"] = counter["writes"] + 1
        return real_replace_files(*args, **kwargs)

    hf_sft.training.final_folder.replace_files = replace_files
    return counter


def run_child(argv: list[str], log: Path, kill_at: int | None = None, record: Path | None = None) -> int:
    """Fork a process running `hf-sft` with `argv` (output to `log`); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        counter = count_writes(kill_at)
        status = main(argv)
        if record is not None:
            record.write_text(json.dumps(counter))
    except BaseException:  # noqa: BLE001 - a child never returns into the driver's loop
        status = 99
    os._exit(status)


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def unreadable(folder: Path) -> list[str]:
    """Files of `folder` that do not read back whole (checked without hf_sft: zip CRCs, safetensors, JSON)."""
    from safetensors.torch import load_file

    bad = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    assert archive.testzip() is None
            elif path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix == ".json" or path.name == "checkpoint_complete":
                json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - any failure to read back is the finding
            bad.append(f"{path.relative_to(folder)}: {type(err).__name__}")
    return bad


def inspect(out: Path) -> dict:
    found = list_checkpoints(out, complete_only=False)
    return {
        "checkpoints": [p.name for p in found],
        "unverified": {p.name: problem(p) for p in found if problem(p)},
        "unreadable": {p.name: unreadable(p) for p in found if unreadable(p)},
        "final_incomplete": hf_sft.writer.incomplete(out) is not None,
    }


def main_loop(root: Path, seed: int, n_timed: int, n_injected: int) -> None:
    rng = random.Random(seed)
    reference = root / "reference"
    started = time.monotonic()
    status = wait(run_child([*RUN, "--out_dir", str(reference)], root / "reference.log", record=root / "writes.json"))
    duration = time.monotonic() - started
    counts = json.loads((root / "writes.json").read_text())
    print(json.dumps({"reference": status, "seconds": round(duration, 2), **counts}), flush=True)
    writes, final_at = counts["writes"], counts["final_save_at"]
    plans = [("timed", rng.uniform(0.0, duration)) for _ in range(n_timed)]
    plans += [("write", rng.randint(1, final_at - 1)) for _ in range(n_injected - n_injected // 2)]
    plans += [("write", rng.randint(final_at, writes)) for _ in range(n_injected // 2)]
    for attempt, (kind, when) in enumerate(plans):
        out = root / f"attempt-{attempt}"
        log = root / f"attempt-{attempt}.log"
        first = [*RUN, "--out_dir", str(out)]
        pid = run_child(first, log, kill_at=when if kind == "write" else None)
        if kind == "timed":
            time.sleep(when)
            os.kill(pid, signal.SIGKILL)  # a child that already finished is a zombie until waited: no error
        killed = wait(pid) == -signal.SIGKILL
        state = inspect(out)
        resumed = [*RUN[:1], "--resume_from_ckpt_path", "latest", "--out_dir", str(out)]
        command = resumed if state["checkpoints"] else first
        finish = wait(run_child(command, root / f"attempt-{attempt}.finish.log"))
        result = {"attempt": attempt, "kill": f"{kind} {when:.3g}", "killed": killed, **state}
        print(json.dumps({**result, "finish": finish, "command": "latest" if command is resumed else "again"}))


if __name__ == "__main__":
    main_loop(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
