"""The training stacks that `benchmark_throughput.py` compares, each run in a process of its own.

(a) `hf-sft train` as users run it; (b) a hand-written loop in the style of the seed `finetune_gpt.py`;
(c) TRL's `SFTTrainer` with prompt/completion records; (d) (a) with `--torch_compile true`. All take the same spec
(model folder, data files, steps, precision) and the same optimisation settings below, and report through the same
`Meter`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from throughput_meter import Meter, eval_loss, meter_callback

from hf_sft.data import DEFAULT_FORMAT
from hf_sft.training.arguments import parse_args

# The optimisation settings of hf-sft's defaults (the seed's), as a plain invocation parses them; the loop and TRL
# are given the same.
_DEFAULTS = parse_args(["--data_path", "unused.jsonl"])[2]
BATCH, ACCUM = _DEFAULTS.per_device_train_batch_size, _DEFAULTS.gradient_accumulation_steps
LR, MIN_LR, CLIP = _DEFAULTS.learning_rate, _DEFAULTS.learning_rate / 10, _DEFAULTS.max_grad_norm
WEIGHT_DECAY, BETAS = _DEFAULTS.weight_decay, (_DEFAULTS.adam_beta1, _DEFAULTS.adam_beta2)
WARMUP_RATIO, SEED = _DEFAULTS.warmup_steps, _DEFAULTS.seed


def prompt_text(record: dict, bos: str = "[BOS]") -> str:
    """The package's prompt for a Dolly record (instruction, optional context)."""
    return DEFAULT_FORMAT.prompt_text(record["instruction"], record.get("context") or "", bos_token=bos)


def response_text(record: dict) -> str:
    return DEFAULT_FORMAT.response_text(record["response"])


def worker_hfsft(spec: dict, meter: Meter, compiled: bool = False) -> dict:
    """(a): `hf-sft train` in this process, as users run it, with a callback that measures; (d): the same with
    `--torch_compile true`, and the graphs and seconds it compiled."""
    from hf_sft.training.callbacks import compile_time
    from hf_sft.training.run import run

    argv = [
        "--pretrained_ckpt_path", spec["model_dir"], "--data_path", spec["train"], "--out_dir", spec["out_dir"],
        "--max_seq_len", str(spec["max_len"]), "--max_iters", str(spec["steps"]), "--val_split", "0",
        "--device", spec["device"], "--train_sampling_strategy", "sequential", "--disable_tqdm", "true",
        *(["--dtype", "bfloat16"] if spec["dtype"] == "bfloat16" else []),
        *(["--torch_compile", "true"] if compiled else []),
        *(["--torch_compile_backend", spec["compile_backend"]] if compiled and spec.get("compile_backend") else []),
        *spec.get("hf_sft_args", []),
    ]  # fmt: skip
    run(*parse_args(argv), callbacks=[meter_callback(meter)])
    result = meter.result()
    if compiled:
        result["compile_graphs"], result["compile_s"] = compile_time()
    result["eval_loss"] = eval_loss(spec["out_dir"], spec["eval"], spec["max_len"])
    return result


def worker_hfsft_compiled(spec: dict, meter: Meter) -> dict:
    return worker_hfsft(spec, meter, compiled=True)


def worker_loop(spec: dict, meter: Meter) -> dict:
    """(b): the seed's style: format, tokenize, pad, mask, logits -> cross-entropy, AdamW, cosine schedule."""
    import torch
    import torch.nn.functional as F

    from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
    from hf_sft.tokenizer import load_tokenizer

    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(spec["model_dir"])
    device = torch.device(spec["device"])
    model = HfSftGPTForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).to(device).train()
    examples = []
    for line in Path(spec["train"]).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        prompt = tokenizer(prompt_text(record, tokenizer.bos_token), add_special_tokens=False).input_ids
        response = tokenizer(response_text(record), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
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

    bf16, batch, accum = spec["dtype"] == "bfloat16", spec["batch"], spec["accum"]
    meter.batch, meter.accum = batch, accum
    cursor = 0
    for step in range(spec["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        step_loss, step_tokens = 0.0, 0
        for _ in range(accum):
            chunk = examples[cursor : cursor + batch]
            cursor += batch
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (ids, labs) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                labels[row, : len(ids)] = torch.tensor(labs)
            input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
            meter.count(input_ids, attention_mask, labels)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            targets = labels[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1))
            (loss / accum).backward()
            n = int((targets != -100).sum())
            step_loss += float(loss) * n
            step_tokens += n
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step_done(step + 1, loss=step_loss / step_tokens)
    return meter.result()


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
        [{"prompt": prompt_text(r, tokenizer.bos_token), "completion": response_text(r)} for r in rows]
    )
    config = SFTConfig(
        output_dir=spec["out_dir"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["accum"],
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
        use_cpu=spec["device"] == "cpu",
        bf16=spec["dtype"] == "bfloat16",
        seed=SEED,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[meter_callback(meter)],
    )
    trainer.train()
    return meter.result()


WORKERS = {"a": worker_hfsft, "b": worker_loop, "c": worker_trl, "d": worker_hfsft_compiled}


def run_worker(stack: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meter = Meter(spec["warmup"], spec["steps"])
    result = WORKERS[stack](spec, meter)
    Path(spec["result"]).write_text(json.dumps(result))
