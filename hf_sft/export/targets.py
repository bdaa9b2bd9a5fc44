"""The export targets: what each can express of our architecture, what every export reads, where each may write.

- What the stock architectures (GPT-2, LLaMA) can express: `blockers` names the features of an hf_sft config that a
  target lacks; the stock folders (`hf_sft.export.stock`), llama.cpp's architectures (`hf_sft.export.gguf_model`)
  and the legacy layouts (`hf_sft.export.legacy`) all start from it.
- What every export reads: an hf_sft model folder (or `checkpoint-STEP` folder), its config, weights and tokenizer;
  each reader turns a folder that is not what export expects into one `UsageError` naming the folder.
- Where an export may write: the targets, what each one's `--out` names, and the check made before any work,
  through `hf_sft.writer`: an `--out` that is the model folder, lies inside it or holds it is refused even with
  `--overwrite`; one that holds something other than an earlier export to the same target is refused without it.
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_sft.errors import UsageError, bad_input
from hf_sft.generate import resolve_model_dir, tokenizer_dir
from hf_sft.writer import check_destination

# --- what each target can express -----------------------------------------------------------------------------------

# Where each stock target differs from our configurable architecture: (config test, the feature that prevents it).
_STOCK_REQUIREMENTS = {
    "gpt2": (
        (lambda c: c.norm_type == "layernorm", "RMSNorm (GPT-2 has LayerNorm)"),
        (lambda c: c.position_embedding_type == "learned", "rotary positions (GPT-2 learns absolute positions)"),
        (lambda c: c.mlp_type == "gelu", "a SwiGLU MLP (GPT-2 has a GELU MLP)"),
        (
            lambda c: c.num_key_value_heads == c.num_attention_heads,
            "grouped-query attention (GPT-2 has one key/value head per query head)",
        ),
    ),
    "llama": (
        (lambda c: c.norm_type == "rmsnorm", "LayerNorm (LLaMA has RMSNorm)"),
        (lambda c: c.position_embedding_type == "rope", "learned absolute positions (LLaMA has rotary positions)"),
        (lambda c: c.mlp_type == "swiglu", "a GELU MLP (LLaMA has a SwiGLU MLP)"),
    ),
}


def blockers(config, target: str) -> list[str]:
    """The features of `config` that the stock architecture `target` ("gpt2" or "llama") cannot express."""
    return [feature for holds, feature in _STOCK_REQUIREMENTS[target] if not holds(config)]


def check_exportable(config, target: str, where: str | Path) -> None:
    """Raise a `UsageError` naming the blockers of `target` for `config`, and the target that would work, if any."""
    found = blockers(config, target)
    if not found:
        return
    others = [t for t in _STOCK_REQUIREMENTS if t != target and not blockers(config, t)]
    hint = f"; this model exports with --to {others[0]}" if others else ""
    raise UsageError(f"cannot export {where} to {target}: the model uses {', '.join(found)}{hint}")


# --- what every export reads ----------------------------------------------------------------------------------------


def load_hfsft_config(model_dir: str | Path):
    """The `HfSftGPTConfig` of an hf_sft model folder (or `checkpoint-STEP` folder), read without the weights.

    Raises:
        UsageError: not a model folder, or a model that is not an hf_sft model.
    """
    model_dir = resolve_model_dir(model_dir)
    from hf_sft import HfSftGPTConfig

    try:
        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise UsageError(f"cannot read {model_dir / 'config.json'}: {err}") from None
    if model_type != HfSftGPTConfig.model_type:
        raise UsageError(
            f"{model_dir} holds a {model_type!r} model, not an hf_sft one ({HfSftGPTConfig.model_type!r}): "
            "export reads the folders written by hf-sft convert and hf-sft train"
        )
    with bad_input(f"cannot read the model configuration in {model_dir}"):
        return HfSftGPTConfig.from_pretrained(model_dir)


def load_hfsft_model(model_dir: str | Path):
    """Load an hf_sft model folder (or `checkpoint-STEP` folder) in the dtype it was saved in, in eval mode.

    Raises:
        UsageError: as `load_hfsft_config`.
    """
    from hf_sft import HfSftGPTForCausalLM

    config = load_hfsft_config(model_dir)
    with bad_input(f"cannot load the model in {model_dir}"):
        return HfSftGPTForCausalLM.from_pretrained(model_dir, config=config, dtype="auto").eval()


def check_tokenizer(model_dir: Path) -> None:
    """The model's tokenizer (copied into stock folders) loads; reads it, writes nothing.

    Raises:
        UsageError: naming the folder and what is wrong with its tokenizer files.
    """
    from transformers import PreTrainedTokenizerFast

    folder = tokenizer_dir(model_dir)
    if folder is not None:
        with bad_input(f"cannot load the tokenizer in {folder}"):
            PreTrainedTokenizerFast.from_pretrained(folder)


# --- where each target may write ------------------------------------------------------------------------------------

# target -> what its --out names: a "folder" or a "file"
TARGETS = {"gpt2": "folder", "llama": "folder", "legacy-pt": "file", "gguf": "file"}


def export_command(target: str) -> str:
    """The command recorded in (and allowed to rewrite) an export's output folder."""
    return f"export --to {target}"


def check_export_destination(
    model_dir: str | Path,
    target: str,
    out: str | Path,
    overwrite: bool = False,
    *,
    inputs: list[str | Path] = (),
    marker: bytes | None = None,
) -> Path:
    """Refuse, before anything is read, an `--out` that exporting `model_dir` to `target` may not write.

    The sources are the model folder, `inputs` (e.g. `--check_data`) and, for a `checkpoint-STEP` folder without a
    tokenizer, the run folder's tokenizer files: `--out` may be none of them, lie inside them or hold them.

    Args:
        marker: how an earlier export's file begins (see `hf_sft.writer.check_destination`).

    Raises:
        UsageError: see `hf_sft.writer.check_destination`; also an unknown target.
    """
    if target not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    model_dir = Path(model_dir)
    sources = [model_dir, *(path for path in inputs if Path(path).exists())]
    tokenizer = tokenizer_dir(model_dir) if model_dir.is_dir() else None
    if tokenizer is not None and tokenizer != model_dir:
        sources += [path for path in tokenizer.iterdir() if path.is_file()]
    kind = TARGETS[target]
    return check_destination(
        out, kind=kind, command=export_command(target), sources=sources, overwrite=overwrite, marker=marker
    )
