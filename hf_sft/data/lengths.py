"""Length policy: what happens to an example longer than `max_seq_len` tokens.

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

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hf_sft.errors import UsageError

if TYPE_CHECKING:
    from hf_sft.data.masking import Encoder
    from hf_sft.data.template import PromptFormat

LENGTH_POLICIES = ("drop", "truncate_input", "truncate")


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
