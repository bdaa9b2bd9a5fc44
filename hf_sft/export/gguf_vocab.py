"""The tokenizer half of a GGUF file: a byte-level BPE vocabulary that llama.cpp tokenizes exactly as ours.

llama.cpp does not run a `tokenizers` pipeline. Its BPE tokenizer splits special tokens out of the text, splits the
rest with one of the regexes it knows by name (`tokenizer.ggml.pre`, see `src/llama-vocab.cpp`), maps bytes to the
GPT-2 byte alphabet and merges by rank. So a tokenizer travels exactly when each of its components is one that
llama.cpp reproduces:

- normalizer: none (llama.cpp's BPE path normalizes nothing);
- pre-tokenizer: `ByteLevel` with its GPT-2 regex (llama.cpp's `gpt-2`), or `Split` on the Llama 3 or Qwen2 regex
  followed by a regex-less `ByteLevel` (`llama-bpe`, `qwen2`);
- model: BPE without dropout, subword prefixes/suffixes or byte fallback, `ignore_merges` as llama.cpp sets it for
  that pre-tokenizer;
- added tokens without lstrip/rstrip/single_word; special ones become CONTROL tokens (split out when llama.cpp
  parses special tokens, as `tokenizer(text)` does), the others USER_DEFINED (always split out, as ours);
- post-processor: none, or a template adding BOS and/or EOS (`tokenizer.ggml.add_bos_token` / `add_eos_token`).

`add_prefix_space` on the ByteLevel pre-tokenizer has no llama.cpp counterpart: ours puts a space before every piece
of text between special tokens that does not start with one; llama.cpp's BPE never does (its `add_space_prefix` is
an SPM option). The two agree exactly on text whose pieces already start with a space, which is what the seed
format renders (`[BOS] Instruction: ...`); the export refuses a format that renders other text with such a
tokenizer (`check_prefix_space`), and the self-check (`hf_sft.export.gguf_check`) tests the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gguf

from hf_sft.errors import UsageError

# What each llama.cpp pre-tokenizer reproduces: the `Split` regex of a tokenizer.json (None: ByteLevel's own GPT-2
# regex) and the `ignore_merges` llama.cpp uses with it. Regexes as the original tokenizer.json files write them
# (quoted in the comments of llama.cpp's `src/llama-vocab.cpp`).
PRE_TOKENIZERS = {
    "gpt-2": (None, False),
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        True,
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        False,
    ),
}


@dataclass(frozen=True)
class GGUFVocab:
    """Everything `tokenizer.ggml.*` holds, plus what the checks need to know.

    Attributes:
        pre: llama.cpp's pre-tokenizer name.
        tokens: token strings by id (the model's vocabulary size; ids the tokenizer lacks are `[PAD<id>]`, UNUSED).
        token_types: `gguf.TokenType` values by id.
        merges: `"left right"` strings by rank.
        special_ids: `{"bos": id, "eos": id, "pad": id, "unk": id}` for those the tokenizer has.
        add_bos: whether encoding with special tokens prepends BOS (our post-processor's behaviour).
        add_eos: whether it appends EOS.
        prefix_space: the pre-tokenizer adds a prefix space (see the module docstring).
        chat_template: the tokenizer's chat template, or None.
    """

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    prefix_space: bool
    chat_template: str | None

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Add the `tokenizer.ggml.*` keys and the chat template."""
        writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for name, token_id in self.special_ids.items():
            getattr(writer, f"add_{name}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def build_vocab(tokenizer, vocab_size: int, chat_template: str | None = None) -> GGUFVocab:
    """Map a `PreTrainedTokenizerFast` onto llama.cpp's BPE vocabulary.

    Args:
        tokenizer: the model folder's tokenizer.
        vocab_size: rows of the model's embedding (at least the tokenizer's size; extra ids become UNUSED tokens).
        chat_template: the training format as a chat template (`tokenizer.chat_template`, the format's own).

    Returns:
        The vocabulary to write.

    Raises:
        UsageError: a component llama.cpp cannot reproduce, named.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec.get("normalizer"):
        raise UsageError(_refusal(f"normalizer {_describe(spec['normalizer'])}", "llama.cpp's BPE normalizes nothing"))
    pre, prefix_space = _pre_tokenizer(spec.get("pre_tokenizer"))
    _check_model(spec["model"], pre)
    decoder = spec.get("decoder")
    if decoder and decoder.get("type") != "ByteLevel":
        raise UsageError(_refusal(f"decoder {_describe(decoder)}", "llama.cpp decodes byte-level tokens to bytes"))
    add_bos, add_eos = _post_processor(spec.get("post_processor"), tokenizer)
    tokens, token_types = _tokens(spec, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special_ids = {
        name: getattr(tokenizer, f"{name}_token_id")
        for name in ("bos", "eos", "pad", "unk")
        if getattr(tokenizer, f"{name}_token_id") is not None
    }
    return GGUFVocab(pre, tokens, token_types, merges, special_ids, add_bos, add_eos, prefix_space, chat_template)


def check_prefix_space(vocab: GGUFVocab, texts: list[str], special_tokens: list[str], format_name: str) -> None:
    """Refuse a prefix-space tokenizer whose format renders a piece of text that does not start with a space.

    Args:
        vocab: the mapped vocabulary.
        texts: the format's renderings of a few conversations (prompts and full texts).
        special_tokens: the strings that split text into pieces (added tokens).
        format_name: the format, for the message.

    Raises:
        UsageError: the tokenizer adds prefix spaces and some piece starts without one.
    """
    if not vocab.prefix_space:
        return
    for text in texts:
        for piece in _pieces(text, special_tokens):
            if piece and not piece.startswith(" "):
                raise UsageError(
                    _refusal(
                        "its ByteLevel pre-tokenizer's add_prefix_space: true",
                        f"it puts a space before each piece of text between special tokens and llama.cpp never "
                        f"does; the {format_name!r} format renders {piece[:30]!r}, which would tokenize differently "
                        "(formats whose text after a special token starts with a space, such as seed, export)",
                    )
                )


def _pre_tokenizer(pre: dict | None) -> tuple[str, bool]:
    parts = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    types = [part.get("type") if part else None for part in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2", bool(parts[0].get("add_prefix_space"))
    # After a Split, ByteLevel's prefix space would go before every piece of the split, which llama.cpp never does.
    if types == ["Split", "ByteLevel"] and not (parts[1].get("use_regex", True) or parts[1].get("add_prefix_space")):
        split = parts[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            for name, (known, _) in PRE_TOKENIZERS.items():
                if known is not None and regex == known:
                    return name, False
    raise UsageError(
        _refusal(
            f"pre_tokenizer {_describe(pre)}",
            "llama.cpp reproduces ByteLevel with its GPT-2 regex (gpt-2), or Split on the Llama 3 (llama-bpe) or "
            "Qwen2 (qwen2) regex followed by ByteLevel without regex",
        )
    )


def _check_model(model: dict, pre: str) -> None:
    if model.get("type") != "BPE":
        raise UsageError(_refusal(f"model {model.get('type')}", "llama.cpp's byte-level tokenizer is BPE"))
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise UsageError(_refusal(f"BPE option {key}={model[key]!r}", "llama.cpp's BPE has no such option"))
    ignore_merges = PRE_TOKENIZERS[pre][1]
    if bool(model.get("ignore_merges")) != ignore_merges:
        raise UsageError(
            _refusal(
                f"BPE option ignore_merges={bool(model.get('ignore_merges'))}",
                f"llama.cpp's {pre!r} pre-tokenizer uses ignore_merges={ignore_merges}",
            )
        )


def _post_processor(post: dict | None, tokenizer) -> tuple[bool, bool]:
    if not post or post.get("type") == "ByteLevel":  # ByteLevel only trims offsets
        return False, False
    if post.get("type") == "TemplateProcessing":
        single = [next(iter(item.items())) for item in post.get("single", [])]
        ids = [value["id"] for kind, value in single if kind == "SpecialToken"]
        shape = [kind for kind, _ in single]
        bos, eos = tokenizer.bos_token, tokenizer.eos_token
        for want_bos, want_eos in ((False, False), (True, False), (False, True), (True, True)):
            expected = ["SpecialToken"] * want_bos + ["Sequence"] + ["SpecialToken"] * want_eos
            if shape == expected and ids == [bos] * want_bos + [eos] * want_eos:
                return want_bos, want_eos
    raise UsageError(
        _refusal(f"post_processor {_describe(post)}", "llama.cpp can only add BOS before and EOS after the text")
    )


def _tokens(spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {token_id: token for token, token_id in spec["model"]["vocab"].items()}
    types = dict.fromkeys(by_id, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        flags = [flag for flag in ("lstrip", "rstrip", "single_word") if added.get(flag)]
        if flags:
            raise UsageError(
                _refusal(f"added token {added['content']!r} with {', '.join(flags)}", "llama.cpp matches tokens as is")
            )
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise UsageError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} embeddings")
    taken = set(by_id.values())
    tokens, token_types = [], []
    for token_id in range(vocab_size):
        if token_id in by_id:
            tokens.append(by_id[token_id])
            token_types.append(int(types[token_id]))
        else:  # embedding rows past the tokenizer (nanoGPT pads its vocabulary): never produced, never matched
            name = f"[PAD{token_id}]"
            while name in taken:
                name = f"[{name}]"
            tokens.append(name)
            token_types.append(int(gguf.TokenType.UNUSED))
    seen: set[str] = set()
    twice = sorted({token for token in tokens if token in seen or seen.add(token)})
    if twice:  # llama.cpp looks tokens up by their text: two ids for one text cannot load
        raise UsageError(_refusal(f"tokens with two ids each ({', '.join(map(repr, twice[:5]))})", "one id per text"))
    return tokens, token_types


def _pieces(text: str, special_tokens: list[str]) -> list[str]:
    pieces = [text]
    for token in sorted(special_tokens, key=len, reverse=True):
        pieces = [part for piece in pieces for part in piece.split(token)]
    return pieces


def _describe(component: dict | None) -> str:
    if not component:
        return "None"
    if component.get("type") == "Sequence":
        parts = component.get("pretokenizers") or component.get("normalizers") or component.get("decoders") or []
        return "Sequence[" + ", ".join(_describe(part) for part in parts) + "]"
    options = {k: v for k, v in component.items() if k != "type" and not isinstance(v, (list, dict))}
    if isinstance(component.get("pattern"), dict):
        options["pattern"] = next(iter(component["pattern"].values()))
    return f"{component.get('type')}({', '.join(f'{k}={v!r}' for k, v in options.items())})"


def _refusal(component: str, reason: str) -> str:
    return f"cannot export this tokenizer to gguf: llama.cpp cannot reproduce its {component} ({reason})"
