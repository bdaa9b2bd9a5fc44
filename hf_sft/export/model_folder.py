"""What every export reads: an hf_sft model folder (or `checkpoint-STEP` folder), its config, weights and tokenizer.

Each reader turns a folder that is not what export expects into one `UsageError` naming the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_sft.errors import UsageError, bad_input
from hf_sft.generate import resolve_model_dir, tokenizer_dir


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
