"""What a finished run leaves beside its weights: the loss plot and the model card."""

from __future__ import annotations

from pathlib import Path

LOSS_PLOT = "loss.png"


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


def model_card(
    *,
    base_model: str,
    data: str,
    hyperparameters: dict,
    log_history: list[dict],
    samples: list[dict] | None = None,
    repo_id: str | None = None,
) -> str:
    """A README.md for the output folder (and the Hub)."""
    train, evals = loss_series(log_history)
    final_train = f"{train[-1][1]:.4f} (step {train[-1][0]})" if train else "n/a"
    final_eval = f"{evals[-1][1]:.4f} (step {evals[-1][0]})" if evals else "n/a"
    name = repo_id or "path/to/this/folder"
    # Enum values (lr_scheduler_type, ...) show as the strings one passes on the command line.
    rows = "\n".join(f"| `{k}` | `{getattr(v, 'value', v)}` |" for k, v in sorted(hyperparameters.items()))
    sample_text = ""
    if samples:
        last = samples[-1]
        lines = "\n".join(f"- **{q}** → {a}" for q, a in last["answers"].items())
        sample_text = f"\n## Sample answers (greedy, step {last['step']})\n\n{lines}\n"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- hf_sft
- instruction-tuning
---

# Instruction-tuned GPT

Fine-tuned with hf_sft from **{base_model}** on **{data}**.

## Results

| | loss |
|---|---|
| final train loss | {final_train} |
| final eval loss | {final_eval} |

![loss curves]({LOSS_PLOT})
{sample_text}
## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}")
prompt = tokenizer.apply_chat_template(
    [{{"role": "user", "content": "What is the capital of France?"}}], tokenize=False, add_generation_prompt=True
)
inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The model code ships in this folder (`modeling_hfsft_gpt.py`, `configuration_hfsft_gpt.py`), hence
`trust_remote_code=True`; with `hf_sft` installed, `import hf_sft` registers the classes and the flag is not needed.

## Training hyperparameters

| name | value |
|---|---|
{rows}
"""
