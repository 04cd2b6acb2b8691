"""A trained text run as a GPT-2 in Hugging Face's layout, for `transformers` to load.

    DIR/config.json              GPT2Config (model_type gpt2, GPT2LMHeadModel)
    DIR/model.safetensors        float32 tensors under GPT-2's names
    DIR/generation_config.json   bos/eos/pad ids and the ids `generate` must never draw
    DIR/tokenizer.json, tokenizer_config.json (and a GPT-2's vocab.json, merges.txt)

so that `GPT2LMHeadModel.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` give the
run's model and tokenizer. A transfer run's prediction layer over the corpus's tokens becomes an
untied `lm_head` over GPT-2's whole vocabulary whose other rows are zero, those ids listed in
`suppress_tokens` (our sampler gives them a logit of -1e9; Hugging Face's `generate` masks
them). A character model is exported when its architecture is GPT-2's: pre-LN, learned
positions, tanh-approximated GELU, a prediction layer tied to the embedding. Its tokenizer is a
`tokenizers` word-level model over single characters with the run's four special symbols, which
encodes every text to our ids. Series runs are no text models and are refused.

Needs `tokenizers` and `safetensors` (the `gpt2` extra); `transformers` itself is not needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from transformer_jax import gpt2, run
from transformer_jax.bpe import END_OF_TEXT
from transformer_jax.checkpoint import RunCheckpoints
from transformer_jax.config import TransformerConfig
from transformer_jax.errors import UserError
from transformer_jax.gpt2 import BLOCK_KEYS, TOP_KEYS, TRANSPOSED
from transformer_jax.model import layered
from transformer_jax.tokenizer import CharTokenizer

FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "vocab.json", "merges.txt")
# Our activation -> config.json's (GPT-2's own is "gelu_new"; a base model may use another).
_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def _need(module: str):
    return gpt2.need(module, "exporting")


def differences(config: TransformerConfig) -> list[str]:
    """What keeps a character model of `config` from being a GPT-2, one flag each (empty: it
    is one). dtype, dropout, remat and scan_layers change how it computes, not what."""
    out = []
    if config.norm != "pre":
        out.append(f"--norm {config.norm} (GPT-2 is pre-LN: --norm pre)")
    if config.positions != "learned":
        out.append(f"--positions {config.positions} (GPT-2 learns its positions: "
                   "--positions learned)")
    if config.activation != "gelu_tanh":
        out.append(f"--activation {config.activation} (GPT-2's is the tanh-approximated GELU: "
                   "--activation gelu_tanh)")
    if not config.tie_embeddings:
        out.append("--no-tie-embeddings (GPT-2's prediction layer is its token embedding: "
                   "--tie-embeddings)")
    return out


def _name_map(layers: int) -> dict[tuple[str, ...], str | None]:
    """Our parameter path -> GPT-2 tensor name (gpt2.py's maps, every block spelled out)."""
    return {**TOP_KEYS, **{("trunk", f"block_{i}", *path): name.format(i=i)
                            for i in range(layers) for path, name in BLOCK_KEYS.items()}}


def state_dict(config: TransformerConfig, params: dict, where: str,
               targets=None) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's float32 tensors (`transformer.` names and `lm_head.weight`) of our
    parameters (`params` of a model of `config`, either layer layout).

    An untied head over the whole vocabulary (a transfer run's, as `tasks.load` returns it:
    zero columns and a -1e9 bias outside `targets`) becomes `lm_head.weight`, its kernel
    transposed. GPT-2's lm_head has no bias, so the bias of every id in `targets` (None: every
    id) must be zero; UserError naming `where` otherwise.
    """
    import jax

    flat = jax.tree_util.tree_flatten_with_path(layered(params, False))[0]
    names = _name_map(config.layers)
    tensors = {}
    for path, leaf in flat:
        key = tuple(k.key for k in path)
        value = np.asarray(leaf, np.float32)
        if key == ("head", "bias"):
            used = value if targets is None else value[np.asarray(targets)]
            if np.any(used != 0):
                raise UserError(f"{where} has a prediction layer with a bias (largest "
                                f"{float(np.abs(used).max()):.3g}); GPT-2's lm_head has no "
                                "bias, so it cannot be exported: train the run again with the "
                                "current version, whose head is bias-free")
            continue
        if key not in names:
            raise UserError(f"{where}: its parameter {'/'.join(key)} has no GPT-2 tensor")
        name = names[key]
        transposed = name in TRANSPOSED
        tensors[name if transposed else f"transformer.{name}"] = np.ascontiguousarray(
            value.T if transposed else value)
    return tensors


def hf_config(config: TransformerConfig, start_id: int, end_id: int, pad_id: int) -> dict:
    """GPT2Config's fields (config.json) of a model of `config`."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.max_len,
        "n_embd": config.d_model, "n_layer": config.layers, "n_head": config.heads,
        "n_inner": config.d_ff, "activation_function": _ACTIVATIONS[config.activation],
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": config.attn_scale_by_layer,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": start_id, "eos_token_id": end_id, "pad_token_id": pad_id,
        "dtype": "float32", "use_cache": True,
    }


