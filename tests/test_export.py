"""Tests for export.py: trained runs written in Hugging Face's GPT-2 layout, read back by the real
`transformers` (a test dependency, with torch's CPU build).

References: our own model of the same checkpoint (logits over the tokens it predicts, within
1e-4) and `sample.py --temperature 0` (Hugging Face's greedy `generate` writes the same text).
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from transformer_jax import cli, export, run
from transformer_jax.config import preset
from transformer_jax.model import Transformer

REPO = Path(__file__).resolve().parents[1]
GPT2 = REPO / "tests" / "fixtures" / "gpt2-tiny"
RUNS = REPO / "tests" / "fixtures" / "runs"
PROMPT = "the market price of"
WORDS = "the market economics science dismal money price trade labour capital value of".split()


def corpus(n: int = 40, seed: int = 0) -> str:
    rnd = random.Random(seed)
    return "".join(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 30))) + ".\n"
                   for _ in range(n))


def train(run_dir: Path, **changes) -> Path:
    run.train(preset("default").replace(**{
        **dict(optimizer="adamw", seq_len=24, batch_size=4, steps=10, lr=1e-2, warmup_steps=0,
               decay_steps=0, weight_decay=0.0, eval_every=10, save_every=10, steps_per_call=5),
        **changes}), corpus(), run_dir, quiet=True, devices=jax.devices()[:1])
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A head-only, a LoRA and a full fine-tune of the tiny GPT-2, and a character model of
    GPT-2's architecture trained with stream batching (so its prompts start with the start
    symbol)."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "head": train(root / "head", init=str(GPT2), finetune="head"),
        "lora": train(root / "lora", init=str(GPT2), finetune="lora", lora_targets="qkv,up"),
        "full": train(root / "full", init=str(GPT2), finetune="full", lr=1e-3),
        "char": train(root / "char", d_model=16, layers=2, heads=2, d_ff=32, max_len=48,
                      norm="pre", positions="learned", activation="gelu_tanh",
                      batching="stream", streams=4, seq_len=40, steps=20, eval_every=20,
                      save_every=20),
    }


def greedy_text(out: Path, prompt: str, new: int) -> tuple[list[int], str]:
    """Hugging Face's tokens of `prompt` and the text its greedy `generate` continues with."""
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        made = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                              max_new_tokens=new, do_sample=False)
    return ids, tok.decode(made[0, len(ids):], skip_special_tokens=True)


def check_export(run_dir: Path, out: Path, capsys, new: int = 30) -> float:
    """Export `run_dir` with export.py, load it with transformers, compare; returns the largest
    logit difference."""
    cli.export_main(["--run-dir", str(run_dir), "--out", str(out)])
    assert "exported to" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        n for n in export.FILES if (out / n).exists())
    trained = run.load_for_sampling(run_dir)
    add_start = trained.config.train.batching == "stream"
    ids, text = greedy_text(out, PROMPT, new)
    assert ids == list(map(int, trained.tokenizer.encode(PROMPT, add_start=add_start)))

    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(Transformer(trained.config.model).apply({"params": trained.params},
                                                              jnp.asarray([ids])))
    used = (np.arange(trained.config.model.vocab_size) if trained.targets is None
            else np.asarray(trained.targets))
    diff = float(np.abs(ours[..., used] - theirs[..., used]).max())
    with capsys.disabled():
        print(f" [{run_dir.name}: largest logit difference over {len(used)} tokens: {diff:.2e}]",
              end="")
    assert diff <= 1e-4

    cli.sample_main(["--run-dir", str(run_dir), "--prompt", PROMPT, "--max-new-tokens",
                     str(new), "--temperature", "0"])
    sampled = capsys.readouterr().out
    assert sampled == PROMPT + text + "\n"
    assert len(text) > 0
    return diff


