"""Prompt formats: seed text, built-ins as saved chat templates, user Jinja files, the format a folder keeps."""

import doctest
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import hf_sft.data.template as template_module
from hf_sft.data.template import FORMATS, SEED, format_of, get_format, install_chat_template, prompt_text
from hf_sft.errors import UsageError
from hf_sft.tokenizer import load_tokenizer

TINY_TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_bpe.json"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Pick one.", "input": "Tope or Rope"},
    {"role": "assistant", "content": "Tope"},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "It is a shark."},
]


def test_doctests():
    assert doctest.testmod(template_module).failed == 0


def test_seed_format_with_and_without_input():
    assert prompt_text("Name a fish.", "Tope or Rope", bos_token="[BOS]") == (
        "[BOS] Instruction: Name a fish. Input: Tope or Rope Response:"
    )
    assert prompt_text("Name a fish.", "", bos_token="[BOS]") == "[BOS] Instruction: Name a fish. Response:"
    assert prompt_text("Name a fish.", " \n ", bos_token="[BOS]") == "[BOS] Instruction: Name a fish. Response:"
    assert SEED.response_text("Tope") == " Tope"


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("user_input", ["Tope or Rope", "  ", None, ""])
def test_saved_chat_template_gives_the_training_prompt(tmp_path, name, user_input):
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    install_chat_template(tokenizer, FORMATS[name])
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    message = {"role": "user", "content": "Pick one.", "input": user_input}
    text = reloaded.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
    assert text == FORMATS[name].prompt_text("Pick one.", user_input or "", bos_token="[BOS]")
    assert format_of(reloaded) is FORMATS[name]  # the folder remembers its format


@pytest.mark.parametrize("name", list(FORMATS))
def test_segments_are_the_rendered_conversation_cut_at_each_answer(name):
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    install_chat_template(tokenizer, FORMATS[name])
    pieces = FORMATS[name].segments(CONVERSATION, bos_token="[BOS]")
    assert [supervised for _, supervised in pieces] == [False, True, False, True]
    assert pieces[1][0] == FORMATS[name].response_text("Tope")
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == "".join(text + ("[EOS]" if supervised else "") for text, supervised in pieces)


def test_seed_text_of_a_conversation():
    text = load_tokenizer(TINY_TOKENIZER)
    install_chat_template(text, SEED)
    assert text.apply_chat_template(CONVERSATION[1:3], tokenize=False) == (
        "[BOS] Instruction: Pick one. Input: Tope or Rope Response: Tope[EOS]"
    )


def test_a_user_jinja_file_is_a_format(tmp_path):
    path = tmp_path / "qa.jinja"
    path.write_text(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n"
        "{% elif m.role == 'assistant' %}A: {{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    fmt = get_format(str(path))
    assert fmt.bos and fmt.prompt_text("Hi", bos_token="[BOS]") == "[BOS]Q: Hi\nA:"
    assert fmt.response_text("Hello") == " Hello"
    pieces = fmt.segments(CONVERSATION[1:], bos_token="[BOS]", eos_token="[EOS]")
    assert pieces == [
        ("[BOS]Q: Pick one.\nA:", False),
        (" Tope", True),
        ("\nQ: Why?\nA:", False),
        (" It is a shark.", True),
    ]
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    install_chat_template(tokenizer, fmt)
    assert format_of(tokenizer).template == fmt.template


@pytest.mark.parametrize(
    "content, message",
    [
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "does not end with"),  # no EOS: would never stop
        ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
    ],
)
def test_unusable_jinja_files_are_usage_errors(tmp_path, content, message):
    path = tmp_path / "bad.jinja"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        get_format(str(path))
    with pytest.raises(UsageError, match="not one of seed, alpaca, chatml"):
        get_format(str(tmp_path / "missing.jinja"))


@pytest.mark.parametrize("name", list(FORMATS))
def test_saved_tokenizer_encodes_like_a_stock_one(tmp_path, name):
    """The calls evaluation harnesses make (lm_eval's hf backend: `tokenizer(text)` / `encode` with special tokens
    for plain prompts, `apply_chat_template` for chat prompts): BOS once where the format starts with it."""
    fmt = FORMATS[name]
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    install_chat_template(tokenizer, fmt)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    bos = reloaded.bos_token_id
    plain = reloaded("Question: Is a rose a plant? Answer:")["input_ids"]
    bare = reloaded("Question: Is a rose a plant? Answer:", add_special_tokens=False)["input_ids"]
    assert plain == ([bos] if fmt.bos else []) + bare and bos not in bare
    assert reloaded.encode(" yes") == ([bos] if fmt.bos else []) + reloaded.encode(" yes", add_special_tokens=False)
    chat_ids = reloaded.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=False
    )
    assert chat_ids.count(bos) == (1 if fmt.bos else 0) and (chat_ids[0] == bos) == fmt.bos
    assert reloaded.decode(plain, skip_special_tokens=True) == "Question: Is a rose a plant? Answer:"
