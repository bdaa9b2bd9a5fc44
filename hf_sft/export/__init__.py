"""Export an hf_sft model to formats that need no hf_sft code: stock transformers folders or the legacy `.pt`.

- `gpt2`: a `GPT2LMHeadModel` folder, for nanoGPT-style models (LayerNorm, learned positions, GELU MLP).
- `llama`: a `LlamaForCausalLM` folder, for LLaMA-style models (RMSNorm, rotary positions, SwiGLU MLP).
- `legacy-pt`: `{"model_state_dict", "model_args"}` with nanoGPT's `GPT` keys, or simple_llama's
  `{"model_state_dict", "config"}` with its `LLaMaTransformer` keys, which the original training code loads.
- `gguf`: one GGUF file for llama.cpp and the tools built on it, with an Ollama Modelfile beside it
  (`hf_sft.export.gguf_file`).

The stock folders hold config.json (no `auto_map`), model.safetensors, generation_config.json and the tokenizer, and
no Python file: serving engines that know only stock architectures load them. A model whose architecture the target
cannot express is refused with the features that prevent it.

Every target writes through `hf_sft.writer`: `check_export_destination` refuses, before anything is read, an
`--out` that is the model folder, lies inside it or holds it, or that holds something else (unless `--overwrite`);
the output is then written into a temporary sibling and renamed into place, so `--out` is always either what it
was or the complete export.
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_sft.errors import UsageError, bad_input
from hf_sft.generate import resolve_model_dir, tokenizer_dir
from hf_sft.writer import check_destination, new_file, new_folder

# target -> what its --out names: a "folder" or a "file"
TARGETS = {"gpt2": "folder", "llama": "folder", "legacy-pt": "file", "gguf": "file"}
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


def export_command(target: str) -> str:
    """The command recorded in (and allowed to rewrite) an export's output folder."""
    return f"export --to {target}"


def check_export_destination(model_dir: str | Path, target: str, out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before anything is read, an `--out` that exporting `model_dir` to `target` may not write.

    The sources are the model folder and, for a `checkpoint-STEP` folder without a tokenizer, the run folder's
    tokenizer files: `--out` may be none of them, lie inside them or hold them.

    Raises:
        UsageError: see `hf_sft.writer.check_destination`; also an unknown target.
    """
    if target not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    model_dir = Path(model_dir)
    sources = [model_dir]
    tokenizer = tokenizer_dir(model_dir) if model_dir.is_dir() else None
    if tokenizer is not None and tokenizer != model_dir:
        sources += [path for path in tokenizer.iterdir() if path.is_file()]
    kind = TARGETS[target]
    return check_destination(out, kind=kind, command=export_command(target), sources=sources, overwrite=overwrite)


def export_model(
    model_dir: str | Path, target: str, out: str | Path, mask_buffers: bool = False, overwrite: bool = False
) -> Path:
    """Export the model in `model_dir` to `target`, written to `out` (a folder; a file for `legacy-pt`).

    Args:
        model_dir: an hf_sft model folder or `checkpoint-STEP` folder.
        target: one of `TARGETS`.
        out: output folder (`gpt2`, `llama`) or `.pt` file (`legacy-pt`).
        mask_buffers: `legacy-pt` of a nanoGPT-style model only: also write the `attn.bias` causal-mask buffers
            that nanoGPT registers (and saves) when PyTorch has no flash attention.
        overwrite: replace what `out` holds (another program's file or folder).

    Returns:
        The path written.

    Raises:
        UsageError: unknown target, unusable input or output path, or a model the target cannot express.
        WriteFailed: the system refused the write (nothing is left behind).
    """
    if mask_buffers and target != "legacy-pt":
        raise UsageError("--mask_buffers only applies to --to legacy-pt")
    if target == "gguf":
        from hf_sft.export.gguf_file import export_gguf

        return export_gguf(model_dir, out, overwrite=overwrite).path
    out = check_export_destination(model_dir, target, out, overwrite)
    model_dir = resolve_model_dir(model_dir)
    config = load_hfsft_config(model_dir)
    if target == "legacy-pt":
        from hf_sft.export.legacy import export_legacy, legacy_layout

        layout = legacy_layout(config, model_dir)
        if mask_buffers and layout != "nanogpt":
            raise UsageError("--mask_buffers applies to nanoGPT-style models only (simple_llama saves no mask)")
        model = load_hfsft_model(model_dir)
        with new_file(out) as staging:
            export_legacy(model, layout, staging, mask_buffers=mask_buffers)
        return out

    from hf_sft.export.stock import export_stock

    check_exportable(config, target, model_dir)
    check_tokenizer(model_dir)
    model = load_hfsft_model(model_dir)
    with new_folder(out, command=export_command(target)) as staging:
        export_stock(model, target, model_dir, staging)
    return out
