"""Answer instructions with a fine-tuned model, using the prompt template it was trained with.

A model folder is what `hf-sft convert` or `hf-sft train` writes, or one of the `checkpoint-STEP/` folders inside a
training run (whose tokenizer, if absent, is taken from the run folder above it). Generation uses the KV cache and
stops at EOS; it is greedy unless a sampling option is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hf_sft.errors import UsageError
from hf_sft.model_folder import read_model_folder


@dataclass(frozen=True)
class Sampling:
    """How to pick each new token: greedy when no field is set.

    Attributes:
        temperature: softmax temperature; 0 means greedy.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
        top_k: keep only the `top_k` most likely tokens.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    @property
    def greedy(self) -> bool:
        """True when every token is the most likely one."""
        if self.temperature == 0:
            return True
        return self.temperature is None and self.top_p is None and self.top_k is None

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate` (explicit, so a model's own generation config cannot sample)."""
        if self.greedy:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        for name, value, low, high in (("temperature", self.temperature, 0, None), ("top_p", self.top_p, 0, 1)):
            if value is not None and not (value > low and (high is None or value <= high)):
                raise UsageError(f"--{name} must be in ({low}, {high or 'inf'}], got {value}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top_k must be at least 1, got {self.top_k}")
        return {"do_sample": True, "temperature": self.temperature or 1.0, "top_p": self.top_p, "top_k": self.top_k}


def load_for_generation(model_dir: str | Path, device: str | None = None):
    """Load a model folder (or a `checkpoint-STEP` folder) and its tokenizer for inference.

    Args:
        model_dir: the folder.
        device: `"cpu"`, `"cuda"`, ...; default: CUDA when available.

    Returns:
        `(model, tokenizer)`, the model in eval mode on `device`.

    Raises:
        UsageError: a folder `hf_sft.model_folder.read_model_folder` refuses, or a tokenizer without an EOS token.
    """
    folder = read_model_folder(model_dir)
    tokenizer = folder.tokenizer
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer in {folder.tokenizer_path} has no EOS token: generation could not stop")
    model = folder.load_model()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def prompt_ids(tokenizer, instruction: str, input: str = "", template=None) -> list[int]:
    """Token ids of the prompt, in the format the model was trained with.

    The format is the one the tokenizer's chat template names (training installs it; see
    `hf_sft.data.template.format_of`), unless `template` is given. The text is tokenised exactly as training
    tokenised prompts.
    """
    from hf_sft.data import encode_prompt, format_of

    return encode_prompt(tokenizer, instruction, input, template=template or format_of(tokenizer))


@torch.no_grad()
def generate_response(
    model,
    tokenizer,
    instruction: str,
    input: str = "",
    max_new_tokens: int = 256,
    sampling: Sampling | None = None,
    use_cache: bool = True,
    template=None,
) -> str:
    """The model's answer to one instruction: new tokens up to EOS, decoded without special tokens.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        instruction: the task.
        input: optional context.
        max_new_tokens: the most tokens to generate (fewer when the model's context would overflow).
        sampling: how to pick tokens; greedy by default.
        use_cache: use the KV cache (the result is the same without it, only slower).
        template: the prompt format; default: the one the tokenizer's chat template names.

    Raises:
        UsageError: the prompt alone fills the model's context.
    """
    ids = prompt_ids(tokenizer, instruction, input, template)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and len(ids) >= limit:
        raise UsageError(f"the prompt is {len(ids)} tokens long; this model reads at most {limit}")
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - len(ids))
    input_ids = torch.tensor([ids], device=model.device)
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        use_cache=use_cache,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **(sampling or Sampling()).generate_kwargs(),
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
