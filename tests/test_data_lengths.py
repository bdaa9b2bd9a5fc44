"""Length policies: drop, truncate_input (never the response) and truncate, each counted; max_seq_len resolution."""

from pathlib import Path

import pytest
from transformers import PretrainedConfig

from hf_sft.data.masking import (
    IGNORE_INDEX,
    LENGTH_POLICIES,
    Encoder,
    check_length_policy,
    resolve_max_seq_len,
    tokenize_and_mask,
)
from hf_sft.data.template import prompt_text
from hf_sft.errors import UsageError
from hf_sft.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer(Path(__file__).parent / "fixtures" / "tiny_bpe.json")
ENCODER = Encoder.from_tokenizer(TOKENIZER)
CONTEXT = "The quick brown fox jumps over the lazy dog. " * 6
RECORD = {"instruction": ["Summarise the text."], "input": [CONTEXT], "output": ["A fox jumps over a dog."]}


def n_tokens(text: str) -> int:
    return len(TOKENIZER(text, add_special_tokens=False)["input_ids"])


def full_length() -> int:
    return len(tokenize_and_mask(RECORD, ENCODER)["input_ids"][0])


def response_length() -> int:
    return n_tokens(" A fox jumps over a dog.") + 1


def test_examples_that_fit_are_untouched_by_every_policy():
    limit = full_length()
    for policy in LENGTH_POLICIES:
        out = tokenize_and_mask(RECORD, ENCODER, max_seq_len=limit, length_policy=policy)
        assert out["status"] == ["ok"] and len(out["input_ids"][0]) == limit


def test_drop_removes_the_example_and_says_why():
    out = tokenize_and_mask(RECORD, ENCODER, max_seq_len=full_length() - 1, length_policy="drop")
    assert out["status"] == ["drop:too_long"] and out["input_ids"] == [[]] and out["labels"] == [[]]


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_truncate_input_shortens_only_the_input(cut):
    limit = full_length() - cut
    out = tokenize_and_mask(RECORD, ENCODER, max_seq_len=limit, length_policy="truncate_input")
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert out["status"] == ["truncated_input"] and len(ids) <= limit
    supervised = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert TOKENIZER.decode(supervised) == " A fox jumps over a dog.[EOS]"  # the response is intact
    prompt = TOKENIZER.decode(ids[: len(ids) - len(supervised)])
    assert prompt.startswith("[BOS] Instruction: Summarise the text. Input: The quick")
    shortened = prompt.removeprefix("[BOS] Instruction: Summarise the text. Input: ").removesuffix(" Response:")
    assert CONTEXT.startswith(shortened) and len(shortened) < len(CONTEXT)
    # The kept prompt is exactly how inference tokenises that shortened prompt.
    assert ids[: len(ids) - len(supervised)] == TOKENIZER(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) >= limit - 3, "cuts whole tokens, not much more than needed"


def test_truncate_input_falls_back_to_no_input_then_drops():
    no_input_prompt = n_tokens(prompt_text("Summarise the text.", "", bos_token="[BOS]"))
    fits_without_input = no_input_prompt + response_length()
    out = tokenize_and_mask(RECORD, ENCODER, max_seq_len=fits_without_input, length_policy="truncate_input")
    assert out["status"] == ["truncated_input"]
    assert TOKENIZER.decode(out["input_ids"][0]).startswith("[BOS] Instruction: Summarise the text. Response: A fox")
    out = tokenize_and_mask(RECORD, ENCODER, max_seq_len=fits_without_input - 1, length_policy="truncate_input")
    assert out["status"] == ["drop:too_long_without_input"] and out["input_ids"] == [[]]


def test_truncate_cuts_the_tail_and_drops_rows_left_without_supervision():
    prompt_length = full_length() - response_length()
    out = tokenize_and_mask(RECORD, ENCODER, max_seq_len=prompt_length + 2, length_policy="truncate")
    labels = out["labels"][0]
    assert out["status"] == ["truncated"] and len(labels) == prompt_length + 2
    assert sum(label != IGNORE_INDEX for label in labels) == 2 and TOKENIZER.eos_token_id not in out["input_ids"][0]
    out = tokenize_and_mask(RECORD, ENCODER, max_seq_len=prompt_length, length_policy="truncate")
    assert out["status"] == ["drop:no_supervised_tokens"] and out["labels"] == [[]]


def test_resolve_max_seq_len():
    config = PretrainedConfig(max_position_embeddings=512)
    assert resolve_max_seq_len(None, config) == 512
    assert resolve_max_seq_len(256, config) == 256
    assert resolve_max_seq_len(None, None) is None
    with pytest.raises(UsageError, match="exceeds the model's maximum of 512"):
        resolve_max_seq_len(1024, config)
    with pytest.raises(UsageError, match="at least 2"):
        resolve_max_seq_len(0, config)


def test_unknown_policy_is_a_usage_error():
    with pytest.raises(UsageError, match="drop, truncate_input, truncate"):
        check_length_policy("squeeze")


def test_long_conversations_are_cut_or_dropped():
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how are you?"}] * 2
    whole = tokenize_and_mask({"messages": [turns]}, ENCODER)
    full, labels = whole["input_ids"][0], whole["labels"][0]
    for policy in ("drop", "truncate_input"):
        out = tokenize_and_mask({"messages": [turns]}, ENCODER, max_seq_len=len(full) - 1, length_policy=policy)
        assert out["status"] == ["drop:too_long"] and out["input_ids"] == [[]]
    out = tokenize_and_mask({"messages": [turns]}, ENCODER, max_seq_len=len(full) - 3, length_policy="truncate")
    assert out["status"] == ["truncated"] and out["input_ids"][0] == full[: len(full) - 3]
    first_prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    out = tokenize_and_mask({"messages": [turns]}, ENCODER, max_seq_len=first_prompt, length_policy="truncate")
    assert out["status"] == ["drop:no_supervised_tokens"]
