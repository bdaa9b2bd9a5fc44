"""`hf-sft generate`: the training prompt, greedy output equal to `model.generate`, cache-independent, interactive."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
from hf_sft.cli import main
from hf_sft.data import FORMATS, encode_prompt, get_format, install_chat_template
from hf_sft.errors import UsageError
from hf_sft.generate import Sampling, generate_response, load_for_generation, prompt_ids
from hf_sft.model_folder import tokenizer_dir
from hf_sft.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_bpe.json"
INSTRUCTIONS = ("Name three colours.", "Is a rose an animal or a plant?")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder from a 4-step demo training of a tiny LLaMA-style model (a few seconds on CPU)."""
    out = tmp_path_factory.mktemp("run") / "sft"
    argv = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "128", "--tokenizer_vocab_size"]
    argv += ["300", "--max_seq_len", "128", "--val_split", "0", "--max_iters", "4", "--save_interval", "4"]
    assert main(["train", "--demo", "--device", "cpu", *argv, "--out_dir", str(out)]) == 0
    return out


def random_model(folder: Path, template=FORMATS["seed"], **fields) -> Path:
    """A random-weight model whose EOS is never the greedy choice, so answers run to max_new_tokens."""
    tokenizer = load_tokenizer(TOKENIZER)
    ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)
    config = HfSftGPTConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **ids | fields)
    model = HfSftGPTForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0
        model.lm_head.weight.mul_(20)  # peaked logits: no near-ties, so the cached and uncached argmax agree
    install_chat_template(tokenizer, template)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reference_answer(model, tokenizer, instruction: str, max_new_tokens: int) -> str:
    ids = torch.tensor([encode_prompt(tokenizer, instruction)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def generate_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("folder", ["run", "checkpoint"])
def test_cli_prints_the_greedy_response_of_model_generate(trained, capsys, folder):
    model_dir = trained if folder == "run" else trained / "checkpoint-4"
    code, out, err = generate_cli(capsys, model_dir, "--instruction", INSTRUCTIONS[0], "--max_new_tokens", "12")
    assert code == 0, err
    model, tokenizer = load_for_generation(model_dir, device="cpu")
    assert out == reference_answer(model, tokenizer, INSTRUCTIONS[0], 12) + "\n"
    assert "Instruction" not in out  # the prompt is not echoed
    assert err == ""


@pytest.mark.parametrize("family", ["nanogpt", "llama"])
def test_cached_equals_uncached(tmp_path, family):
    model, tokenizer = load_for_generation(random_model(tmp_path / "m", family=family), device="cpu")
    for instruction in INSTRUCTIONS:
        cached = generate_response(model, tokenizer, instruction, max_new_tokens=20, use_cache=True)
        uncached = generate_response(model, tokenizer, instruction, max_new_tokens=20, use_cache=False)
        assert cached == uncached
        assert cached == reference_answer(model, tokenizer, instruction, 20)
        assert len(tokenizer.encode(cached, add_special_tokens=False)) >= 10  # it really generated


def test_prompt_is_the_training_prompt(tmp_path):
    tokenizer = load_tokenizer(TOKENIZER)
    question = ("Name a fish.", "Tope or Rope")
    assert prompt_ids(tokenizer, *question) == encode_prompt(tokenizer, *question)
    install_chat_template(tokenizer)
    assert prompt_ids(tokenizer, "Name a fish.") == encode_prompt(tokenizer, "Name a fish.")
    assert prompt_ids(tokenizer, "Name a fish.")[0] == tokenizer.bos_token_id

    # A model trained with another format carries it as its chat template: generation follows it.
    for name in ("alpaca", "chatml"):
        install_chat_template(tokenizer, FORMATS[name])
        assert prompt_ids(tokenizer, "Hi", "there") == encode_prompt(tokenizer, "Hi", "there", template=FORMATS[name])
        assert prompt_ids(tokenizer, "Hi") != encode_prompt(tokenizer, "Hi")
    jinja = tmp_path / "qa.jinja"
    jinja.write_text(
        "{% for m in messages %}{% if m.role == 'assistant' %} =>{{ m.content }}{{ eos_token }}"
        "{% else %}{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %} =>{% endif %}"
    )
    install_chat_template(tokenizer, get_format(str(jinja)))
    assert tokenizer.decode(prompt_ids(tokenizer, "Hi")) == "Hi =>"


@pytest.mark.parametrize("name", list(FORMATS))
def test_cli_uses_the_format_the_folder_was_trained_with(tmp_path, capsys, name):
    folder = random_model(tmp_path / "m", template=FORMATS[name])
    code, out, _ = generate_cli(capsys, folder, "--instruction", INSTRUCTIONS[0], "--max_new_tokens", "6")
    model, tokenizer = load_for_generation(folder, device="cpu")
    ids = torch.tensor([encode_prompt(tokenizer, INSTRUCTIONS[0], template=FORMATS[name])])
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert code == 0 and out.endswith(answer + "\n")  # (a library may log a line of its own first)


def test_learned_positions_stop_at_the_context_limit(tmp_path):
    model, tokenizer = load_for_generation(
        random_model(tmp_path / "m", family="nanogpt", max_position_embeddings=24), device="cpu"
    )
    answer = generate_response(model, tokenizer, "Name a fish.", max_new_tokens=100)
    room = 24 - len(prompt_ids(tokenizer, "Name a fish."))
    assert 0 < len(tokenizer.encode(answer, add_special_tokens=False)) <= room
    with pytest.raises(UsageError, match="reads at most 24"):
        generate_response(model, tokenizer, "word " * 40)


def test_sampling_options(tmp_path, capsys):
    assert Sampling().generate_kwargs()["do_sample"] is False
    assert Sampling(temperature=0).generate_kwargs()["do_sample"] is False
    assert Sampling(top_k=5).generate_kwargs() == {"do_sample": True, "temperature": 1.0, "top_p": None, "top_k": 5}
    folder = random_model(tmp_path / "m", family="llama")
    argv = [folder, "--instruction", "Hi", "--max_new_tokens", "8", "--temperature", "5", "--seed"]
    first, second, other = (generate_cli(capsys, *argv, seed) for seed in ("1", "1", "2"))
    assert first[0] == 0 and first[1] == second[1]  # seeded sampling is reproducible
    assert other[1] != first[1]  # ... and does sample


def test_checkpoint_without_tokenizer_uses_the_run_folder(tmp_path):
    run = random_model(tmp_path / "run", family="llama")
    checkpoint = run / "checkpoint-3"
    checkpoint.mkdir()
    assert tokenizer_dir(run) == run and tokenizer_dir(checkpoint) == run
    (tmp_path / "lonely").mkdir()
    assert tokenizer_dir(tmp_path / "lonely") is None


def test_interactive_answers_each_line_of_stdin(trained):
    model, tokenizer = load_for_generation(trained, device="cpu")
    expected = [reference_answer(model, tokenizer, instruction, 8) for instruction in INSTRUCTIONS]
    proc = subprocess.run(
        [sys.executable, "-m", "hf_sft.cli", "generate", str(trained), "--interactive", "--max_new_tokens", "8"],
        input=f"{INSTRUCTIONS[0]}\n\n{INSTRUCTIONS[1]}\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(answer + "\n" for answer in expected)


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        ("missing", ["--instruction", "x"], "does not exist"),
        ("empty", ["--instruction", "x"], "has no config.json"),
        ("adapter", ["--instruction", "x"], "LoRA adapter"),
        ("file", ["--instruction", "x"], "is not a folder"),
        ("empty", [], "--instruction"),
        ("empty", ["--instruction", "x", "--top_p", "1.5"], "--top_p"),
        ("empty", ["--instruction", "x", "--max_new_tokens", "0"], "--max_new_tokens"),
        # undecodable bytes of argv reach Python as lone surrogates (surrogateescape)
        ("empty", ["--instruction", "bad \udcff text"], "--instruction is not valid UTF-8 text (byte 0xff at"),
        ("empty", ["--instruction", "x", "--input", "\udcfe"], "--input is not valid UTF-8 text (byte 0xfe at"),
    ],
)
def test_bad_model_dir_or_options_exit_2(tmp_path, capsys, setup, argv, message):
    target = tmp_path / "model"
    if setup in ("empty", "adapter"):
        target.mkdir()
    if setup == "adapter":
        (target / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    if setup == "file":
        target.write_text("")
    code, out, err = generate_cli(capsys, target, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err


def test_interactive_refuses_a_line_of_stdin_that_is_not_utf8(tmp_path, capsys, monkeypatch):
    folder = random_model(tmp_path / "model")
    capsys.readouterr()
    lines = io.TextIOWrapper(io.BytesIO(b"Name three colours.\nbad \xfe line\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", lines)
    code, out, err = generate_cli(capsys, folder, "--interactive", "--max_new_tokens", "2", "--device", "cpu")
    assert code == 2 and out.endswith("\n")  # the first line was answered before
    assert err.strip() == "error: standard input line 2 is not valid UTF-8 text (byte 0xfe at character 4)"