def generation_config(start_id: int, end_id: int, pad_id: int, suppress: list[int]) -> dict:
    """generation_config.json: the special ids, and the ids never to draw (if any)."""
    out = {"bos_token_id": start_id, "eos_token_id": end_id, "pad_token_id": pad_id}
    return {**out, "suppress_tokens": suppress} if suppress else out


def char_tokenizer(tokenizer: CharTokenizer, add_start: bool):
    """A `tokenizers.Tokenizer` that encodes every text to `tokenizer`'s ids: one word-level
    token per character, anything else (a special symbol typed in the text too) unknown, and
    decodes ids to their characters, joined. `add_start`: encoding with special tokens puts the
    start symbol first (a model trained with stream batching saw one before every text)."""
    tk = _need("tokenizers")
    vocab = {c: i for i, c in enumerate(tokenizer.chars + tokenizer.specials)}
    out = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token=tokenizer.unknown))
    # Typed special symbols are characters, not symbols: read as unknown, as our encode does
    # (the tokenizer config's split_special_tokens keeps them from matching as special tokens).
    out.normalizer = tk.normalizers.Sequence([
        tk.normalizers.Replace(s, tokenizer.unknown)
        for s in (tokenizer.start, tokenizer.end, tokenizer.pad)])
    out.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
    out.decoder = tk.decoders.Fuse()
    out.add_special_tokens([tk.AddedToken(s, special=True, normalized=False)
                            for s in tokenizer.specials])
    if add_start:
        out.post_processor = _start_template(tk, tokenizer.start, tokenizer.start_id)
    return out


def _start_template(tk, symbol: str, start_id: int):
    return tk.processors.TemplateProcessing(single=f"{symbol} $A", pair=f"{symbol} $A $B",
                                            special_tokens=[(symbol, start_id)])


def _bpe_tokenizer(base: Path, add_start: bool):
    """The base GPT-2's `tokenizers.Tokenizer` (as `bpe.BPETokenizer.from_dir` reads it), with
    the start symbol put first when `add_start`."""
    tk = _need("tokenizers")
    if (base / "tokenizer.json").is_file():
        out = tk.Tokenizer.from_file(str(base / "tokenizer.json"))
    else:
        out = tk.Tokenizer(tk.models.BPE.from_file(str(base / "vocab.json"),
                                                   str(base / "merges.txt")))
        out.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        out.decoder = tk.decoders.ByteLevel()
        out.add_special_tokens([END_OF_TEXT])
    if add_start:
        start = out.token_to_id(END_OF_TEXT)
        template = _start_template(tk, END_OF_TEXT, start)
        out.post_processor = (template if out.post_processor is None else
                              tk.processors.Sequence([out.post_processor, template]))
    return out


def _tokenizer_config(tokenizer, max_len: int, char: bool) -> dict:
    """tokenizer_config.json: the class AutoTokenizer builds and the special symbols."""
    if char:
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.start,
                "eos_token": tokenizer.end, "unk_token": tokenizer.unknown,
                "pad_token": tokenizer.pad, "split_special_tokens": True,
                "clean_up_tokenization_spaces": False, "model_max_length": max_len}
    return {"tokenizer_class": "GPT2Tokenizer", "bos_token": END_OF_TEXT,
            "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False,
            "model_max_length": max_len}


