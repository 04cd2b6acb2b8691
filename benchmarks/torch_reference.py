"""A nanoGPT-style PyTorch model, trained on the same shapes, for same-run speed ratios.

Used by train_throughput.py when PyTorch is installed (`pip install torch==2.13.0`, a CPU
build; never a dependency of the package). Written here in nanoGPT's manner: learned
positions, pre-LN blocks with fused QKV, exact GELU, tied head, `scaled_dot_product_attention`
with the causal flag, fused AdamW (weight decay 0.1, betas 0.9/0.99) and clipping at 1.0.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.tok.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def tokens_per_second(ids: np.ndarray, vocab: int, layers: int, heads: int, d_model: int,
                      seq_len: int, batch: int, seconds: float) -> float:
    """Steady-state training tokens/s on random windows of `ids`."""
    torch.manual_seed(0)
    model = GPT(vocab, d_model, layers, heads, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
                            fused=True)
    data = torch.from_numpy(ids.astype(np.int64))
    rng = np.random.default_rng(0)

    def step():
        starts = torch.from_numpy(rng.integers(0, len(data) - seq_len - 1, batch))
        window = torch.stack([data[s:s + seq_len + 1] for s in starts])
        loss = model(window[:, :-1], window[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(3):
        step()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 5:
        step()
        steps += 1
    return steps * batch * seq_len / (time.perf_counter() - t0)
