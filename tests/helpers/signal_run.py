"""`hf-sft train` as a process's entry point, for signal tests, started in a fraction of a second; it can also signal
itself from inside one moment of the run.

usage: signal_run.py TRAIN_FLAGS...   one run, as `hf-sft train TRAIN_FLAGS...`
       signal_run.py --serve          a fork server: imports hf_sft's training code once, then reads JSON lines on
                                      stdin and answers each with one JSON line on stdout:
    {"do": "start", "argv": [...], "log": PATH, "storm": MOMENT or null} -> {"pid": PID}: a forked child becomes the
        run (stdout and stderr to PATH, stdin closed) and exits as the process would, atexit handlers and all;
    {"do": "poll", "pid": PID} -> {"status": STATUS or null}: its exit status once it has ended (-N: killed by N).
A fresh interpreter spends most of its start importing torch and transformers (half a minute on a busy machine);
the children inherit them already imported. The server never runs torch code itself, so forking it is safe.

MOMENT (or SIGNAL_RUN_STORM for a single run): a thread sends this process SIGTERM every 0.5 ms (hundreds of them)
from the moment's first instruction to its last: `checkpoint-N` (Trainer writing checkpoint N), `final` (the final
save) or `setup` (preparing the data, before training). Its start is printed as `signal_run: storm in MOMENT`.
"""

import functools
import gc
import json
import os
import signal
import sys
import threading
import time


def storming(moment: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        done = threading.Event()

        def storm():
            while not done.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.0005)

        print(f"signal_run: storm in {moment}", flush=True)
        thread = threading.Thread(target=storm, daemon=True)
        thread.start()
        try:
            return function(*args, **kwargs)
        finally:
            done.set()
            thread.join()

    return wrapper


def instrument(moment: str) -> None:
    import hf_sft.training.run as run

    if moment == "final":
        run.save_final = storming(moment, run.save_final)
    elif moment == "setup":
        run.build_run_datasets = storming(moment, run.build_run_datasets)
    elif moment.startswith("checkpoint-"):
        step = int(moment.split("-")[1])
        original = run.RunTrainer._save_checkpoint  # the run's whole checkpoint save
        stormed = storming(moment, original)

        def save_checkpoint(self, *args, **kwargs):
            return (stormed if self.state.global_step == step else original)(self, *args, **kwargs)

        run.RunTrainer._save_checkpoint = save_checkpoint
    else:
        raise SystemExit(f"unknown storm moment {moment}")


def serve() -> dict:
    """The fork server's loop; returns only in a forked child, with the request it is to run."""
    import hf_sft.cli  # noqa: F401 - imported once here, inherited by every child
    import hf_sft.training.run  # noqa: F401

    gc.freeze()  # what the children inherit stays out of their garbage collections: no copy-on-write of all of it
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["do"] == "start":
            pid = os.fork()
            if pid == 0:
                return request
            answer = {"pid": pid}
        else:
            done, status = os.waitpid(request["pid"], os.WNOHANG)
            answer = {"status": os.waitstatus_to_exitcode(status) if done else None}
        print(json.dumps(answer), flush=True)
    sys.exit(0)


def become(request: dict) -> None:
    """In the forked child: the server's pipes replaced by the run's log file and /dev/null."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        request = serve()
        become(request)
        flags, moment = request["argv"], request.get("storm")
    else:
        flags, moment = sys.argv[1:], os.environ.get("SIGNAL_RUN_STORM")
    if moment:
        instrument(moment)
    from hf_sft.cli import main

    sys.argv = [sys.argv[0], "train", *flags]
    sys.exit(main())
