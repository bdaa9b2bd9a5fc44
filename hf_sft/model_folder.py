"""The one reader of model folders: what `generate`, `export`, `push`, `eval` and `train --pretrained_ckpt_path` read
is checked before any of it is used.

A model folder is what `hf-sft convert` or `hf-sft train` writes (a stock folder from `hf-sft export` too), or one of
a run's `checkpoint-STEP/` folders, whose tokenizer, when it has none, is the run folder's above it.
`read_model_folder` checks, in this order, and refuses the first problem with one `UsageError` (exit 2) that names
the folder and the file or the tensors:

1. the folder: it exists, its last write finished (`hf_sft.writer.check_complete`), it holds `config.json` (a LoRA
   adapter alone is named as such);
2. the configuration parses and is one the model accepts;
3. the weights are whole: every safetensors file's header parses, its tensors' byte ranges fit their shapes and end
   exactly where the file does (a file cut short ends before), and every shard an index names exists and holds the
   tensors the index places in it;
4. the configuration agrees with the weights: the model `config.json` describes, built on the `meta` device (no
   memory, no initialisation), expects every tensor the weights hold, with the same shape, and the weights hold every
   tensor it expects (the copy a tied head shares excepted);
5. the tokenizer loads and fits the vocabulary: no token id reaches the model's `vocab_size`.

Nothing is loaded into memory until every check has passed: `ModelFolder.load_model` then loads the weights that were
checked, with the configuration that was read, and `ModelFolder.tokenizer` is the tokenizer that was checked.
`safetensors_problem` is also the check `hf_sft.training.checkpoints` makes of a checkpoint's safetensors files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hf_sft.errors import UsageError, bad_input
from hf_sft.writer import check_complete

# A folder holds a tokenizer if it holds one of these.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED = "pytorch_model.bin"
# Tensors named in a refusal before "... (N tensors)".
NAMED = 3
# The bytes of one element of each safetensors dtype; a tensor of another dtype has its byte range checked against the
# file only.
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}
_DTYPE_BYTES |= {"U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

Tokenizer = Literal["required", "if present", "ignored"]


@dataclass(frozen=True)
class ModelFolder:
    """A model folder that passed every check of `read_model_folder`.

    Attributes:
        path: the folder.
        config: its configuration, as read.
        shapes: every tensor the weights hold, with its shape.
        tokenizer_path: the folder the tokenizer was read from, or None when there is none (or it was not asked for).
        tokenizer: the tokenizer, loaded and checked, or None.
    """

    path: Path
    config: Any
    shapes: dict[str, tuple[int, ...]]
    tokenizer_path: Path | None
    tokenizer: Any | None

    def load_model(self, model_class: Any = None, **kwargs: Any):
        """The model with the checked weights, built from the configuration read (`model_class`, default the Auto
        class for causal LMs); `kwargs` go to `from_pretrained` (`dtype=`, ...).

        Raises:
            UsageError: what the checks could not see (a tensor whose bytes are not numbers, say).
        """
        if model_class is None:
            from transformers import AutoModelForCausalLM as model_class
        with bad_input(f"cannot load the model in {self.path}"):
            return model_class.from_pretrained(self.path, config=self.config, **kwargs)


def read_model_folder(path: str | Path, tokenizer: Tokenizer = "required") -> ModelFolder:
    """Check a model folder before anything of it is used (see the module docstring for the checks, in order).

    Args:
        path: the model folder or `checkpoint-STEP` folder.
        tokenizer: "required" (its absence is refused), "if present" (checked when there is one) or "ignored"
            (the caller brings its own, e.g. `--tokenizer_path`).

    Returns:
        The folder with its configuration, its weights' shapes and its tokenizer.

    Raises:
        UsageError: the first problem found, in one line naming the folder and the file or tensors.
    """
    folder = resolve_model_dir(path)
    config = read_config(folder)
    shapes = weight_shapes(folder)
    problem = config_mismatch(config, shapes)
    if problem:
        raise UsageError(f"{folder}: {problem}")
    tok_dir = tokenizer_dir(folder) if tokenizer != "ignored" else None
    if tok_dir is None and tokenizer == "required":
        raise UsageError(f"no tokenizer in {folder} (looked for {', '.join(TOKENIZER_MARKERS)})")
    loaded = read_tokenizer(tok_dir, config.vocab_size, folder) if tok_dir is not None else None
    return ModelFolder(folder, config, shapes, tok_dir, loaded)


def resolve_model_dir(path: str | Path) -> Path:
    """Check that `path` is a model folder whose last write finished (it has a config.json).

    Raises:
        UsageError: the path is missing, not a folder, holds no model (a LoRA adapter alone is named as such), or
            holds a final model whose save was cut short.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder: pass the folder written by hf-sft convert or hf-sft train")
    check_complete(path)
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise UsageError(
                f"{path} holds a LoRA adapter without its base model: train with --lora_save merged "
                "(or merge the adapter with peft) to get a complete model folder"
            )
        raise UsageError(f"{path} has no config.json: it is not a model folder (or a checkpoint-STEP folder)")
    return path


