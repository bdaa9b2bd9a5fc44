"""The three training stacks that `benchmark_throughput.py` compares, each run in a process of its own.

(a) `hf-sft train` as users run it; (b) a hand-written loop in the style of the seed `finetune_gpt.py`;
(c) TRL's `SFTTrainer` with prompt/completion records. All three take the same spec (model folder, data files,
steps, precision) and the same optimisation settings below, and report through the same `Meter`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

# The seed's optimisation settings (our defaults); the loop and TRL are given the same.
BATCH, ACCUM, LR, MIN_LR = 2, 8, 3e-5, 3e-6
WEIGHT_DECAY, BETAS, CLIP, WARMUP_RATIO, SEED = 0.1, (0.9, 0.95), 1.0, 0.03, 1337


def prompt_text(record: dict, bos: str = "[BOS]") -> str:
    """The seed's prompt format (the Input part only when the input is not empty)."""
    context = record.get("context") or record.get("input") or ""
    if context.strip():
        return f"{bos} Instruction: {record['instruction']} Input: {context} Response:"
    return f"{bos} Instruction: {record['instruction']} Response:"


class Meter:
    """Counts the tokens of every micro-batch a collator builds and the loss of every optimizer step."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.batches: list[tuple[int, int, int]] = []  # (real, supervised, positions computed)
        self.losses: list[float] = []
        self.start = self.end = None
        self.rss_kb = 0

    def count(self, batch: dict) -> dict:
        labels = batch["labels"]
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else labels.numel()
        self.batches.append((real, int((labels[:, 1:] != -100).sum()), labels.numel()))
        return batch

    def step_done(self, step: int) -> None:
        if step == self.warmup:
            self.start = time.perf_counter()
        if step == self.steps:
            self.end = time.perf_counter()
            self.rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def result(self, accum: int) -> dict:
        timed = self.batches[self.warmup * accum : self.steps * accum]
        real, supervised, positions = (sum(column) for column in zip(*timed, strict=True))
        elapsed = self.end - self.start
        return {
            "real_tok_s": real / elapsed,
            "sup_tok_s": supervised / elapsed,
            "pad_frac": 1 - real / positions,
            "peak_rss_mb": self.rss_kb / 1024,
            "final_loss": self.losses[-1] if self.losses else float("nan"),
            "seconds": elapsed,
            "timed_real_tokens": real,
        }


def worker_hfsft(spec: dict, meter: Meter) -> dict:
    """(a): `hf-sft train` in this process, with a callback that reads the clock and the step losses."""
    import transformers

    import hf_sft.training.run as train_run

    class TimedTrainer(transformers.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            collate = self.data_collator
            self.data_collator = lambda features: meter.count(collate(features))
            self.add_callback(step_callback(meter))
            self._step_loss = 0.0
            self._micro = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._step_loss += float(loss)
            self._micro += 1
            if self._micro % self.args.gradient_accumulation_steps == 0:
                meter.losses.append(self._step_loss)
                self._step_loss = 0.0
            return loss

    train_run.Trainer = TimedTrainer
    argv = [
        "--pretrained_ckpt_path", spec["model_dir"], "--data_path", spec["train"], "--out_dir", spec["out_dir"],
        "--max_seq_len", str(spec["max_len"]), "--max_iters", str(spec["steps"]), "--val_split", "0",
        "--device", "cpu", "--train_sampling_strategy", "sequential", "--disable_tqdm", "true",
        *(["--dtype", "bfloat16"] if spec["dtype"] == "bfloat16" else []),
        *spec.get("extra_args", []),
    ]  # fmt: skip
    train_run.main(argv)
    result = meter.result(ACCUM)
    result["eval_loss"] = eval_loss(spec["out_dir"], spec["eval"], spec["max_len"])
    return result


def step_callback(meter: Meter):
    """A Trainer callback that tells `meter` when each optimizer step ends."""
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.step_done(state.global_step)

    return StepCallback()


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


def worker_loop(spec: dict, meter: Meter) -> dict:
    """(b): the seed's style: format, tokenize, pad, mask, logits -> cross-entropy, AdamW, cosine schedule."""
    import torch
    import torch.nn.functional as F

    from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
    from hf_sft.tokenizer import load_tokenizer

    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(spec["model_dir"])
    model = HfSftGPTForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).train()
    examples = []
    for line in Path(spec["train"]).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        prompt = tokenizer(prompt_text(record, tokenizer.bos_token), add_special_tokens=False).input_ids
        response = tokenizer(" " + record["response"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        examples.append((prompt + response, [-100] * len(prompt) + response))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    warmup = math.ceil(WARMUP_RATIO * spec["steps"])

    def get_lr(step: int) -> float:
        if step < warmup:
            return LR * (step + 1) / warmup
        progress = (step - warmup) / max(1, spec["steps"] - warmup)
        return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * progress))

    bf16 = spec["dtype"] == "bfloat16"
    cursor = 0
    for step in range(spec["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        step_loss, step_tokens = 0.0, 0
        for _ in range(ACCUM):
            chunk = examples[cursor : cursor + BATCH]
            cursor += BATCH
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (ids, labs) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                labels[row, : len(ids)] = torch.tensor(labs)
            meter.count({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            targets = labels[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1))
            (loss / ACCUM).backward()
            n = int((targets != -100).sum())
            step_loss += float(loss) * n
            step_tokens += n
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.losses.append(step_loss / step_tokens)
        meter.step_done(step + 1)
    return meter.result(ACCUM)


def worker_trl(spec: dict, meter: Meter) -> dict:
    """(c): TRL's SFTTrainer, prompt/completion records, completion-only loss, no packing."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
    from hf_sft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec["model_dir"])
    model = HfSftGPTForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    rows = [json.loads(line) for line in Path(spec["train"]).read_text(encoding="utf-8").splitlines()]
    dataset = Dataset.from_list(
        [{"prompt": prompt_text(r, tokenizer.bos_token), "completion": " " + r["response"]} for r in rows]
    )
    config = SFTConfig(
        output_dir=spec["out_dir"],
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        learning_rate=LR,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": MIN_LR},
        warmup_steps=WARMUP_RATIO,
        weight_decay=WEIGHT_DECAY,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        max_grad_norm=CLIP,
        max_steps=spec["steps"],
        max_length=spec["max_len"],
        completion_only_loss=True,
        packing=False,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=spec["dtype"] == "bfloat16",
        seed=SEED,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    collate = trainer.data_collator
    trainer.data_collator = lambda features: meter.count(collate(features))
    trainer.add_callback(step_callback(meter))
    original_step = trainer.training_step
    state = {"loss": 0.0, "micro": 0}

    def training_step(model, inputs, num_items_in_batch=None):
        loss = original_step(model, inputs, num_items_in_batch)
        state["loss"] += float(loss)
        state["micro"] += 1
        if state["micro"] % ACCUM == 0:
            meter.losses.append(state["loss"])
            state["loss"] = 0.0
        return loss

    trainer.training_step = training_step
    trainer.train()
    return meter.result(ACCUM)


WORKERS = {"a": worker_hfsft, "b": worker_loop, "c": worker_trl}


def run_worker(stack: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meter = Meter(spec["warmup"], spec["steps"])
    result = WORKERS[stack](spec, meter)
    Path(spec["result"]).write_text(json.dumps(result))
