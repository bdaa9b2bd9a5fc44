"""Under a multi-process launch the main process tokenises; the others read what it left in the `datasets` cache."""

import os
import subprocess
import sys
from pathlib import Path

from helpers.ports import free_port
from test_training import TRAIN, subprocess_env

REPO = Path(__file__).resolve().parents[1]
COUNTER = Path(__file__).resolve().parent / "helpers" / "count_tokenize"  # logs the pid of each tokenising call
TOKENIZER = str(REPO / "tests" / "fixtures" / "tiny_bpe.json")
DATA = str(REPO / "hf_sft" / "demo" / "demo_sample.jsonl")


def test_two_processes_tokenise_once(tmp_path):
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(COUNTER), env.get("PYTHONPATH")) if p)
    env["HF_SFT_TOKENIZE_LOG"] = str(tmp_path / "tokenize.log")
    env["HF_DATASETS_CACHE"] = str(tmp_path / "cache")  # a fresh cache: somebody must tokenise
    config = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--main_process_port", str(free_port()), TRAIN, "--device", "cpu", "--tokenizer_path", TOKENIZER]
    cmd += ["--data_path", DATA, "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "128"]
    cmd += ["--max_seq_len", "128", "--val_split", "0.1", "--max_iters", "1", "--batch_size", "2"]
    cmd += ["--gradient_accumulation_steps", "1", "--eval_steps", "1000", "--sample_max_new_tokens", "1"]
    result = subprocess.run(
        [*cmd, "--out_dir", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engine DDP | world size 2" in (tmp_path / "run" / "train.log").read_text()
    pids = (tmp_path / "tokenize.log").read_text().split()
    # One process tokenised both splits (a call per batch of each); the other only read the cache.
    assert len(set(pids)) == 1 and len(pids) >= 2
