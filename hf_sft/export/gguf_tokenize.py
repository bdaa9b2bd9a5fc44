"""The GGUF's side of the tokenizer check: llama.cpp's own tokenizer on the file, or a read-back model of it.

llama.cpp is reached through llama-cpp-python's bindings of its C API with a vocabulary-only load (no weights, no
context). Without llama-cpp-python, the file's vocabulary is read back with `gguf` and run through a `tokenizers` BPE
set up as llama.cpp sets up its own: the named pre-tokenizer's regex, no prefix space, special tokens by type, and
byte symbols missing from the vocabulary ending a word (`lost_symbols_break`). That checks what was written, not
llama.cpp's code.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

from tokenizers import Regex, Tokenizer, pre_tokenizers

Tokenize = Callable[[str, bool], list[int]]


def file_tokenizer(path: Path, pre: str) -> tuple[Tokenize, str, Callable[[], None]]:
    """`(tokenize(text, add_special), what tokenizes, close)` for the GGUF at `path`."""
    try:
        import llama_cpp
    except ImportError:
        return readback_tokenizer(path, pre), "read back with gguf; llama-cpp-python is not installed", lambda: None
    # llama.cpp's own tokenizer through its C API (vocab only: no weights, no context). llama-cpp-python prints
    # llama.cpp's log lines at or above its logger's level; loading logs a "may be incorrect" line at error level
    # for any EOS whose text is not one of the end tokens llama.cpp knows, and then adds it to them itself.
    # A probe that starts with BOS and is encoded with special tokens makes llama.cpp warn about the two BOS (as
    # ours, it adds one anyway): the check's own texts, not news for the user.
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.CRITICAL)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if model is None:
        log.setLevel(level)
        raise RuntimeError(f"llama.cpp could not load the vocabulary of {path}")
    vocab = llama_cpp.llama_model_get_vocab(model)

    def tokenize(text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 2
        while True:
            ids = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), ids, size, add_special, True)
            if n >= 0:
                return list(ids[:n])
            size = -n

    def close() -> None:
        llama_cpp.llama_model_free(model)
        log.setLevel(level)

    return tokenize, f"llama.cpp, llama-cpp-python {llama_cpp.__version__}", close


def readback_tokenizer(path: Path, pre: str) -> Tokenize:
    """A `tokenizers` BPE from the file's own vocabulary, set up as llama.cpp sets up its tokenizer."""
    import gguf
    from tokenizers import AddedToken, models

    from hf_sft.export.gguf_vocab import PRE_TOKENIZERS

    reader = gguf.GGUFReader(path)

    def value(key: str, default=None):
        found = reader.get_field(key)
        return default if found is None else found.contents()

    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in value("tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges, ignore_merges=False))
    regex, backend.model.ignore_merges = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    split = [] if regex is None else [pre_tokenizers.Split(Regex(regex), behavior="isolated")]
    breaks = _breaks(set(tokens))
    backend.pre_tokenizer = pre_tokenizers.Sequence([*split, byte_level, *([breaks] if breaks else [])])
    control, user = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    backend.add_special_tokens([AddedToken(tokens[i], special=True) for i, t in enumerate(types) if t == control])
    backend.add_tokens([AddedToken(tokens[i], special=False) for i, t in enumerate(types) if t == user])
    bos, eos = value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id")
    add_bos, add_eos = value("tokenizer.ggml.add_bos_token", False), value("tokenizer.ggml.add_eos_token", False)

    def tokenize(text: str, add_special: bool) -> list[int]:
        ids = backend.encode(text, add_special_tokens=False).ids
        return [bos] * (add_special and add_bos) + ids + [eos] * (add_special and add_eos)

    return tokenize


def lost_symbols_break(tokenizer):
    """The folder's tokenizer, changed so that byte symbols missing from its vocabulary end a word and vanish.

    That is what llama.cpp does with them; ours drops them before merging. The two agree on every text without such
    characters.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    breaks = _breaks(set(tokenizer.get_vocab()))
    if breaks is not None:
        parts = [spec["pre_tokenizer"], json.loads(breaks.__getstate__())]
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": parts}
    return Tokenizer.from_str(json.dumps(spec))


def _breaks(vocabulary: set[str]) -> pre_tokenizers.Split | None:
    """A split that removes the byte symbols `vocabulary` lacks, ending the word there (None: it lacks none)."""
    missing = sorted(set(pre_tokenizers.ByteLevel.alphabet()) - vocabulary)
    if not missing:
        return None
    return pre_tokenizers.Split(Regex(f"[{''.join(map(re.escape, missing))}]"), behavior="removed")
