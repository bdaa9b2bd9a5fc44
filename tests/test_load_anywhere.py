"""A trained folder loads through the Auto classes and `pipeline`, with hf_sft unimportable and with it imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_trained import train_tiny

from hf_sft import MODEL_CODE_FILES

LOADER = Path(__file__).resolve().parent / "helpers" / "load_anywhere.py"
AFTER_TRAINING_PAGE = Path(__file__).resolve().parents[1] / "docs" / "after-training.md"
QUESTION = "Do you wish to run the custom code?"  # what transformers asks (and waits for) before running remote code


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("load_anywhere") / "sft")


@pytest.fixture(scope="module")
def reference(trained):
    """What hf_sft itself computes for the loader's fixed input ids and chat prompt."""
    from hf_sft import HfSftGPTForCausalLM
    from hf_sft.tokenizer import load_tokenizer

    model = HfSftGPTForCausalLM.from_pretrained(trained).eval()
    tokenizer = load_tokenizer(trained)
    input_ids = torch.arange(12).remainder(model.config.vocab_size).view(1, 12)
    with torch.no_grad():
        logits = model(input_ids).logits[0]
    return {"logits": logits, "tokenizer": tokenizer}


def run_loader(source: str, mode: str, cwd: Path, env: dict | None = None) -> dict:
    """Run the loader in a fresh interpreter whose cwd and PYTHONPATH do not reach the checkout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", **(env or {})}
    result = subprocess.run(
        [sys.executable, str(LOADER), source, mode],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,  # a trust_remote_code prompt must fail, not wait
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert QUESTION not in result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_report(report: dict, reference: dict) -> None:
    """The loaded model is the trained one, generates the same with and without cache, and chats via the pipeline."""
    assert (report["config"], report["base"], report["model"]) == (
        "HfSftGPTConfig",
        "HfSftGPTModel",
        "HfSftGPTForCausalLM",
    )
    torch.testing.assert_close(torch.tensor(report["logits"]), reference["logits"], atol=1e-5, rtol=1e-5)
    assert report["hidden_shape"] == [1, 12, 32]
    tokenizer = reference["tokenizer"]
    assert report["prompt"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], tokenize=False, add_generation_prompt=True
    )
    assert report["prompt"].startswith(tokenizer.bos_token) and "Name three colours." in report["prompt"]
    assert len(report["cached"]) == 8 and report["cached"] == report["uncached"]
    user, answer = report["chat"]
    assert user == {"role": "user", "content": "Name three colours."}
    assert answer["role"] == "assistant"
    assert answer["content"] == tokenizer.decode(report["cached"], skip_special_tokens=True).strip()


def test_loads_with_trust_remote_code_where_hf_sft_cannot_be_imported(trained, reference, tmp_path):
    report = run_loader(str(trained), "remote", tmp_path)
    assert report["hf_sft_modules"] == []
    # The folder's own copy of the code ran, for the Auto classes and for the pipeline alike.
    assert report["model_module"].startswith("transformers_modules.")
    assert report["pipeline_model_module"].startswith("transformers_modules.")
    check_report(report, reference)


def test_loads_without_trust_remote_code_after_import_hf_sft(trained, reference, tmp_path):
    report = run_loader(str(trained), "registered", tmp_path)
    assert report["model_module"] == "hf_sft.modeling_hfsft_gpt"
    assert report["pipeline_model_module"] == "hf_sft.modeling_hfsft_gpt"
    check_report(report, reference)


def test_saved_folder_carries_the_code_and_auto_map(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hfsft_gpt.HfSftGPTConfig",
        "AutoModel": "modeling_hfsft_gpt.HfSftGPTModel",
        "AutoModelForCausalLM": "modeling_hfsft_gpt.HfSftGPTForCausalLM",
        "AutoModelForSequenceClassification": "modeling_hfsft_gpt.HfSftGPTForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_hfsft_gpt.HfSftGPTForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_hfsft_gpt.HfSftGPTForQuestionAnswering",
    }
    assert {p.name for p in trained.glob("*.py")} == set(MODEL_CODE_FILES)
    for name in MODEL_CODE_FILES:
        code = (trained / name).read_text()
        assert "from hf_sft" not in code and "import hf_sft" not in code, f"{name} imports the hf_sft package"


def test_the_readme_snippet_runs_as_written_without_a_question(trained, tmp_path):
    """The "Load anywhere" snippet, stdin closed and hf_sft unimportable: it answers, and nothing asks to run code."""
    section = AFTER_TRAINING_PAGE.read_text().split("### Load anywhere", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'AutoTokenizer.from_pretrained("out/demo")' in snippet  # no trust_remote_code for the tokenizer
    script = tmp_path / "snippet.py"
    script.write_text("import sys\nsys.modules['hf_sft'] = None\n" + snippet.replace("out/demo", str(trained)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert QUESTION not in result.stdout + result.stderr
    assert result.stdout.strip()  # the pipeline's answer
