"""Write tests/fixtures/gpt2-tiny/: a tiny random GPT-2 and the outputs of transformers itself.

Run by hand, not by CI (CI has neither torch nor transformers):

    pip install torch==2.13.0 && pip install transformers   # check pip keeps torch 2.13.0
    python tests/make_gpt2_fixture.py

Writes config.json and model.safetensors (save_pretrained, safe_serialization=True), a byte-level
BPE trained here (tokenizer.json, vocab.json, merges.txt) and the references tests/test_gpt2.py
compares against: reference_logits.npz (float32 logits of each prompt) and reference.json (the
prompts, their token ids and decoded text, and greedy continuations). Every weight is redrawn,
layer norms and biases included, so a dropped bias or a swapped tensor changes the logits.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = Path(__file__).parent / "fixtures" / "gpt2-tiny"
END_OF_TEXT = "<|endoftext|>"
TEXT = """The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
In 1859, Darwin wrote: "There is grandeur in this view of life"; it's still quoted today.
Naïve café owners don't mind — they serve crème brûlée at 3.14 € a slice. 日本語も少し。
    Indented code: def f(x): return x * 2  # comment
"""
PROMPTS = ["The quick brown fox", "Hello, world! It's 3.14 €.",
           f"naïve  café\n\tend{END_OF_TEXT}日本 unseen-word"]
GREEDY_PROMPTS = PROMPTS[:2]
NEW_TOKENS = 20
SEED = 0


def train_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """Byte-level BPE set up as GPT-2's, trained on TEXT."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([TEXT] * 20, trainer)
    return tokenizer


def build_model(vocab_size: int) -> transformers.GPT2LMHeadModel:
    """Random GPT-2 with non-trivial layer norms and biases, and weights large enough that
    attention is far from uniform and greedy continuations vary (seed 0: 10 and 13 distinct
    tokens in 20, top-2 gaps of 0.03 and more)."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(SEED)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            if ".ln_" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.5 * noise)
    return model


def greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """n argmax steps by full forward passes; also the smallest top-1 / top-2 logit gap."""
    ids, gap = list(ids), float("inf")
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        gap = min(gap, float(top2[0] - top2[1]))
        ids.append(int(logits.argmax()))
    return ids, gap


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(OUT / "tokenizer.json"))
    tokenizer.model.save(str(OUT))  # vocab.json, merges.txt
    model = build_model(tokenizer.get_vocab_size())
    model.save_pretrained(OUT, safe_serialization=True)
    for extra in OUT.iterdir():  # keep only what the loader reads
        if extra.name == "generation_config.json":
            extra.unlink()

    # Reference token ids: transformers' GPT-2 tokenizer, from tokenizer.json and from
    # vocab.json + merges.txt, must agree.
    hf_tok = transformers.GPT2Tokenizer.from_pretrained(OUT)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(OUT / name, tmp)
        hf_tok_files = transformers.GPT2Tokenizer.from_pretrained(tmp)
    prompt_ids = [hf_tok.encode(p) for p in PROMPTS]
    assert prompt_ids == [hf_tok_files.encode(p) for p in PROMPTS], "tokenizer paths disagree"
    decoded = [hf_tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
               for ids in prompt_ids]
    assert decoded == PROMPTS, decoded

    with torch.no_grad():
        logits = {f"prompt_{i}": model(torch.tensor([ids])).logits[0].numpy().astype(np.float32)
                  for i, ids in enumerate(prompt_ids)}
    np.savez(OUT / "reference_logits.npz", **logits)
    greedy_ids = []
    for ids in prompt_ids[:len(GREEDY_PROMPTS)]:
        full, gap = greedy(model, ids, NEW_TOKENS)
        assert gap > 1e-2, f"greedy step too close to a tie ({gap}); change SEED"
        generated = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert generated[0].tolist() == full, "generate() and the argmax loop disagree"
        greedy_ids.append(full[len(ids):])
    reference = {"transformers": transformers.__version__, "torch": torch.__version__,
                 "prompts": PROMPTS, "prompt_ids": prompt_ids, "decoded": decoded,
                 "greedy_prompts": GREEDY_PROMPTS, "greedy_new_ids": greedy_ids}
    lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in reference.items()]
    (OUT / "reference.json").write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    for path in sorted(OUT.iterdir()):
        print(f"{path.stat().st_size:>8}  {path.name}")


if __name__ == "__main__":
    main()
