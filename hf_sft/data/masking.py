"""Tokenisation and label masking: the one place that decides which tokens the model is trained to emit.

The prompt format (`hf_sft.data.template`) cuts an example into segments: prompt text, then for each assistant turn
its supervised text, then the next turn's prompt text, and so on. Each segment is tokenised on its own and the ids
concatenated:

- the first segment (the prompt, BOS string included) through the tokenizer exactly as inference tokenises it, so
  the prompt tokens seen in training are the tokens `hf-sft generate` feeds the model;
- every later segment through a copy of the tokenizer that never adds a prefix space; each supervised one is
  followed by the EOS id. These are exactly the tokens the model must emit after its prompt: no BPE merge crosses a
  turn boundary and decoding them gives back the response text followed by EOS.

Labels are -100 on prompt segments and equal to the input ids on the responses and their EOS (unshifted: the model
shifts). An instruction record (`instruction`, `input`, `output`) is one user turn and one assistant turn; a
`messages` record may hold several of each.

Length policy: what happens to an example longer than `max_seq_len` tokens.

- `drop` (default, as simple_llama does): the example is left out and counted as `too_long`.
- `truncate_input`: the input/context is cut from its end (whole tokens) until the example fits; if it does not fit
  even without any input, the example is dropped as `too_long_without_input`. The response is never shortened.
- `truncate`: the token sequence is cut at `max_seq_len` (the response tail and EOS are lost); an example whose prompt
  alone fills `max_seq_len` keeps no supervised token and is dropped as `no_supervised_tokens`.

A conversation (a `messages` record) has no single input to shorten: `truncate_input` drops it as `too_long`, and
`truncate` cuts it at `max_seq_len` like any example.

Every dropped example is counted by reason, and a kept example that was shortened is counted too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

from tokenizers import Tokenizer

from hf_sft.data.template import DEFAULT_FORMAT, PromptFormat
from hf_sft.errors import UsageError

IGNORE_INDEX = -100
MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")
LENGTH_POLICIES = ("drop", "truncate_input", "truncate")
STATUS_COLUMN = "status"
LOST_COLUMN = "lost_characters"


@dataclass(frozen=True)
class Encoder:
    """The tokenizer split in the two roles above; picklable, so `datasets.map(num_proc=N)` can ship it.

    Args:
        prompt: the tokenizer's own backend (what inference uses on the prompt).
        response: the same backend with any prefix-space insertion switched off.
        bos_token: BOS token string placed by the template.
        eos_token_id: id appended after every response.
    """

    prompt: Tokenizer
    response: Tokenizer
    bos_token: str
    eos_token_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Encoder:
        """Build from a `PreTrainedTokenizerFast` (as returned by `hf_sft.tokenizer.load_tokenizer`)."""
        backend = tokenizer.backend_tokenizer
        return cls(backend, _without_prefix_space(backend), tokenizer.bos_token, tokenizer.eos_token_id)

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of prompt texts, as inference computes them."""
        return [enc.ids for enc in self.prompt.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_responses(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of response texts followed by EOS."""
        eos = [self.eos_token_id]
        return [ids + eos for ids in self.encode_continuations(texts)]

    def encode_continuations(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of texts that follow earlier text (no prefix space added)."""
        return [enc.ids for enc in self.response.encode_batch_fast(list(texts), add_special_tokens=False)]


def unencodable_characters(encoder: Encoder, texts: Sequence[str]) -> str:
    """The characters of `texts` that do not survive encoding and decoding (e.g. missing from a byte-level vocabulary).

    Such characters are silently lost by the tokenizer (or become UNK); training on the text teaches the model the
    text without them. Each distinct character is checked once, so this is cheap even for large datasets.

    Args:
        encoder: the tokenizer's `Encoder`.
        texts: the record texts.

    Returns:
        The offending characters, sorted, as one string ("" when the tokenizer represents everything).
    """
    chars = sorted(set("".join(texts)) - {" "})
    encoded = encoder.response.encode_batch_fast(chars, add_special_tokens=False)
    decoded = encoder.response.decode_batch([enc.ids for enc in encoded], skip_special_tokens=False)
    return "".join(char for char, back in zip(chars, decoded, strict=True) if back != char)


def encode_prompt(tokenizer, instruction: str, input: str = "", template: PromptFormat = DEFAULT_FORMAT) -> list[int]:
    """Token ids of the inference prompt for one instruction: the same ids training used for this prompt.

    Args:
        tokenizer: the model's `PreTrainedTokenizerFast`.
        instruction: the task.
        input: optional context.
        template: the training format.

    Returns:
        The prompt ids, starting with BOS when the template places it.
    """
    text = template.prompt_text(instruction, input, bos_token=tokenizer.bos_token)
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def tokenize_and_mask(
    batch: dict[str, list],
    encoder: Encoder,
    template: PromptFormat = DEFAULT_FORMAT,
    max_seq_len: int | None = None,
    length_policy: str = "drop",
) -> dict[str, list]:
    """Tokenise a batch of records and mask everything but the responses: the `datasets.map(batched=True)` function.

    Args:
        batch: columns `instruction`, `input`, `output` (lists of strings), or `messages` (lists of turns).
        encoder: `Encoder.from_tokenizer(tokenizer)`.
        template: the prompt format.
        max_seq_len: longest allowed example in tokens (EOS included); `None` for no limit.
        length_policy: what to do with longer examples, see `LENGTH_POLICIES`.

    Returns:
        Columns `input_ids`, `attention_mask`, `labels` (unshifted, -100 where not supervised), `status`:
        `"ok"`, or a kept-but-shortened status (`"truncated_input"`, `"truncated"`), or `"drop:<reason>"` with
        empty token lists (the caller filters those rows out and counts them), and `lost_characters`: the
        characters of the example's text that the tokenizer cannot represent (see `unencodable_characters`).

    With a word-level tokenizer whose vocabulary is the words below (`[BOS]`=1, `[EOS]`=2):

    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> words = ["[PAD]", "[BOS]", "[EOS]", "Instruction:", "Response:", "Hi", "Hello"]
    >>> backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    >>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> encoder = Encoder(backend, backend, bos_token="[BOS]", eos_token_id=2)
    >>> row = tokenize_and_mask({"instruction": ["Hi"], "input": [""], "output": ["Hello"]}, encoder)
    >>> row["input_ids"], row["labels"], row["attention_mask"], row["status"]
    ([[1, 3, 5, 4, 6, 2]], [[-100, -100, -100, -100, 6, 2]], [[1, 1, 1, 1, 1, 1]], ['ok'])
    >>> turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}] * 2
    >>> tokenize_and_mask({"messages": [turns]}, encoder)["labels"]
    [[-100, -100, -100, -100, 6, 2, -100, -100, -100, 6, 2]]
    """
    if "messages" in batch:
        pieces = [_supervised_prefix(template.segments(turns, encoder.bos_token)) for turns in batch["messages"]]
        instructions = inputs = None
    else:
        instructions, inputs = batch["instruction"], batch["input"]
        pieces = [
            [(template.prompt_text(ins, inp, bos_token=encoder.bos_token), False), (template.response_text(out), True)]
            for ins, inp, out in zip(instructions, inputs, batch["output"], strict=True)
        ]
    chunks = _encode_pieces(pieces, encoder)
    texts = [[text for text, _ in example] for example in pieces]
    lost = set(unencodable_characters(encoder, ["".join(parts) for parts in texts]))

    input_ids, attention_mask, labels, status = [], [], [], []
    for i, parts in enumerate(chunks):
        outcome = "ok"
        if max_seq_len is not None and sum(map(len, (ids for ids, _ in parts))) > max_seq_len:
            if instructions is None:  # a conversation has no single input to shorten
                parts, outcome = fit_conversation(parts, max_seq_len, length_policy)
            else:
                (prompt, _), (response, _) = parts
                fitted = fit_example(
                    prompt, response, instructions[i], inputs[i], encoder, template, max_seq_len, length_policy
                )
                parts, outcome = [(fitted.prompt, False), (fitted.response, True)], fitted.status
        # Whole chunks joined (not token by token): this loop runs for every example of the dataset.
        ids = list(chain.from_iterable(chunk for chunk, _ in parts))
        input_ids.append(ids)
        attention_mask.append([1] * len(ids))
        labels.append(list(chain.from_iterable(chunk if on else [IGNORE_INDEX] * len(chunk) for chunk, on in parts)))
        status.append(outcome)
    lost_by_row = ["".join(sorted(lost.intersection("".join(parts)))) if lost else "" for parts in texts]
    columns = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, STATUS_COLUMN: status}
    return columns | {LOST_COLUMN: lost_by_row}


def _supervised_prefix(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The pieces up to the last supervised one: text after the last answer teaches nothing."""
    last = max(i for i, (_, supervised) in enumerate(pieces) if supervised)
    return pieces[: last + 1]


def _encode_pieces(pieces: list[list[tuple[str, bool]]], encoder: Encoder) -> list[list[tuple[list[int], bool]]]:
    """Ids of every piece, batched: first pieces as prompts, later ones as continuations, EOS after answers."""
    firsts = encoder.encode_prompts([example[0][0] for example in pieces])
    later = [(text, supervised) for example in pieces for text, supervised in example[1:]]
    later_ids = iter(encoder.encode_continuations([text for text, _ in later]))
    eos = [encoder.eos_token_id]
    out = []
    for example, first in zip(pieces, firsts, strict=True):
        chunks = [(first, example[0][1])]
        for _, supervised in example[1:]:
            ids = next(later_ids)
            chunks.append((ids + eos if supervised else ids, supervised))
        out.append(chunks)
    return out


def _without_prefix_space(backend: Tokenizer) -> Tokenizer:
    """A copy of `backend` that tokenises text as written, without prepending a space (or a metaspace)."""
    spec = json.loads(backend.to_str())
    changed = _strip_prefix_space(spec.get("pre_tokenizer")) | _strip_prefix_space(spec.get("normalizer"))
    if isinstance(spec.get("normalizer"), dict) and spec["normalizer"].get("type") == "Prepend":
        spec["normalizer"], changed = None, True
    return Tokenizer.from_str(json.dumps(spec)) if changed else backend


def _strip_prefix_space(component: dict | None) -> bool:
    """Switch off prefix-space options in a pre-tokenizer/normalizer spec (recursing into sequences)."""
    if not isinstance(component, dict):
        return False
    changed = False
    if component.get("add_prefix_space"):
        component["add_prefix_space"] = False
        changed = True
    if component.get("type") == "Metaspace" and component.get("prepend_scheme", "never") != "never":
        component["prepend_scheme"] = "never"
        changed = True
    for key in ("pretokenizers", "normalizers"):
        parts = component.get(key) or []
        kept = [part for part in parts if not (isinstance(part, dict) and part.get("type") == "Prepend")]
        changed |= len(kept) != len(parts)
        if key in component:
            component[key] = kept
        for part in kept:
            changed |= _strip_prefix_space(part)
    return changed


# The length policy (see the module docstring): what masking does with an example longer than `max_seq_len`.


@dataclass(frozen=True)
class Fitted:
    """Prompt and response ids of one example after the length policy, and what happened to it."""

    prompt: list[int]
    response: list[int]
    status: str = "ok"


def check_length_policy(policy: str) -> str:
    """Return `policy` if it is known, else raise a `UsageError` listing the choices."""
    if policy not in LENGTH_POLICIES:
        raise UsageError(f"unknown length policy {policy!r}; choose one of {', '.join(LENGTH_POLICIES)}")
    return policy


def resolve_max_seq_len(requested: int | None, config=None) -> int | None:
    """The effective `max_seq_len`: the request, else the model's maximum, never beyond the model's maximum.

    `hf-sft train` passes the loaded model's config and `hf-sft data` the same config read without the weights, so
    both commands apply the same limit for the same flags.

    Args:
        requested: `--max_seq_len`, or `None`.
        config: the model's `PretrainedConfig` (its `max_position_embeddings` is the maximum), or `None` for no
            model limit.

    Returns:
        The limit in tokens, or `None` for no limit.

    Raises:
        UsageError: `requested` is not positive or exceeds the model's maximum.
    """
    model_max = getattr(config, "max_position_embeddings", None)
    if requested is None:
        return model_max
    if requested < 2:
        raise UsageError(f"--max_seq_len must be at least 2 (a prompt token and EOS), got {requested}")
    if model_max is not None and requested > model_max:
        raise UsageError(f"--max_seq_len {requested} exceeds the model's maximum of {model_max} positions")
    return requested


def fit_example(
    prompt: list[int],
    response: list[int],
    instruction: str,
    input: str,
    encoder: Encoder,
    template: PromptFormat,
    max_seq_len: int,
    policy: str,
) -> Fitted:
    """Apply `policy` to one example longer than `max_seq_len` (prompt + response ids, EOS included)."""
    if policy == "drop":
        return Fitted([], [], "drop:too_long")
    if policy == "truncate":
        kept = (prompt + response)[:max_seq_len]
        if len(prompt) >= max_seq_len:
            return Fitted([], [], "drop:no_supervised_tokens")
        return Fitted(prompt, kept[len(prompt) :], "truncated")
    if policy == "truncate_input":
        budget = max_seq_len - len(response)
        shortened = _shorten_input(instruction, input, budget, len(prompt) - budget, encoder, template)
        if shortened is None:
            return Fitted([], [], "drop:too_long_without_input")
        return Fitted(shortened, response, "truncated_input")
    raise UsageError(f"unknown length policy {policy!r}; choose one of {', '.join(LENGTH_POLICIES)}")


def fit_conversation(
    parts: list[tuple[list[int], bool]], max_seq_len: int, policy: str
) -> tuple[list[tuple[list[int], bool]], str]:
    """Apply `policy` to a conversation longer than `max_seq_len`, given as `(ids, supervised)` chunks.

    Returns:
        The chunks kept and the status (`truncated`, or `drop:<reason>` with no chunks).
    """
    if policy != "truncate":
        return [], "drop:too_long"
    kept, room = [], max_seq_len
    for ids, supervised in parts:
        kept.append((ids[:room], supervised))
        room -= len(kept[-1][0])
    if not any(supervised and ids for ids, supervised in kept):
        return [], "drop:no_supervised_tokens"
    return kept, "truncated"


def _shorten_input(
    instruction: str, input: str, budget: int, excess: int, encoder: Encoder, template: PromptFormat
) -> list[int] | None:
    """Prompt ids with the input cut to whole tokens so that the prompt has at most `budget` tokens, or None.

    The shortened prompt is re-tokenised as a whole, so its ids are what inference would compute for that text;
    the cut is refined until it fits because a token at the cut may tokenise differently in context.
    """
    pieces = encoder.prompt.encode(input, add_special_tokens=False)
    n_keep = len(pieces.ids) - excess
    while n_keep > 0:
        text = input[: pieces.offsets[n_keep - 1][1]].rstrip()
        ids = encoder.encode_prompts([template.prompt_text(instruction, text, bos_token=encoder.bos_token)])[0]
        if len(ids) <= budget:
            return ids
        n_keep = min(n_keep - 1, n_keep - (len(ids) - budget))
    ids = encoder.encode_prompts([template.prompt_text(instruction, "", bos_token=encoder.bos_token)])[0]
    return ids if len(ids) <= budget else None
