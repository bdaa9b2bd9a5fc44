"""Converted folders load and generate through the Auto classes in a process where hf_sft cannot be imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.legacy_checkpoints import NANOGPT, PAIRS, SIMPLE_LLAMA, shared_checkpoint, shared_tokenizer

from hf_sft.legacy import convert_to_folder

LOADER = Path(__file__).resolve().parent / "helpers" / "standalone_load.py"


@pytest.fixture(scope="module")
def converted(shared_dir, tmp_path_factory):
    folders = {}
    for checkpoint in (NANOGPT, SIMPLE_LLAMA):
        out = tmp_path_factory.mktemp("converted") / checkpoint.split(".")[0]
        specials = PAIRS[checkpoint][1]
        convert_to_folder(
            shared_checkpoint(shared_dir, checkpoint), shared_tokenizer(shared_dir, checkpoint), out, **specials
        )
        expected = shared_checkpoint(shared_dir, checkpoint.rsplit(".", 1)[0] + ".expected.pt")
        folders[checkpoint] = (str(out), str(expected))
    return folders


def test_folders_load_and_generate_without_hf_sft(converted, tmp_path):
    # cwd is a temp dir and the loader lives in tests/helpers: the checkout is not on sys.path.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(LOADER), json.dumps(list(converted.values()))],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,  # a trust_remote_code prompt must fail, not wait
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Do you wish to run the custom code" not in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("hf_sft_modules") == []
    for folder, _ in converted.values():
        loaded = report[folder]
        assert loaded["config"] == "HfSftGPTConfig" and loaded["base"] == "HfSftGPTModel"
        assert loaded["model_module"].startswith("transformers_modules.")  # the folder's copy of the code
        assert loaded["max_logit_error"] < 1e-4
        assert loaded["hidden_shape"] == [2, 48, 64]
        assert len(loaded["cached"]) == 16 and loaded["cached"] == loaded["uncached"]
        assert loaded["pipeline_text"].startswith("Instruction: Name three colours. Response:")
        assert len(loaded["pipeline_text"]) > len("Instruction: Name three colours. Response:")
