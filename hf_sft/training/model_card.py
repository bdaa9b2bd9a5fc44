"""What a finished run leaves beside its weights: the loss plot and the model card."""

from __future__ import annotations

import re
from pathlib import Path

LOSS_PLOT = "loss.png"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def loss_series(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) pairs from Trainer's log history."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def plot_losses(log_history: list[dict], path: str | Path) -> Path:
    """Write the train/eval loss curves to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = loss_series(log_history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


_CARD_TEMPLATE = """---
{{ card_data }}
---

# Instruction-tuned GPT

Fine-tuned with hf_sft from **{{ base_model }}** on **{{ data }}**.

## Results

| | loss |
|---|---|
| final train loss | {{ final_train }} |
| final eval loss | {{ final_eval }} |

![loss curves]({{ loss_plot }})
{% if samples %}
## Sample answers (greedy, step {{ samples.step }})

{% for question, answer in samples.answers.items() %}- **{{ question }}** → {{ answer }}
{% endfor %}{% endif %}
## Prompt format

Trained in the `{{ prompt_format }}` format, which is also this tokenizer's chat template:
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives the prompt the model was trained on.

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ name }}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{{ name }}")
inputs = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The model code ships in this folder (`modeling_hfsft_gpt.py` and the three files it imports), hence
`trust_remote_code=True`; with `hf_sft` installed, `import hf_sft` registers the classes and the flag is not needed.

## Training hyperparameters

| name | value |
|---|---|
{% for key, value in hyperparameters %}| `{{ key }}` | `{{ value }}` |
{% endfor %}"""


def model_card(
    *,
    base_model: str,
    data: str,
    hyperparameters: dict,
    log_history: list[dict],
    samples: list[dict] | None = None,
    repo_id: str | None = None,
    prompt_format: str = "seed",
    license: str | None = None,
):
    """The model card (`huggingface_hub.ModelCard`) of the output folder and the Hub: metadata, results, usage.

    Args:
        base_model: where the model came from; a Hub id also becomes the `base_model` metadata.
        data: the training data; a Hub dataset id also becomes the `datasets` metadata.
        hyperparameters: shown as a table.
        log_history: Trainer's log history (final losses).
        samples: the sample-answer history of `SampleGenerationCallback`.
        repo_id: the Hub repository, for the loading example.
        prompt_format: the `--template` the model was trained with.
        license: the `license` metadata, if known.

    Returns:
        The card; `card.save(path)` writes README.md.
    """
    from huggingface_hub import ModelCard, ModelCardData

    train, evals = loss_series(log_history)
    metadata = ModelCardData(
        base_model=base_model if _is_hub_id(base_model) else None,
        datasets=[data] if _is_hub_id(data) else None,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=["hf_sft", "instruction-tuning", f"prompt-format-{prompt_format}"],
    )
    return ModelCard.from_template(
        metadata,
        template_str=_CARD_TEMPLATE,
        base_model=base_model,
        data=data,
        final_train=f"{train[-1][1]:.4f} (step {train[-1][0]})" if train else "n/a",
        final_eval=f"{evals[-1][1]:.4f} (step {evals[-1][0]})" if evals else "n/a",
        loss_plot=LOSS_PLOT,
        samples=samples[-1] if samples else None,
        prompt_format=prompt_format,
        name=repo_id or "path/to/this/folder",
        # Enum values (lr_scheduler_type, ...) show as the strings one passes on the command line.
        hyperparameters=[(k, getattr(v, "value", v)) for k, v in sorted(hyperparameters.items())],
    )


def _is_hub_id(name: str | None) -> bool:
    """`owner/name` that is not a local path."""
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).exists()
