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

Every target writes through `hf_sft.writer`: `check_export_destination` (`hf_sft.export.targets`) refuses,
before anything is read, an `--out` that is the model folder, lies inside it or holds it, or that holds something
else (unless `--overwrite`); the output is then written into a temporary sibling and renamed into place, so `--out`
is always either what it was or the complete export.

The package's modules, lowest first: `targets` (what GPT-2 and LLaMA can express, reading the hf_sft folder, the
targets and where they may write); then one module per target: `stock`, `legacy`, `gguf_file` (with `gguf_model`,
`gguf_vocab`, `gguf_tokenize`, `gguf_check`, `ollama`, and `llama_server` for llama.cpp itself). This file only
dispatches `export_model` to them.
"""

from __future__ import annotations

from pathlib import Path

from hf_sft.errors import UsageError
from hf_sft.export.targets import (
    TARGETS,
    blockers,
    check_export_destination,
    check_exportable,
    export_command,
    load_hfsft_model,
    read_hfsft_folder,
)
from hf_sft.writer import new_file, new_folder

__all__ = ["TARGETS", "blockers", "check_export_destination", "export_model", "load_hfsft_model", "read_hfsft_folder"]


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
    # A legacy .pt carries no tokenizer; a stock folder does.
    folder = read_hfsft_folder(model_dir, tokenizer="if present" if target == "legacy-pt" else "required")
    model_dir, config = folder.path, folder.config
    if target == "legacy-pt":
        from hf_sft.export.legacy import export_legacy, legacy_layout

        layout = legacy_layout(config, model_dir)
        if mask_buffers and layout != "nanogpt":
            raise UsageError("--mask_buffers applies to nanoGPT-style models only (simple_llama saves no mask)")
        model = load_hfsft_model(folder)
        with new_file(out) as staging:
            export_legacy(model, layout, staging, mask_buffers=mask_buffers)
        return out

    from hf_sft.export.stock import export_stock

    check_exportable(config, target, model_dir)
    model = load_hfsft_model(folder)
    with new_folder(out, command=export_command(target)) as staging:
        export_stock(model, target, model_dir, staging)
    return out
