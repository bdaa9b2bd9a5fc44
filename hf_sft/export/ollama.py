"""The Ollama `Modelfile` written beside a GGUF: FROM the file, a TEMPLATE in the training format, stop and context.

Ollama renders chats with Go's `text/template`, not with the GGUF's Jinja chat template: its `TEMPLATE` receives
`.Messages` (each with `.Role` and `.Content`; consecutive turns of one role merged, system turns kept in the list).
For a built-in format (`hf_sft.data.template.PromptFormat`) the TEMPLATE is generated from the format's own pieces,
so it renders exactly what `apply_chat_template(messages, add_generation_prompt=True)` renders, for single and
multi-turn chats, except:

- BOS: llama.cpp (and Ollama on top of it) adds it when the GGUF says `add_bos_token`, so the TEMPLATE leaves it out
  then (writing it too would give two) and starts with it otherwise;
- an instruction's separate `input` has no Ollama field: put it in the user message.

Every literal piece is written as a Go string constant (`{{ "..." }}`) and the actions trim the whitespace between
them, so the TEMPLATE's own line breaks are layout, never text. A user's Jinja template (`--template FILE.jinja`)
cannot be translated into Go's language: its Modelfile says so and has no TEMPLATE.
"""

from __future__ import annotations

from pathlib import Path

from hf_sft.data import PromptFormat

# How every Modelfile written here begins: an existing file that begins so is an earlier export's, rewritten without
# --overwrite (`hf_sft.writer.check_destination`).
MODELFILE_MARKER = b"# Ollama Modelfile written by hf-sft export --to gguf."


def modelfile_path(gguf_path: str | Path) -> Path:
    """Where the Modelfile of a GGUF goes: `NAME.Modelfile` beside `NAME.gguf` (several exports share a folder)."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def modelfile(gguf_name: str, template, bos_token: str, eos_token: str, context_length: int) -> str:
    """The text of the Modelfile for a GGUF named `gguf_name` in the same folder.

    Args:
        gguf_name: the GGUF's file name (the Modelfile refers to it as `./NAME`).
        template: the folder's training format.
        bos_token: the BOS string the TEMPLATE starts with; "" where the GGUF's `add_bos_token` adds it (or the
            format has none).
        eos_token: the EOS token string (a stop sequence; the format ends answers with it).
        context_length: the model's positions (`num_ctx`: a learned-positions model has no more).

    Returns:
        The Modelfile text.
    """
    lines = [
        MODELFILE_MARKER.decode(),
        f"# Use: ollama create NAME -f {modelfile_path(gguf_name).name} && ollama run NAME",
        f"FROM ./{gguf_name}",
    ]
    if isinstance(template, PromptFormat):
        where = "the BOS comes from the GGUF's add_bos_token" if template.bos and not bos_token else "BOS as trained"
        lines.append(f"# The {template.name!r} training format ({where}).")
        lines.append('TEMPLATE """' + go_template(template, bos_token, eos_token) + '"""')
    else:
        lines.append(
            f"# The training format is a Jinja template ({template.name}) with no Go translation: add a TEMPLATE."
        )
    lines += [
        f"PARAMETER stop {go_string(eos_token)}",
        f"PARAMETER num_ctx {context_length}",
        "# Greedy decoding, as hf-sft generate by default.",
        "PARAMETER temperature 0",
    ]
    return "\n".join(lines) + "\n"


def go_template(template: PromptFormat, bos_token: str, eos_token: str) -> str:
    """The format as a Go `text/template` over Ollama's `.Messages`, starting with `bos_token` (see `modelfile`)."""

    def lit(text: str) -> str:
        return "{{- " + go_string(text) + " -}}" if text else ""

    def fill(text: str) -> str:  # "{content}" -> the message's content
        before, _, after = text.partition("{content}")
        return lit(before) + "{{- .Content -}}" + lit(after)

    parts = ['{{- $prev := "" -}}' + lit(bos_token)]
    if template.default_system:
        parts.append(
            '{{- if and .Messages (ne (index .Messages 0).Role "system") -}}'
            + lit(template.default_system)
            + "{{- end -}}"
        )
    parts.append("{{- range .Messages -}}")
    if template.separator:
        parts.append('{{- if eq $prev "assistant" -}}' + lit(template.separator) + "{{- end -}}")
    parts += [
        '{{- if eq .Role "system" -}}' + fill(template.system),
        '{{- else if eq .Role "user" -}}' + fill(template.user),
        '{{- else if eq .Role "assistant" -}}'
        + lit(template.generation_prompt)
        + fill(template.assistant)
        + lit(eos_token),
        "{{- end -}}",
        "{{- $prev = .Role -}}",
        "{{- end -}}",
        '{{- if ne $prev "assistant" -}}' + lit(template.generation_prompt) + "{{- end -}}",
    ]
    return "\n".join(parts)


def go_string(text: str) -> str:
    """`text` as a Go interpreted string literal in printable ASCII (Ollama's Modelfile parser drops other runes)."""
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    out = []
    for char in text:
        code = ord(char)
        if char in escapes:
            out.append(escapes[char])
        elif 0x20 <= code < 0x7F:
            out.append(char)
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'
