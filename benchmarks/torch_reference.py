"""A nanoGPT-style PyTorch model and its recipes, run beside ours for same-run ratios.

Needs PyTorch (`pip install torch==2.13.0`, a CPU build; never a dependency of the package).
Written here in nanoGPT's manner: learned positions, pre-LN blocks with fused QKV, exact GELU,
a tied head, `scaled_dot_product_attention` with the causal flag, AdamW with betas 0.9/0.99
and clipping at 1.0.

- `tokens_per_second`: steady training throughput on given shapes (train_throughput.py).
- `python benchmarks/torch_reference.py train --data F`: nanoGPT's baby CPU recipe
  (README, "I only have a macbook": config/train_shakespeare_char.py with 4 layers, 4 heads,
  d 128, context 64, batch 12, 2,000 iterations, no dropout), as its train.py runs it: no
  biases, its initialisation, weight decay 0.1 on matrices only, warm-up over 100 iterations
  then cosine decay from 1e-3 to 1e-4, an estimate of 20 batches on each split every 250
  iterations; then the loss over the whole validation split (every target of the last 10%
  once, in non-overlapping windows, as our evaluation reads it). Prints one JSON line.
- `python benchmarks/torch_reference.py sample --data F --tokens 500`: nanoGPT's sample.py
  loop (no key/value cache: a full forward pass over the last `context` tokens per new token,
  temperature 0.8, top-k 200) on a model of the `default` preset's shape (4 layers, 4 heads,
  d 128, context 256). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        self.up, self.down = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq_len: int,
                 bias: bool = True):
        super().__init__()
        self.seq_len = seq_len
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=bias)

    def logits(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.T

    def forward(self, idx, targets):
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def nanogpt_init(model: GPT, layers: int) -> None:
    """nanoGPT's initialisation: every matrix and embedding N(0, 0.02), the residual
    projections N(0, 0.02 / sqrt(2 layers)), biases zero."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "down.weight")) \
                else 0.02
            nn.init.normal_(p, 0.0, std)
        elif name.endswith("bias") and "ln" not in name:
            nn.init.zeros_(p)


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


# nanoGPT's baby CPU recipe (the README's command line over config/train_shakespeare_char.py
# and train.py's defaults).
BABY = dict(layers=4, heads=4, d=128, context=64, batch=12, iters=2000, lr=1e-3, min_lr=1e-4,
            warmup=100, weight_decay=0.1, beta2=0.99, grad_clip=1.0, eval_interval=250,
            eval_iters=20)


def char_ids(text: str) -> tuple[np.ndarray, np.ndarray, int]:
    """nanoGPT's shakespeare_char preparation: the sorted characters of the whole text, the
    first 90% for training and the rest for validation: (train ids, val ids, vocabulary)."""
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter(map(lookup.__getitem__, text), np.int64, len(text))
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(chars)


def split_loss(model: GPT, ids: np.ndarray) -> float:
    """Mean loss over every target of `ids` once: non-overlapping windows of the context,
    each row's last id the next row's first, the last window shorter."""
    total, count, T, data = 0.0, 0, model.seq_len, torch.from_numpy(ids)
    with torch.no_grad():
        for lo in range(0, len(ids) - 1, 256 * T):
            hi = min(lo + 256 * T, len(ids) - 1)
            n = (hi - lo) // T
            if n:
                x = data[lo:lo + n * T].view(n, T)
                y = data[lo + 1:lo + n * T + 1].view(n, T)
                total += float(model(x, y)) * n * T
                count += n * T
            if lo + n * T < hi:  # the split's last, shorter window
                x = data[lo + n * T:hi][None]
                y = data[lo + n * T + 1:hi + 1][None]
                total += float(model(x, y)) * x.shape[1]
                count += x.shape[1]
    return total / count


def baby_recipe(text: str, seed: int) -> dict:
    """Train nanoGPT's baby recipe on `text`: {"val_loss" (whole split), "estimate" (its own
    last 20-batch estimate), "iters"}."""
    c = BABY
    torch.manual_seed(1337 + seed)
    train_ids, val_ids, vocab = char_ids(text)
    model = GPT(vocab, c["d"], c["layers"], c["heads"], c["context"], bias=False)
    nanogpt_init(model, c["layers"])
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": c["weight_decay"]},
                             {"params": others, "weight_decay": 0.0}],
                            lr=c["lr"], betas=(0.9, c["beta2"]))
    splits = {"train": torch.from_numpy(train_ids), "val": torch.from_numpy(val_ids)}

    def batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - c["context"], (c["batch"],))
        x = torch.stack([data[i:i + c["context"]] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + c["context"]] for i in ix])
        return x, y

    def lr_at(it):
        if it < c["warmup"]:
            return c["lr"] * (it + 1) / (c["warmup"] + 1)
        ratio = min((it - c["warmup"]) / (c["iters"] - c["warmup"]), 1.0)
        return c["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (c["lr"] - c["min_lr"])

    def estimate():
        model.eval()
        with torch.no_grad():
            out = {s: float(np.mean([float(model(*batch(s))) for _ in range(c["eval_iters"])]))
                   for s in splits}
        model.train()
        return out

    est = None
    for it in range(c["iters"] + 1):  # nanoGPT's loop runs iterations 0..max_iters
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        if it % c["eval_interval"] == 0:
            est = estimate()
        loss = model(*batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return {"val_loss": split_loss(model, val_ids), "estimate": est["val"],
            "iters": c["iters"] + 1}


def sample(vocab: int, tokens: int, seed: int) -> dict:
    """nanoGPT's sample.py loop on a `default`-shaped model: `tokens` new tokens from one, each
    by a full forward pass over the last 256; {"tokens", "seconds" (the loop alone)}."""
    torch.manual_seed(seed)
    model = GPT(vocab, 128, 4, 4, 256, bias=False).eval()
    nanogpt_init(model, 4)
    idx = torch.zeros((1, 1), dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(tokens):
            logits = model.logits(idx[:, -model.seq_len:])[:, -1, :] / 0.8
            top = torch.topk(logits, min(200, vocab)).values
            logits[logits < top[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
    return {"tokens": idx.shape[1] - 1, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="nanoGPT's baby CPU recipe; one JSON line")
    train.add_argument("--data", required=True, help="text corpus (tinyshakespeare)")
    train.add_argument("--seed", type=int, default=0, help="added to nanoGPT's seed 1337")
    gen = sub.add_parser("sample", help="nanoGPT's sampling loop; one JSON line")
    gen.add_argument("--data", required=True, help="text corpus (sets the vocabulary)")
    gen.add_argument("--tokens", type=int, default=500, help="new tokens")
    gen.add_argument("--seed", type=int, default=0, help="seed of the weights and samples")
    args = p.parse_args()
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    if args.command == "train":
        print(json.dumps(baby_recipe(text, args.seed)), flush=True)
    else:
        print(json.dumps(sample(len(set(text)), args.tokens, args.seed)), flush=True)


if __name__ == "__main__":
    main()
