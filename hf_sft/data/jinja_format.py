"""A user's Jinja chat template as a prompt format (`--template FILE.jinja`).

The supervised spans are found by rendering each prefix of a conversation with transformers' own chat-template
renderer: the text up to an assistant turn with `add_generation_prompt` is its prompt, and the turn's own text up to
`eos_token` is what the model learns to emit.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_sft.errors import UsageError

ROLES = ("system", "user", "assistant")


def check_conversation(messages: list[dict]) -> None:
    """Raise `ValueError` unless `messages` are turns with a known role and string content, ending on any turn."""
    if not messages:
        raise ValueError("a conversation needs at least one turn")
    for message in messages:
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"each turn needs a role in {ROLES} and a string content, got {message!r}")


@dataclass(frozen=True)
class JinjaFormat:
    """A user's Jinja chat template; segments are found by rendering each prefix of the conversation.

    The template must render every conversation prefix as a prefix of the longer conversation's text, and end each
    assistant turn with `eos_token` (generation stops there): both are checked when the file is read.
    """

    name: str
    template: str
    bos: bool = False

    def render(self, messages: list[dict], bos_token: str, eos_token: str, generation_prompt: bool = False) -> str:
        """The template's text for `messages`."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            [messages], chat_template=self.template, add_generation_prompt=generation_prompt,
            bos_token=bos_token, eos_token=eos_token,
        )  # fmt: skip
        return rendered[0]

    def segments(self, messages: list[dict], bos_token: str, eos_token: str = "</s>") -> list[tuple[str, bool]]:
        """`(text, supervised)` pieces of a conversation, as `PromptFormat.segments`."""
        check_conversation(messages)
        pieces, done = [], ""
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:turn], bos_token, eos_token, generation_prompt=True)
            full = self.render(messages[: turn + 1], bos_token, eos_token)
            end = full.rfind(eos_token)
            if not prompt.startswith(done) or not full.startswith(prompt) or end < len(prompt):
                raise UsageError(
                    f"chat template {self.name}: turn {turn} does not extend the text before it, or its assistant "
                    "turn does not end with {{ eos_token }}"
                )
            pieces += [(prompt[len(done) :], False), (full[len(prompt) : end], True)]
            done = full[: end + len(eos_token)]
        return pieces

    def prompt_text(self, instruction: str, input: str = "", *, bos_token: str) -> str:
        """The inference prompt of an instruction."""
        return self.render([{"role": "user", "content": instruction, "input": input}], bos_token, "", True)

    def response_text(self, output: str) -> str:
        """The supervised text of an answer (EOS excluded)."""
        conversation = [{"role": "user", "content": "x", "input": ""}, {"role": "assistant", "content": output}]
        return self.segments(conversation, bos_token="", eos_token="\x00EOS\x00")[1][0]

    def chat_template(self) -> str:
        """The template itself."""
        return self.template


def jinja_format(name: str, template: str) -> JinjaFormat:
    """A checked `JinjaFormat`: it masks a two-turn conversation, and knows whether it starts with BOS."""
    bos, eos = "\x00BOS\x00", "\x00EOS\x00"
    fmt = JinjaFormat(name, template)
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 2
    try:
        fmt.segments(probe, bos_token=bos, eos_token=eos)
        starts_with_bos = fmt.render(probe[:1], bos, eos).startswith(bos)
    except UsageError:
        raise
    except Exception as err:  # jinja2 syntax or runtime errors: one line naming the file
        raise UsageError(f"--template {name}: {type(err).__name__}: {err}") from None
    return JinjaFormat(name, template, bos=starts_with_bos)