def tokenizer_dir(model_dir: Path) -> Path | None:
    """Where the model's tokenizer lives: the folder itself, or the run folder above a `checkpoint-STEP` folder."""
    for folder in (model_dir, model_dir.parent):
        if any((folder / name).is_file() for name in TOKENIZER_MARKERS):
            return folder
        if not model_dir.name.startswith("checkpoint-"):
            break
    return None


def read_config(folder: Path):
    """The folder's configuration, parsed and validated by its class (nothing else read).

    Raises:
        UsageError: config.json is not JSON, or a configuration its class refuses.
    """
    from transformers import AutoConfig

    import hf_sft  # noqa: F401 - registers the hf_sft model with the Auto classes

    with bad_input(f"cannot read {folder / 'config.json'}"):
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    with bad_input(f"cannot read the model configuration in {folder}"):
        return AutoConfig.from_pretrained(folder)


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor the folder's weights hold, with its shape, read from the headers; each file checked whole.

    Raises:
        UsageError: no weights, a file cut short or with a damaged header, a shard the index names missing.
    """
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return _indexed_shapes(folder, index)
    if (folder / SAFETENSORS).is_file():
        return _safetensors_shapes(folder / SAFETENSORS)
    if (folder / PICKLED).is_file():
        import torch

        with bad_input(f"cannot read {folder / PICKLED}"):
            state = torch.load(folder / PICKLED, map_location="meta", weights_only=True, mmap=True)
        return {name: tuple(tensor.shape) for name, tensor in state.items()}
    raise UsageError(f"{folder} has no weights (looked for {SAFETENSORS}, {SAFETENSORS_INDEX}, {PICKLED})")


def safetensors_problem(path: Path) -> str | None:
    """What makes a safetensors file unreadable, or None: its header parses, each tensor's byte range fits its dtype
    and shape, and the last one ends exactly where the file does (a file cut short ends before)."""
    return _read_header(path)[1]


def config_mismatch(config, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """How the weights differ from what `config` describes, or None.

    The model is built on the `meta` device: its tensors have shapes and no memory. A tied head is not saved (the
    embedding holds it); `from_pretrained`'s own ignore lists are honoured.

    Raises:
        UsageError: a configuration that names no model class transformers knows.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with bad_input(f"cannot build the model that {getattr(config, 'name_or_path', 'config.json')} describes"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}."
    if expected and shapes and not expected.keys() & shapes.keys():  # weights saved from the base model alone
        expected = {name.removeprefix(prefix): shape for name, shape in expected.items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignored = [re.compile(p) for p in (model._keys_to_ignore_on_load_missing or [])]
    unexpected_ok = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or [])]
    missing = [
        name
        for name in expected
        if name not in shapes and name not in tied and not any(p.search(name) for p in ignored)
    ]
    unexpected = [name for name in shapes if name not in expected and not any(p.search(name) for p in unexpected_ok)]
    mismatched = [name for name in expected.keys() & shapes.keys() if expected[name] != shapes[name]]
    parts = []
    layers = (getattr(config, "num_hidden_layers", None), _layer_count(shapes))
    if missing or unexpected:
        if None not in layers and layers[0] != layers[1]:
            parts.append(f"config.json describes {layers[0]} layers, the weights hold {layers[1]}")
    if missing:
        parts.append(f"the weights lack {_named(sorted(missing, key=_natural))}")
    if unexpected:
        parts.append(f"the weights hold {_named(sorted(unexpected, key=_natural))} that config.json does not describe")
    if mismatched:
        shown = [f"{name} {list(shapes[name])} (config.json: {list(expected[name])})" for name in sorted(mismatched)]
        parts.append(f"config.json describes other shapes than the weights hold: {_named(shown)}")
    return "; ".join(parts) or None


