"""Write tests/fixtures/gpt2-tiny*/: tiny random GPT-2s and the outputs of transformers itself.

Run by hand, not by CI (CI has neither torch nor transformers), in the project's environment:

    pip install torch==2.13.0 && pip install transformers   # check pip keeps torch 2.13.0
    python tests/make_gpt2_fixture.py

Writes to gpt2-tiny/ config.json and model.safetensors (save_pretrained, safe_serialization=True),
a byte-level BPE trained here (tokenizer.json, vocab.json, merges.txt) and the references
tests/test_gpt2.py compares against: reference_logits.npz (float32 logits of each prompt) and
reference.json (the prompts, their token ids and decoded text, and greedy continuations). Every
weight is redrawn, layer norms and biases included, so a dropped bias or a swapped tensor changes
the logits.

Then the checkpoint variants, of a smaller GPT-2 (SMALL) with the same vocabulary, each with
vocab.json, merges.txt and the float32 logits transformers computes from what was saved
(reference_logits.npz, of PROMPTS[VARIANT_PROMPT]): gpt2-tiny-sharded/ (shards and
model.safetensors.index.json), gpt2-tiny-fp16/ and gpt2-tiny-bf16/ (the same weights stored in
float16 and bfloat16) and gpt2-tiny-layerscale/ (scale_attn_by_inverse_layer_idx=true). It also
checks that transformer_jax.gpt2 decides every field of this transformers' GPT2Config.
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

from transformer_jax import gpt2

FIXTURES = Path(__file__).parent / "fixtures"
OUT = FIXTURES / "gpt2-tiny"
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
TINY = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
SMALL = dict(n_embd=16, n_layer=2, n_head=2, n_positions=32)  # the variants: tens of KB each
VARIANT_PROMPT = 1
SHARD_BYTES = 20_000  # SMALL's 54 kB of float32 weights in 3 shards


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


def build_model(vocab_size: int, **shape) -> transformers.GPT2LMHeadModel:
    """Random GPT-2 (`shape`: GPT2Config fields, by default TINY) with non-trivial layer norms
    and biases, and weights large enough that attention is far from uniform and greedy
    continuations vary (TINY, seed 0: 10 and 13 distinct tokens in 20, top-2 gaps of 0.03 and
    more)."""
    config = transformers.GPT2Config(**(shape or TINY), vocab_size=vocab_size, bos_token_id=0,
                                     eos_token_id=0)
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


def save(model, out: Path, **options) -> None:
    """save_pretrained as safetensors, keeping only what the loader reads."""
    model.save_pretrained(out, safe_serialization=True, **options)
    (out / "generation_config.json").unlink(missing_ok=True)


def write_variant(name: str, model, prompt_ids: list[int], **options) -> None:
    """FIXTURES/name: `model` saved with `options`, the tokenizer's small files, and the float32
    logits transformers computes from the saved files."""
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    for small in ("vocab.json", "merges.txt"):
        shutil.copy(OUT / small, out)
    save(model, out, **options)
    saved = transformers.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = saved(torch.tensor([prompt_ids])).logits[0].numpy().astype(np.float32)
    np.savez(out / "reference_logits.npz", **{f"prompt_{VARIANT_PROMPT}": logits})


def write_variants(vocab_size: int, prompt_ids: list[int]) -> None:
    small = lambda **changes: build_model(vocab_size, **SMALL, **changes)
    write_variant("gpt2-tiny-sharded", small(), prompt_ids, max_shard_size=SHARD_BYTES)
    index = json.loads((FIXTURES / "gpt2-tiny-sharded" / gpt2.INDEX).read_text())
    assert len(set(index["weight_map"].values())) >= 2, "one shard only: lower SHARD_BYTES"
    write_variant("gpt2-tiny-fp16", small().to(torch.float16), prompt_ids)
    write_variant("gpt2-tiny-bf16", small().to(torch.bfloat16), prompt_ids)
    write_variant("gpt2-tiny-layerscale", small(scale_attn_by_inverse_layer_idx=True), prompt_ids)
    scaled = np.load(FIXTURES / "gpt2-tiny-layerscale" / "reference_logits.npz")
    plain = np.load(FIXTURES / "gpt2-tiny-sharded" / "reference_logits.npz")
    key = f"prompt_{VARIANT_PROMPT}"
    assert np.abs(scaled[key] - plain[key]).max() > 0.1, "the layer scaling hardly matters"


def check_decisions() -> None:
    """transformer_jax.gpt2 reads, refuses or ignores every field of GPT2Config."""
    decided = {*gpt2._READ, *gpt2._ALIASES, *gpt2._ONLY, *gpt2._IGNORED}
    undecided = set(transformers.GPT2Config().to_dict()) - decided
    assert not undecided, f"decide in transformer_jax/gpt2.py: {sorted(undecided)}"


def main() -> None:
    check_decisions()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(OUT / "tokenizer.json"))
    tokenizer.model.save(str(OUT))  # vocab.json, merges.txt
    model = build_model(tokenizer.get_vocab_size())
    save(model, OUT)

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
    write_variants(tokenizer.get_vocab_size(), prompt_ids[VARIANT_PROMPT])
    for path in sorted(FIXTURES.glob("gpt2-tiny*/*")):
        print(f"{path.stat().st_size:>8}  {path.relative_to(FIXTURES)}")


if __name__ == "__main__":
    main()
