"""A `tokenizers` JSON file from pretraining becomes a `PreTrainedTokenizerFast` that knows its special tokens."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders
from transformers import PreTrainedTokenizerFast

from hf_sft.errors import UsageError, bad_input

logger = logging.getLogger(__name__)

# Every file a saved tokenizer folder may hold (fast and slow tokenizers, chat templates): what a stock export copies
# and a push uploads, whichever of them exist.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
DEFAULT_SPECIAL_TOKENS = {"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
# transformers 5.x's `from_pretrained` records these in `init_kwargs`, and `save_pretrained` writes them into
# tokenizer_config.json (it drops `name_or_path` only).
_LOAD_TIME_KEYS = ("is_local", "local_files_only")


def load_tokenizer(
    path: str | Path,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a `tokenizers` JSON file or from a folder saved by `save_pretrained`.

    Args:
        path: `tokenizer.json` written by the `tokenizers` library, or a HF model/tokenizer folder.
        bos_token, eos_token, pad_token, unk_token: special token strings; `None` keeps the folder's own
            (for a folder) or the `[BOS]`/`[EOS]`/`[PAD]`/`[UNK]` defaults (for a JSON file).

    Returns:
        A fast tokenizer that adds no special tokens by itself (the prompt template places them).

    Raises:
        UsageError: the file is missing or unreadable, or BOS/EOS are not in its vocabulary.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, bos_token, eos_token, pad_token, unk_token)
    if not path.is_file():
        raise UsageError(f"tokenizer file not found: {path}")
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise UsageError(f"{path} is not a `tokenizers` JSON file: {err}") from None
    if backend.decoder is None and _uses_byte_level(backend):
        # Byte-level BPE without a decoder decodes to 'Ġ'-strewn text; simple_llama sets this by hand after loading.
        backend.decoder = decoders.ByteLevel()
    requested = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
    specials = {name: token or DEFAULT_SPECIAL_TOKENS[name] for name, token in requested.items()}
    added = [t.content for _, t in sorted(backend.get_added_tokens_decoder().items())]
    specials = _check_special_tokens(backend.get_vocab(), specials, added, source=str(path))
    # Templates carry their own special tokens: a post-processor that adds BOS/EOS would double them.
    backend.post_processor = None
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **specials)


def _load_folder(path: Path, bos_token, eos_token, pad_token, unk_token) -> PreTrainedTokenizerFast:
    if not (path / "tokenizer.json").is_file():
        raise UsageError(f"no tokenizer.json in {path}")
    with bad_input(f"cannot load the tokenizer in {path}"):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    for key in _LOAD_TIME_KEYS:  # how it was loaded is no setting of the tokenizer's: saving it again must not keep it
        tokenizer.init_kwargs.pop(key, None)
    overrides = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
    current = {name: getattr(tokenizer, name) for name in overrides}
    specials = {name: overrides[name] or current[name] for name in overrides}
    added = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items())]
    specials = _check_special_tokens(tokenizer.get_vocab(), specials, added, source=str(path))
    tokenizer.add_special_tokens({name: token for name, token in specials.items() if token is not None})
    return tokenizer


def _check_special_tokens(
    vocab: dict[str, int], specials: dict[str, str | None], existing: list[str], source: str
) -> dict[str, str | None]:
    absent = [name for name, token in specials.items() if token is not None and token not in vocab]
    if "bos_token" in absent or "eos_token" in absent:
        # Name every token that is missing at once: a tokenizer with other conventions usually lacks all four.
        wanted = ", ".join(f"{name.split('_')[0].upper()} {specials[name]!r} (--{name})" for name in absent)
        raise UsageError(
            f"the tokenizer {source} lacks the special tokens {wanted}; its special tokens are: "
            f"{', '.join(existing) or '(none)'}. Pass the flags in brackets to name the tokens it uses."
        )
    if "pad_token" in absent:
        logger.warning(
            "pad token %r is not in the tokenizer; using the EOS token %r as padding",
            specials["pad_token"],
            specials["eos_token"],
        )
        specials["pad_token"] = specials["eos_token"]
    if "unk_token" in absent:
        specials["unk_token"] = None
    return specials


def _uses_byte_level(backend: Tokenizer) -> bool:
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    return any(part and part.get("type") == "ByteLevel" for part in parts)