def read_tokenizer(tok_dir: Path, vocab_size: int, model_dir: Path):
    """The tokenizer in `tok_dir`, loaded, with no token id beyond the model's vocabulary.

    Raises:
        UsageError: the tokenizer does not load, or has an id `>= vocab_size`.
    """
    from transformers import AutoTokenizer

    with bad_input(f"cannot load the tokenizer in {tok_dir}"):
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    check_vocabulary(tokenizer, vocab_size, f"the tokenizer in {tok_dir}", f"the model in {model_dir}")
    return tokenizer


def check_vocabulary(tokenizer, vocab_size: int, what: str, model: str) -> None:
    """Refuse a tokenizer with a token id the model has no embedding for.

    Raises:
        UsageError: "{what} has token ids up to N, {model} has V embeddings (vocab_size)".
    """
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= vocab_size:
        raise UsageError(f"{what} has token ids up to {largest}; {model} has {vocab_size} embeddings (vocab_size)")


# --- reading safetensors headers ------------------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """(tensor name -> shape, the problem or None), from the header alone."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or 8 + length > size:
            return {}, f"{path} is cut short: its safetensors header is incomplete ({size} bytes)"
        try:
            header = json.loads(handle.read(length))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in tensors.items()}
            spans = {k: (int(v["data_offsets"][0]), int(v["data_offsets"][1])) for k, v in tensors.items()}
            widths = {k: _DTYPE_BYTES.get(str(v["dtype"])) for k, v in tensors.items()}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return {}, f"{path} has an unreadable safetensors header"
    wrong = [k for k, (a, b) in spans.items() if not 0 <= a <= b or b - a != (_size(shapes[k], widths[k]) or b - a)]
    if wrong:
        return {}, f"{path} has a damaged safetensors header: the byte range of {_named(sorted(wrong))} is wrong"
    end = max((end for _, end in spans.values()), default=0)
    described = 8 + length + end
    if described > size:
        return {}, f"{path} is cut short: {size} bytes, its safetensors header describes {described}"
    if described < size:
        return {}, f"{path} is {size} bytes, its safetensors header describes {described}: bytes follow its tensors"
    return shapes, None


def _size(shape: tuple[int, ...], width: int | None) -> int | None:
    return None if width is None else math.prod(shape) * width


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes, problem = _read_header(path)
    if problem:
        raise UsageError(problem)
    return shapes


def _indexed_shapes(folder: Path, index: Path) -> dict[str, tuple[int, ...]]:
    with bad_input(f"cannot read {index}"):
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("its weight_map is not an object")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(str(shard), []).append(name)
    absent = sorted(shard for shard in shards if not (folder / shard).is_file())
    if absent:
        verb = "is" if len(absent) == 1 else "are"
        raise UsageError(f"{index} names {_named(absent, 'files')}, which {verb} missing")
    shapes: dict[str, tuple[int, ...]] = {}
    for shard, names in sorted(shards.items()):
        held = _safetensors_shapes(folder / shard)
        lacking = [name for name in names if name not in held]
        if lacking:
            raise UsageError(f"{folder / shard} lacks {_named(sorted(lacking))}, which {index.name} places in it")
        shapes.update(held)
    return shapes


def _layer_count(shapes: dict[str, tuple[int, ...]]) -> int | None:
    found = {int(match.group(1)) for name in shapes if (match := _LAYER.search(name))}
    return max(found) + 1 if found else None


def _natural(name: str) -> list:
    """Sort key: layer 10 after layer 2."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _named(items: list[str], noun: str = "tensors") -> str:
    """The first few items, then how many there are in all."""
    shown = ", ".join(items[:NAMED])
    return shown if len(items) <= NAMED else f"{shown}, ... ({len(items)} {noun})"
