"""How the throughput benchmark measures a training run: tokens and loss per optimizer step, the clock, eval loss."""

from __future__ import annotations

import resource
import time


class Meter:
    """Per optimizer step: real, supervised and computed token positions, and the loss; the clock after warm-up."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.done: list[tuple[int, int, int]] = []  # per finished step: (real, supervised, positions computed)
        self.current = [0, 0, 0]
        self.losses: list[float] = []
        self.step_loss = 0.0
        self.start = self.end = None
        self.rss_kb = 0
        self.batch = self.accum = None  # as the run reports them

    def count(self, input_ids, attention_mask, labels) -> None:
        """Adds one forward's tokens; tensors stay on their device (no host sync until `result`)."""
        real = attention_mask.sum() if attention_mask is not None else input_ids.numel()
        supervised = (labels[:, 1:] != -100).sum()
        for i, n in enumerate((real, supervised, input_ids.numel())):
            self.current[i] += n

    def step_done(self, step: int, loss: float | None = None) -> None:
        self.done.append(tuple(self.current))
        self.current = [0, 0, 0]
        self.losses.append(self.step_loss / self.done[-1][1] if loss is None else loss)
        self.step_loss = 0.0
        if step in (self.warmup, self.steps):
            _synchronize()  # the clock reads finished work, not queued GPU kernels
        if step == self.warmup:
            self.start = time.perf_counter()
        if step == self.steps:
            self.end = time.perf_counter()
            self.rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def result(self) -> dict:
        timed = self.done[self.warmup : self.steps]
        real, supervised, positions = (float(sum(column)) for column in zip(*timed, strict=True))
        elapsed = self.end - self.start
        return {
            "peak_gpu_mb": _peak_gpu_mb(),
            "real_tok_s": real / elapsed,
            "sup_tok_s": supervised / elapsed,
            "pad_frac": 1 - real / positions,
            "peak_rss_mb": self.rss_kb / 1024,
            "final_loss": float(self.losses[-1]) if self.losses else float("nan"),
            "seconds": elapsed,
            "batch": self.batch,
            "accum": self.accum,
        }


def meter_callback(meter: Meter):
    """A Trainer callback: reads batch and accumulation from the run's arguments, counts the tokens and sums the token
    losses of every training forward with hooks, closes each step."""
    import torch
    from transformers import TrainerCallback

    # Hooks of a compiled model are traced with it unless told not to: the meter's counters would recompile them.
    @torch.compiler.disable
    def before(module, args, kwargs):
        if module.training:
            meter.count(kwargs["input_ids"], kwargs.get("attention_mask"), kwargs["labels"])

    @torch.compiler.disable
    def after(module, args, kwargs, output):
        if module.training:  # back to summed token losses: divided by num_items_in_batch if given, else a mean
            count = kwargs.get("num_items_in_batch")
            count = (kwargs["labels"][:, 1:] != -100).sum() if count is None else count
            meter.step_loss += (output.loss * count).detach()

    class MeterCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            meter.batch, meter.accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
            model.register_forward_pre_hook(before, with_kwargs=True)
            model.register_forward_hook(after, with_kwargs=True)

        def on_step_end(self, args, state, control, **kwargs):
            meter.step_done(state.global_step)

    return MeterCallback()


def eval_loss(model_dir: str, eval_path: str, max_len: int) -> float:
    """Mean token loss of the trained model on the held-out records (fp32, eval mode)."""
    import torch

    from hf_sft.data import build_datasets, install_chat_template, make_collator
    from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
    from hf_sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    install_chat_template(tokenizer)
    model = HfSftGPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = build_datasets(eval_path, tokenizer, max_seq_len=max_len).train.dataset
    collate = make_collator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), 8):
            batch = collate([data[i] for i in range(start, min(start + 8, len(data)))])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / count


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gpu_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
