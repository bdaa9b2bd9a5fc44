"""The export targets: what each can express of our architecture, what every export reads, where each may write.

- What the stock architectures (GPT-2, LLaMA) can express: `blockers` names the features of an hf_sft config that a
  target lacks; the stock folders (`hf_sft.export.stock`), llama.cpp's architectures (`hf_sft.export.gguf_model`)
  and the legacy layouts (`hf_sft.export.legacy`) all start from it.
- What every export reads: an hf_sft model folder (or `checkpoint-STEP` folder), checked by the one reader
  (`hf_sft.model_folder`) before anything of it is used, and refused unless it holds an hf_sft model.
- Where an export may write: the targets, what each one's `--out` names, and the check made before any work,
  through `hf_sft.writer`: an `--out` that is the model folder, lies inside it or holds it is refused even with
  `--overwrite`; one that holds something other than an earlier export to the same target is refused without it.
"""

from __future__ import annotations

from pathlib import Path

from hf_sft.errors import UsageError
from hf_sft.model_folder import ModelFolder, Tokenizer, read_model_folder, tokenizer_dir
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


def read_hfsft_folder(model_dir: str | Path, tokenizer: Tokenizer = "required") -> ModelFolder:
    """An hf_sft model folder (or `checkpoint-STEP` folder) checked by the one reader, and of an hf_sft model.

    Args:
        model_dir: the folder.
        tokenizer: as `hf_sft.model_folder.read_model_folder`: a stock folder and a GGUF carry the tokenizer
            ("required"), a legacy `.pt` does not ("if present").

    Raises:
        UsageError: a folder the reader refuses, or a model that is not an hf_sft model.
    """
    from hf_sft import HfSftGPTConfig

    folder = read_model_folder(model_dir, tokenizer=tokenizer)
    model_type = getattr(folder.config, "model_type", None)
    if model_type != HfSftGPTConfig.model_type:
        raise UsageError(
            f"{folder.path} holds a {model_type!r} model, not an hf_sft one ({HfSftGPTConfig.model_type!r}): "
            "export reads the folders written by hf-sft convert and hf-sft train"
        )
    return folder


def load_hfsft_model(model_dir: str | Path | ModelFolder):
    """The model of an hf_sft model folder (read by `read_hfsft_folder` unless given read), in the dtype it was saved
    in, in eval mode.

    Raises:
        UsageError: as `read_hfsft_folder`.
    """
    from hf_sft import HfSftGPTForCausalLM

    folder = model_dir if isinstance(model_dir, ModelFolder) else read_hfsft_folder(model_dir, "if present")
    return folder.load_model(HfSftGPTForCausalLM, dtype="auto").eval()


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