def _base_dir(run_dir: Path, step: int) -> Path:
    """The directory of a transfer run's base GPT-2, as its checkpoint `step` records it."""
    ckpt = RunCheckpoints(run_dir, read_only=True)
    try:
        return gpt2.locate(ckpt.meta(step)["base"]["model"])
    finally:
        ckpt.close()


def files(trained, run_dir: str | Path) -> dict[str, bytes | dict | np.ndarray]:
    """The export of `trained` (a `run.load_for_sampling` model of `run_dir`): file name ->
    JSON object, bytes, or, for model.safetensors, the tensors.

    Raises:
      UserError: a series run, a character model whose architecture is not GPT-2's (each
        difference named), or a prediction layer with a bias.
    """
    run_dir = Path(run_dir)
    where = f"run directory {run_dir}"
    if trained.tokenizer is None:
        raise UserError(f"{where} holds a series model; only text models export to Hugging "
                        "Face's GPT-2 layout")
    cfg, tok = trained.config.model, trained.tokenizer
    char = isinstance(tok, CharTokenizer)
    if char and differences(cfg):
        raise UserError(f"{where} holds a character model whose architecture is not GPT-2's: "
                        + "; ".join(differences(cfg)))
    add_start = trained.config.train.batching == "stream"
    if char:
        pad = tok.pad_id
        backend = char_tokenizer(tok, add_start)
        copies = {}
    else:
        pad = tok.end_id  # ours lies past the vocabulary; GPT-2's convention is <|endoftext|>
        base = _base_dir(run_dir, trained.step)
        backend = _bpe_tokenizer(base, add_start)
        copies = {name: (base / name).read_bytes() for name in ("vocab.json", "merges.txt")
                  if (base / name).is_file()}
    targets = None if trained.targets is None else np.asarray(trained.targets)
    suppress = ([] if targets is None else
                np.setdiff1d(np.arange(cfg.vocab_size), targets).tolist())
    ids = (tok.start_id, tok.end_id, pad)
    return {
        "config.json": hf_config(cfg, *ids),
        "generation_config.json": generation_config(*ids, suppress),
        "model.safetensors": state_dict(cfg, trained.params, where, targets),
        "tokenizer.json": backend.to_str(pretty=True).encode("utf-8"),
        "tokenizer_config.json": _tokenizer_config(tok, cfg.max_len, char),
        **copies,
    }


def _check_out(out: Path, force: bool) -> None:
    """Refuse an `out` that is a file, or a non-empty directory unless `force` and it holds
    only an earlier export's files (never another program's)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is not a directory; choose another --out")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        raise UserError(f"--out {out} is not empty; choose another --out, or give --force to "
                        "replace the export in it")
    foreign = [name for name in entries if name not in FILES or not (out / name).is_file()]
    if foreign:
        raise UserError(f"--out {out} holds {foreign[0]!r}, which is no file of an export; "
                        "--force replaces only an earlier export: choose another --out")


def write(contents: dict, out: str | Path, force: bool = False) -> Path:
    """Write `files(...)` into the directory `out` all at once: into a temporary sibling,
    renamed to `out` when complete, so that `out` never holds half an export."""
    out = Path(out)
    _check_out(out, force)
    safetensors = _need("safetensors.numpy")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.export-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror})") from None
    try:
        for name, value in contents.items():
            path = tmp / name
            if name == "model.safetensors":
                safetensors.save_file(value, str(path), metadata={"format": "pt"})
            elif isinstance(value, bytes):
                path.write_bytes(value)
            else:
                path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export(run_dir: str | Path, out: str | Path, step: int | str | None = None,
           force: bool = False) -> Path:
    """Export checkpoint `step` of `run_dir` (default: the newest; "best": the kept best) to
    the directory `out` (see the module's docstring); returns `out`."""
    _check_out(Path(out), force)  # before the model is loaded
    trained = run.load_for_sampling(run_dir, step)
    return write(files(trained, run_dir), out, force)


__all__ = ["FILES", "char_tokenizer", "differences", "export", "files", "generation_config",
           "hf_config", "state_dict", "write"]
