"""nanoGPT's `GPT` (model.py: the same modules, names and parameter order) and a finetune_gpt.py-style loop that
leaves a `ckpt_iter_N.pt`: the seed's training checkpoint, for the continuation tests."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, bias: bool, vocab_size: int, **_):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(0.0),
                h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
                ln_f=LayerNorm(n_embd, bias),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * n_layer))
            elif param.dim() >= 2:
                nn.init.normal_(param, std=0.02)
            elif name.endswith(".weight"):
                nn.init.normal_(param, mean=1.0, std=0.1)  # perturbed norms: a wrong mapping shows
            else:
                nn.init.normal_(param, std=0.1)

    def forward(self, idx, targets):
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float]):
        """nanoGPT's: 2-D and larger parameters decayed, the others not."""
        params = dict(self.named_parameters())
        groups = [
            {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


MODEL_ARGS = {
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
    "block_size": 64,
    "bias": True,
    "vocab_size": 400,
    "dropout": 0.0,
}


def finetune_gpt_checkpoint(path: Path, steps: int, flags: dict, seed: int = 0) -> Path:
    """Train nanoGPT `steps` optimizer steps on random tokens as finetune_gpt.py does, and save `ckpt_iter_N.pt`.

    Args:
        path: the file to write.
        steps: optimizer steps (`iter_num`).
        flags: the seed script's arguments, saved (as an `argparse.Namespace`, as its `args`) under `config`.
        seed: for the initial weights and the tokens.
    """
    torch.manual_seed(seed)
    model = GPT(**MODEL_ARGS)
    optimizer = model.configure_optimizers(0.1, flags.get("learning_rate", 3e-5), (0.9, 0.95))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(steps):
        tokens = torch.randint(0, MODEL_ARGS["vocab_size"], (2, 17))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.save(
        {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "iter_num": steps,
            "model_args": dict(MODEL_ARGS),
            "config": argparse.Namespace(**flags),
        },
        path,
    )
    return path
