"""Prompt formats: one object per format owns its text, the boundaries masking uses and the saved chat template.

Chosen with `--template NAME|PATH`. Built-ins (`FORMATS`):

- `seed` (the default, the seed script's): `[BOS] Instruction: {instruction} Input: {input} Response: {output}[EOS]`,
  the ` Input: ...` part left out when the input is empty (or only whitespace);
- `alpaca`: Stanford Alpaca's `### Instruction:` / `### Input:` / `### Response:` blocks after its preamble;
- `chatml`: `<|im_start|>role\\n...<|im_end|>` turns; the assistant turn ends with the tokenizer's EOS, where
  generation stops (the markers are plain text to a tokenizer that lacks them as tokens).

A path names a user's Jinja chat template (`JinjaFormat`). Every format renders a conversation (`messages`: system,
user and assistant turns; an instruction record is a user turn, with its input as the extra `input` key, and an
assistant turn) as segments: prompt text, then per assistant turn the supervised text, which masking follows with the
EOS id. The same format is saved as the tokenizer's chat template, so a trained folder remembers it
(`format_of(tokenizer)`) and `apply_chat_template(..., add_generation_prompt=True)` gives the inference prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hf_sft.data.jinja_format import JinjaFormat, check_conversation, jinja_format
from hf_sft.errors import UsageError


@dataclass(frozen=True)
class PromptFormat:
    """A format given by plain format strings per turn (`{content}`, and `{input}` in `user_with_input`).

    Attributes:
        name: the `--template` name.
        bos: whether a conversation starts with the BOS token.
        system: a system turn.
        user: a user turn without input.
        user_with_input: a user turn whose `input` is not blank.
        generation_prompt: what opens an assistant turn (the end of every prompt).
        assistant: the supervised text of an assistant turn; EOS follows it.
        separator: text between an assistant turn's EOS and the next turn.
        default_system: system text used when a conversation has no system turn.
    """

    name: str
    bos: bool
    system: str
    user: str
    user_with_input: str
    generation_prompt: str
    assistant: str
    separator: str = ""
    default_system: str = ""

    def segments(self, messages: list[dict], bos_token: str) -> list[tuple[str, bool]]:
        """`(text, supervised)` pieces of a conversation; EOS (not in the text) follows each supervised piece."""
        check_conversation(messages)
        pending = bos_token if self.bos else ""
        if messages[0]["role"] != "system" and self.default_system:
            pending += self.default_system
        pieces = []
        for previous, message in zip([None, *messages], messages, strict=False):
            if previous is not None and previous["role"] == "assistant":
                pending += self.separator
            content = message["content"]
            if message["role"] == "system":
                pending += self.system.format(content=content)
            elif message["role"] == "user":
                extra = message.get("input") or ""
                turn = self.user_with_input if extra.strip() else self.user
                pending += turn.format(content=content, input=extra)
            else:
                pieces += [(pending + self.generation_prompt, False), (self.assistant.format(content=content), True)]
                pending = ""
        return pieces + ([(pending, False)] if pending else [])

    def prompt_text(self, instruction: str, input: str = "", *, bos_token: str) -> str:
        """The text fed to the model before it answers an instruction; ends where the response begins."""
        user = {"role": "user", "content": instruction, "input": input}
        return self.segments([user], bos_token)[0][0] + self.generation_prompt

    def response_text(self, output: str) -> str:
        """The text the model must produce after the prompt (EOS excluded: it is added as a token id)."""
        return self.assistant.format(content=output)

    def chat_template(self) -> str:
        """The format as a Jinja chat template (user turns may carry an `input` key)."""
        content, extra = "{{ message['content'] }}", "{{ message['input'] }}"
        return (
            ("{{- bos_token -}}" if self.bos else "")
            + (f"{{%- if messages[0]['role'] != 'system' -%}}{_literal(self.default_system)}{{%- endif -%}}")
            + "{%- for message in messages -%}"
            + "{%- if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' -%}"
            + f"{_literal(self.separator)}{{%- endif -%}}"
            + f"{{%- if message['role'] == 'system' -%}}{_fill(self.system, content=content)}"
            + "{%- elif message['role'] == 'user' -%}"
            + "{%- if message.get('input') and message['input'] | trim -%}"
            + f"{_fill(self.user_with_input, content=content, input=extra)}"
            + f"{{%- else -%}}{_fill(self.user, content=content)}{{%- endif -%}}"
            + f"{{%- elif message['role'] == 'assistant' -%}}{_literal(self.generation_prompt)}"
            + f"{_fill(self.assistant, content=content)}{{{{ eos_token }}}}"
            + "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}{%- endif -%}"
            + "{%- endfor -%}"
            + f"{{%- if add_generation_prompt -%}}{_literal(self.generation_prompt)}{{%- endif -%}}"
        )


SEED = PromptFormat(
    name="seed",
    bos=True,
    system=" System: {content}",
    user=" Instruction: {content}",
    user_with_input=" Instruction: {content} Input: {input}",
    generation_prompt=" Response:",
    assistant=" {content}",
)
ALPACA = PromptFormat(
    name="alpaca",
    bos=True,
    system="{content}\n\n",
    user="### Instruction:\n{content}\n\n",
    user_with_input="### Instruction:\n{content}\n\n### Input:\n{input}\n\n",
    generation_prompt="### Response:\n",
    assistant="{content}",
    separator="\n\n",
    default_system=(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    ),
)
CHATML = PromptFormat(
    name="chatml",
    bos=False,
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    user_with_input="<|im_start|>user\n{content}\n\n{input}<|im_end|>\n",
    generation_prompt="<|im_start|>assistant\n",
    assistant="{content}",
    separator="\n",
)
FORMATS: dict[str, PromptFormat] = {fmt.name: fmt for fmt in (SEED, ALPACA, CHATML)}
DEFAULT_FORMAT = SEED


def get_format(name_or_path: str | None) -> PromptFormat | JinjaFormat:
    """The format a `--template` value names: a built-in name, or the path of a Jinja chat template file.

    Raises:
        UsageError: neither a built-in name nor a readable file, or a template that cannot mask (see `JinjaFormat`).
    """
    if not name_or_path:
        return DEFAULT_FORMAT
    if name_or_path in FORMATS:
        return FORMATS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise UsageError(f"--template {name_or_path}: not one of {', '.join(FORMATS)} and not a Jinja file")
    return jinja_format(str(path), path.read_text(encoding="utf-8"))


def format_of(tokenizer) -> PromptFormat | JinjaFormat:
    """The format a tokenizer was trained with: the built-in whose chat template it carries, else its template.

    A tokenizer without a chat template (e.g. straight from `hf-sft convert` of an untrained model) gets the default.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return DEFAULT_FORMAT
    for fmt in FORMATS.values():
        if template == fmt.chat_template():
            return fmt
    return jinja_format("the tokenizer's chat template", template)


