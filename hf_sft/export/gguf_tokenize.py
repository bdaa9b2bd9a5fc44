"""The GGUF's side of the tokenizer check: llama.cpp's own tokenizer on the file, or a read-back model of it.

llama.cpp is reached as its users reach it: llama-server's `/tokenize` on the file (`hf_sft.export.llama_server`,
from the prebuilt xllamacpp wheel). Without xllamacpp, the file's vocabulary is read back with `gguf` and run
through a `tokenizers` BPE set up as llama.cpp sets up its own: the named pre-tokenizer's regex, no prefix space,
special tokens by type, and byte symbols missing from the vocabulary ending a word (`lost_symbols_break`). That
checks what was written, not llama.cpp's code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from tokenizers import Regex, Tokenizer, pre_tokenizers

Tokenize = Callable[[str, bool], list[int]]
_TOKENIZE_CONTEXT = 64


def file_tokenizer(path: Path, pre: str) -> tuple[Tokenize, str, Callable[[], None]]:
    """`(tokenize(text, add_special), what tokenizes, close)` for the GGUF at `path`."""
    from hf_sft.export.llama_server import INSTALL, LlamaServer, llama_cpp_version

    try:
        by = llama_cpp_version()
    except ImportError:
        return readback_tokenizer(path, pre), f"read back with gguf; xllamacpp is not installed ({INSTALL})", _nothing
    # llama-server's own /tokenize on the file. The context is never used (nothing is evaluated): the smallest
    # that llama.cpp accepts keeps the KV cache small.
    server = LlamaServer(path, n_ctx=_TOKENIZE_CONTEXT)
    return server.tokenize, by, server.close


def _nothing() -> None:
    pass


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
