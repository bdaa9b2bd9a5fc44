"""Masking: prompt tokens as inference computes them, response + EOS supervised; length policies, each counted."""

import doctest
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import PretrainedConfig

import hf_sft.data.masking as masking_module
from hf_sft.data.masking import (
    IGNORE_INDEX,
    LENGTH_POLICIES,
    Encoder,
    check_length_policy,
    encode_prompt,
    resolve_max_seq_len,
    tokenize_and_mask,
    unencodable_characters,
)
from hf_sft.data.template import FORMATS, install_chat_template, prompt_text
from hf_sft.errors import UsageError
from hf_sft.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SIMPLE_LLAMA_SPECIALS = {"bos_token": "<SOS>", "eos_token": "<EOS>", "pad_token": "<PAD>", "unk_token": "<UNK>"}
DOLLY_TOKENIZERS = {"dolly_bpe_4k.json": {}, "simple_llama_bpe_8k.json": SIMPLE_LLAMA_SPECIALS}


def batch_of(records):
    return {
        "instruction": [r["instruction"] for r in records],
        "input": [r.get("input", r.get("context")) or "" for r in records],
        "output": [r.get("output", r.get("response")) for r in records],
    }


def prefix_space_tokenizer(tmp_path):
    """The tiny tokenizer with simple_llama's pre-tokenizer setting: ByteLevel(add_prefix_space=True)."""
    spec = json.loads((FIXTURES / "tiny_bpe.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    path = tmp_path / "prefix_space.json"
    path.write_text(json.dumps(spec))
    return load_tokenizer(path)


def test_doctests():
    assert doctest.testmod(masking_module).failed == 0


def test_labels_mask_exactly_the_prompt():
    tokenizer = load_tokenizer(FIXTURES / "tiny_bpe.json")
    records = [{"instruction": "Which is a fish?", "input": "Tope or Rope", "output": "Tope"}]
    out = tokenize_and_mask(batch_of(records), Encoder.from_tokenizer(tokenizer))
    ids, labels = out["input_ids"][0], out["labels"][0]
    prompt = tokenizer(prompt_text("Which is a fish?", "Tope or Rope", bos_token="[BOS]"), add_special_tokens=False)
    n_prompt = len(prompt["input_ids"])
    assert ids[:n_prompt] == prompt["input_ids"]
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids[n_prompt:]) == " Tope[EOS]"
    assert out["attention_mask"][0] == [1] * len(ids) and out["status"] == ["ok"]


def test_prefix_space_pretokenizer_does_not_add_a_second_space(tmp_path):
    tokenizer = prefix_space_tokenizer(tmp_path)
    assert tokenizer.backend_tokenizer.encode("Tope").tokens[0].startswith("Ġ")  # the trap: a space from nowhere
    records = [{"instruction": "Name a fish.", "output": "Tope"}, {"instruction": "Hi", "output": "\nHow are you?"}]
    out = tokenize_and_mask(batch_of(records), Encoder.from_tokenizer(tokenizer))
    for record, ids, labels in zip(records, out["input_ids"], out["labels"], strict=True):
        supervised = [token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
        assert tokenizer.decode(supervised) == " " + record["output"] + "[EOS]"
        n_prompt = len(ids) - len(supervised)
        assert ids[:n_prompt] == encode_prompt(tokenizer, record["instruction"])


@pytest.mark.parametrize("name", list(FORMATS))
def test_prompt_ids_equal_the_chat_template_ids(name):
    tokenizer = load_tokenizer(FIXTURES / "tiny_bpe.json")
    install_chat_template(tokenizer, FORMATS[name])
    records = [{"instruction": "Summarise the text.", "input": "The cat sat.", "output": "A cat sat."}]
    out = tokenize_and_mask(batch_of(records), Encoder.from_tokenizer(tokenizer), FORMATS[name])
    message = {"role": "user", "content": "Summarise the text.", "input": "The cat sat."}
    chat_ids = tokenizer.apply_chat_template([message], add_generation_prompt=True, return_dict=False)
    assert out["input_ids"][0][: len(chat_ids)] == chat_ids
    assert out["labels"][0][len(chat_ids) - 1] == IGNORE_INDEX and out["labels"][0][len(chat_ids)] != IGNORE_INDEX


def test_special_token_strings_in_the_response_stay_text():
    tokenizer = load_tokenizer(FIXTURES / "tiny_bpe.json")
    out = tokenize_and_mask(batch_of([{"instruction": "Hi", "output": "ok"}]), Encoder.from_tokenizer(tokenizer))
    assert out["input_ids"][0].count(tokenizer.eos_token_id) == 1


def test_unencodable_characters_are_found(tmp_path):
    spec = json.loads((FIXTURES / "tiny_bpe.json").read_text())
    for symbol in ("Ã", "©"):  # the two byte-level symbols of 'é'
        del spec["model"]["vocab"][symbol]
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "Ã" not in str(m) and "©" not in str(m)]
    path = tmp_path / "no_e_acute.json"
    path.write_text(json.dumps(spec))
    encoder = Encoder.from_tokenizer(load_tokenizer(path))
    assert unencodable_characters(encoder, ["café au lait", "naïve", "ok"]) == "éï"  # ï shares the byte Ã
    assert unencodable_characters(Encoder.from_tokenizer(load_tokenizer(FIXTURES / "tiny_bpe.json")), ["café"]) == ""


def test_encoder_pickles_for_multiprocess_map(tmp_path):
    import pickle

    encoder = Encoder.from_tokenizer(prefix_space_tokenizer(tmp_path))
    clone = pickle.loads(pickle.dumps(encoder))
    assert isinstance(clone.response, Tokenizer)
    assert clone.encode_responses([" Tope"]) == encoder.encode_responses([" Tope"])


def dolly(shared_dir, tokenizer_file):
    tokenizer = load_tokenizer(shared_dir / "data" / "tokenizers" / tokenizer_file, **DOLLY_TOKENIZERS[tokenizer_file])
    lines = (shared_dir / "data" / "dolly" / "dolly_sample.jsonl").read_text(encoding="utf-8").splitlines()
    return tokenizer, [json.loads(line) for line in lines]


def representable_in(tokenizer, texts):
    """simple_llama's vocabulary lacks every non-ASCII byte (and tab, '{', ...): its BPE drops those characters, so
    exact text is expected up to them."""
    lost = set(unencodable_characters(Encoder.from_tokenizer(tokenizer), texts))
    return lambda text: "".join(char for char in text if char not in lost)


def as_decoded(prompt: str, tokenizer) -> set[str]:
    """A prompt as decoding its ids may show it: simple_llama's pre-tokenizer puts a space before the text at the
    start and after a special token (inference tokenises the prompt the same way)."""
    if tokenizer.bos_token != "<SOS>":
        return {prompt}
    return {prompt, " " + prompt, prompt.replace("<SOS>", "<SOS> ", 1)}


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("tokenizer_file", list(DOLLY_TOKENIZERS))
def test_every_dolly_record_is_masked_exactly(shared_dir, tokenizer_file, name):
    template = FORMATS[name]
    tokenizer, records = dolly(shared_dir, tokenizer_file)
    out = tokenize_and_mask(batch_of(records), Encoder.from_tokenizer(tokenizer), template, max_seq_len=2048)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token
    texts = [text for record in records for text in (record["instruction"], record["context"], record["response"])]
    representable = representable_in(tokenizer, [*texts, template.chat_template()])
    assert (representable("é{") == "é{") == (tokenizer_file != "simple_llama_bpe_8k.json")

    checked = 0
    for record, ids, labels, status in zip(records, out["input_ids"], out["labels"], out["status"], strict=True):
        if status != "ok":
            assert status == "drop:too_long" and ids == []
            continue
        supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        start = supervised[0]
        assert supervised == list(range(start, len(ids))), "supervised positions are one run to the end"
        assert ids[-1] == eos and eos not in ids[:-1]
        assert all(labels[i] == ids[i] for i in supervised)
        # The supervised text is the format's answer text (seed: one space, then the response), exactly.
        assert tokenizer.decode(ids[start:-1]) == representable(template.response_text(record["response"]))
        expected_prompt = template.prompt_text(record["instruction"], record["context"], bos_token=bos)
        assert tokenizer.decode(ids[:start]) in as_decoded(representable(expected_prompt), tokenizer)
        if record["context"].strip():
            assert record["context"] in expected_prompt
        # The prompt ids are what inference feeds the model for this prompt.
        assert ids[:start] == tokenizer(expected_prompt, add_special_tokens=False)["input_ids"]
        checked += 1
    assert checked == len(records) - out["status"].count("drop:too_long") and checked >= 190


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("tokenizer_file", list(DOLLY_TOKENIZERS))
def test_multi_turn_labels_cover_exactly_the_assistant_turns(shared_dir, tokenizer_file, name):
    """Dolly records chained three to a conversation (with a system turn): every boundary is exact."""
    template = FORMATS[name]
    tokenizer, records = dolly(shared_dir, tokenizer_file)
    conversations = []
    for start in range(0, 60, 3):
        turns = [{"role": "system", "content": "Answer briefly."}]
        for record in records[start : start + 3]:
            turns += [
                {"role": "user", "content": record["instruction"]},
                {"role": "assistant", "content": record["response"]},
            ]
        conversations.append(turns)
    out = tokenize_and_mask({"messages": conversations}, Encoder.from_tokenizer(tokenizer), template)
    representable = representable_in(
        tokenizer, [t["content"] for c in conversations for t in c] + [template.chat_template()]
    )
    install_chat_template(tokenizer, template)
    for turns, ids, labels in zip(conversations, out["input_ids"], out["labels"], strict=True):
        runs, current = [], []
        for position, label in enumerate(labels):
            if label != IGNORE_INDEX:
                current.append(position)
            elif current:
                runs.append(current)
                current = []
        runs += [current] if current else []
        answers = [turn["content"] for turn in turns if turn["role"] == "assistant"]
        assert len(runs) == len(answers) == 3
        for run, answer in zip(runs, answers, strict=True):
            assert ids[run[-1]] == tokenizer.eos_token_id and all(labels[i] == ids[i] for i in run)
            assert tokenizer.decode(ids[run[0] : run[-1]]) == representable(template.response_text(answer))
        # The whole example is the conversation as the saved chat template renders it.
        whole = tokenizer.apply_chat_template(turns, tokenize=False)
        assert tokenizer.decode(ids) in as_decoded(representable(whole), tokenizer)
        # Each answer's prompt is what inference would feed the model at that turn.
        for run, turn in zip(runs, [i for i, t in enumerate(turns) if t["role"] == "assistant"], strict=True):
            prompt = tokenizer.apply_chat_template(turns[:turn], tokenize=False, add_generation_prompt=True)
            assert tokenizer.decode(ids[: run[0]]) in as_decoded(representable(prompt), tokenizer)


# Length policies: drop, truncate_input (never the response) and truncate, each counted; max_seq_len resolution.


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