def prompt_text(instruction: str, input: str = "", *, bos_token: str, template=DEFAULT_FORMAT) -> str:
    """The inference prompt for one instruction, exactly as training formats it.

    >>> prompt_text("Name a fish.", bos_token="[BOS]")
    '[BOS] Instruction: Name a fish. Response:'
    >>> prompt_text("Which is a fish?", "Tope or Rope", bos_token="<SOS>")
    '<SOS> Instruction: Which is a fish? Input: Tope or Rope Response:'
    >>> print(prompt_text("Name a fish.", bos_token="", template=FORMATS["chatml"]))
    <|im_start|>user
    Name a fish.<|im_end|>
    <|im_start|>assistant
    <BLANKLINE>
    """
    return template.prompt_text(instruction, input, bos_token=bos_token)


def install_chat_template(tokenizer, template=DEFAULT_FORMAT) -> None:
    """Make the tokenizer behave like a stock one of its format; `save_pretrained` then ships the behaviour.

    The format becomes `tokenizer.chat_template`, and encoding with special tokens (`tokenizer(text)`, the default of
    evaluation harnesses) prepends BOS exactly when the format starts with it, as Llama tokenizers do. The chat
    template's own BOS is not doubled: `apply_chat_template` encodes without special tokens.

    Args:
        tokenizer: a `PreTrainedTokenizerFast` (modified in place).
        template: the format used for training (a `PromptFormat` or `JinjaFormat`).
    """
    from tokenizers.processors import TemplateProcessing

    tokenizer.chat_template = template.chat_template()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = (
        TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tokenizer.bos_token_id)])
        if template.bos
        else None
    )


def _literal(text: str) -> str:
    """Literal text as a Jinja string expression (so no brace or `%` in it can be read as template syntax)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _fill(text: str, **fields: str) -> str:
    """A `{content}`/`{input}` format string as Jinja: literals quoted, fields as the given expressions."""
    import string

    parts = []
    for literal, field, _, _ in string.Formatter().parse(text):
        parts.append(_literal(literal))
        if field is not None:
            parts.append(fields[field])
    return "".join(parts)