@pytest.mark.parametrize("finetune", ["head", "lora", "full"])
def test_transfer_run_exports_to_a_gpt2_that_transformers_loads(runs, tmp_path, capsys,
                                                                 finetune):
    out = tmp_path / "hf"
    check_export(runs[finetune], out, capsys)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out)
    trained = run.load_for_sampling(runs[finetune])
    assert not hf.config.tie_word_embeddings
    unused = np.setdiff1d(np.arange(hf.config.vocab_size), trained.targets)
    assert hf.generation_config.suppress_tokens == unused.tolist()
    weight = hf.lm_head.weight.detach().numpy()
    assert not weight[unused].any() and weight[trained.targets].any()
    # the trunk: the base's for a head-only run, LoRA's merged into what it adapts (qkv, up)
    base = transformers.GPT2LMHeadModel.from_pretrained(GPT2).state_dict()
    changed = {name for name, w in hf.state_dict().items()
               if name.startswith("transformer.") and not torch.equal(w, base[name])}
    block = {"head": set(), "lora": {"attn.c_attn.weight", "mlp.c_fc.weight"}}.get(finetune)
    if block is not None:
        assert changed == {f"transformer.h.{i}.{n}" for i in range(2) for n in block}
    else:
        assert "transformer.wte.weight" in changed and "transformer.h.1.mlp.c_proj.bias" in changed
    # the base model's tokenizer, as it is: a prompt encodes as our BPE does
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "They say economics is the dismal science <|endoftext|> ok"
    assert tok.encode(text) == trained.tokenizer.encode(text)
    # --force replaces the earlier export
    cli.export_main(["--run-dir", str(runs[finetune]), "--out", str(out), "--force"])
    assert transformers.GPT2LMHeadModel.from_pretrained(out) is not None
    assert not list(tmp_path.glob(".hf.*"))  # no temporary directory left beside it


def test_character_model_of_gpt2_architecture_exports(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    check_export(runs["char"], out, capsys, new=20)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert hf.config.tie_word_embeddings and not hf.generation_config.suppress_tokens
    # every text encodes to our ids: unseen characters and typed special symbols are unknown
    tok = transformers.AutoTokenizer.from_pretrained(out)
    chars = run.load_for_sampling(runs["char"]).tokenizer
    text = f"the price\n\tof Z {chars.start}{chars.end}{chars.unknown}{chars.pad} é 𝄞."
    assert tok.encode(text, add_special_tokens=False) == chars.encode(text).tolist()
    assert tok(text)["input_ids"] == chars.encode(text, add_start=True).tolist()
    ids = chars.encode("the market.", add_start=True, add_end=True)
    assert tok.decode(ids) == chars.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == "the market."
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (
        chars.start_id, chars.end_id, chars.unknown_id, chars.pad_id)


def test_the_architecture_that_is_not_gpt2s_is_named():
    cfg = preset("lecture").model
    found = export.differences(cfg)
    assert [d.split()[0:2] for d in found] == [["--norm", "post"], ["--positions", "sinusoidal"],
                                               ["--activation", "relu"]]
    gpt2_like = dataclasses.replace(cfg, norm="pre", positions="learned", activation="gelu_tanh")
    assert export.differences(gpt2_like) == []
    untied = dataclasses.replace(gpt2_like, tie_embeddings=False)
    assert export.differences(untied) == [export.differences(untied)[0]]
    assert "--no-tie-embeddings" in export.differences(untied)[0]


def error_line(capsys, argv: list[str]) -> str:
    """The one line export.py prints on stderr when it refuses `argv` (exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.export_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


@pytest.mark.parametrize("name,says", [
    ("series", "holds a series model"),
    ("char", "--activation gelu (GPT-2's is the tanh-approximated GELU"),
])
def test_runs_that_are_no_gpt2_are_refused(tmp_path, capsys, name, says):
    out = tmp_path / "hf"
    assert says in error_line(capsys, ["--run-dir", str(RUNS / name), "--out", str(out)])
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_py_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "export.py", "--run-dir", str(RUNS / "series"), "--out",
                           str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "holds a series model" in proc.stderr


def test_a_non_empty_out_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["--run-dir", str(runs["char"]), "--out", str(out)]
    assert "is not empty" in error_line(capsys, argv)
    assert "no file of an export" in error_line(capsys, [*argv, "--force"])
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_head_with_a_bias_is_refused(runs, tmp_path, capsys, monkeypatch):
    """A run of an older version, whose transfer head trained a bias, is refused."""
    load = run.load_for_sampling

    def biased(*a, **k):
        trained = load(*a, **k)
        head = {**trained.params["head"],
                "bias": trained.params["head"]["bias"].at[trained.targets[0]].set(0.5)}
        return dataclasses.replace(trained, params={**trained.params, "head": head})

    monkeypatch.setattr(run, "load_for_sampling", biased)
    out = tmp_path / "hf"
    err = error_line(capsys, ["--run-dir", str(runs["head"]), "--out", str(out)])
    assert f"run directory {runs['head']}" in err and "GPT-2's lm_head has no bias" in err
    assert not out.exists()
