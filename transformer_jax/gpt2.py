"""Pretrained GPT-2 from Hugging Face files: our `Transformer` with their weights and tokenizer.

GPT-2 is a pre-LN transformer with learned positions, tanh-approximated GELU, a fused
query/key/value projection, a final layer norm and a prediction layer tied to the token
embedding: exactly our `Transformer`, so loading is renaming tensors. Weights are read from
safetensors only (never a pickle): `model.safetensors`, or the shards that
`model.safetensors.index.json` names, in float32, float16 or bfloat16 (loaded as float32); the
tokenizer is Hugging Face `tokenizers`' byte-level BPE. Needs the `gpt2` extra:
`pip install 'transformer-jax[gpt2]'`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.bpe import BPETokenizer
from transformer_jax.config import TransformerConfig
from transformer_jax.errors import UserError
from transformer_jax.model import Transformer, layered, param_shapes

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
# What is fetched from the hub first; a sharded model's shards follow (see `_snapshot`).
HUB_FILES = ["config.json", WEIGHTS, INDEX, "tokenizer.json", "vocab.json", "merges.txt"]
# config.json's activation_function -> ours ("gelu_new" is the tanh approximation).
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                "relu": "relu"}
_REQUIRED = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")

# Every field of transformers' GPT2Config (and of older config.json files), decided once:
# read into our config by `config_from_hf` (_READ), refused unless it has a value we compute
# (_ONLY), or ignored as changing nothing we compute (_IGNORED). A field GPT2Config does not
# know changes nothing in transformers' GPT-2 either. tests/make_gpt2_fixture.py checks that
# every field of the GPT2Config it runs with is decided here.
_READ = (*_REQUIRED, "n_inner", "activation_function", "layer_norm_epsilon",
         "tie_word_embeddings", "scale_attn_by_inverse_layer_idx", "n_ctx")
_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
            "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}  # attribute_map
_ONLY = {  # field: (the values we compute, first GPT2Config's default; why no other is)
    "model_type": (("gpt2",), "only GPT-2 is read"),
    "architectures": ((None, ["GPT2LMHeadModel"], ["GPT2Model"]),
                      "only GPT-2's language model is read"),
    "auto_map": ((None,), "custom modelling code is not GPT-2"),
    "scale_attn_weights": ((True,), "attention scores are always divided by sqrt(head_dim)"),
    "add_cross_attention": ((False,), "GPT-2 here attends to its own tokens only"),
    "is_encoder_decoder": ((False,), "GPT-2 here is no encoder-decoder"),
    "pruned_heads": (({},), "every attention head is computed"),
}
_DROPOUT = "dropout is ours (TransformerConfig.dropout), training only"
_SUMMARY = "only GPT2DoubleHeadsModel's multiple-choice head reads it"
_IGNORED = {
    "attn_pdrop": _DROPOUT, "embd_pdrop": _DROPOUT, "resid_pdrop": _DROPOUT,
    **dict.fromkeys(("summary_type", "summary_use_proj", "summary_activation",
                     "summary_proj_to_labels", "summary_first_dropout", "summary_last_dropout"),
                    _SUMMARY),
    **dict.fromkeys(("id2label", "label2id", "problem_type", "classifier_dropout"),
                    "only the classification heads read it"),
    "reorder_and_upcast_attn": "changes float16 rounding only: our softmax is in float32",
    "initializer_range": "initialises new weights only",
    "gradient_checkpointing": "saves training memory only",
    "chunk_size_feed_forward": "GPT-2 does not chunk its feed-forward (chunks give the same)",
    **dict.fromkeys(("use_cache", "output_attentions", "output_hidden_states", "return_dict"),
                    "what transformers returns besides the logits"),
    **dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id", "task_specific_params"),
                    "generation settings: ours come from BPETokenizer and the sampler"),
    **dict.fromkeys(("dtype", "torch_dtype"), "the weights' storage type: each tensor is read "
                    "as its safetensors header says and converted to float32"),
    **dict.fromkeys(("transformers_version", "_name_or_path"), "bookkeeping"),
}

# Our parameter path <- Hugging Face tensor name (after any "transformer." prefix), {i} the
# block. GPT-2's Conv1D weights are stored (in, out), as our Dense kernels; None: no tensor.
TOP_KEYS = {
    ("embed", "embedding"): "wte.weight",
    ("trunk", "positions"): "wpe.weight",
    ("trunk", "ln_f", "scale"): "ln_f.weight",
    ("trunk", "ln_f", "bias"): "ln_f.bias",
    ("head", "kernel"): "lm_head.weight",  # untied only; an nn.Linear (V, D): transposed
    ("head", "bias"): None,  # GPT-2's head has no bias: zeros
}
BLOCK_KEYS = {
    ("ln1", "scale"): "h.{i}.ln_1.weight", ("ln1", "bias"): "h.{i}.ln_1.bias",
    ("attn", "qkv", "kernel"): "h.{i}.attn.c_attn.weight",
    ("attn", "qkv", "bias"): "h.{i}.attn.c_attn.bias",
    ("attn", "out", "kernel"): "h.{i}.attn.c_proj.weight",
    ("attn", "out", "bias"): "h.{i}.attn.c_proj.bias",
    ("ln2", "scale"): "h.{i}.ln_2.weight", ("ln2", "bias"): "h.{i}.ln_2.bias",
    ("mlp", "up", "kernel"): "h.{i}.mlp.c_fc.weight", ("mlp", "up", "bias"): "h.{i}.mlp.c_fc.bias",
    ("mlp", "down", "kernel"): "h.{i}.mlp.c_proj.weight",
    ("mlp", "down", "bias"): "h.{i}.mlp.c_proj.bias",
}
TRANSPOSED = {"lm_head.weight"}
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers, not weights


def need(module: str, doing: str = "loading GPT-2"):
    """Import an optional dependency of the `gpt2` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{doing} needs {module.split('.')[0]}: "
                        "pip install 'transformer-jax[gpt2]'") from None


def config_from_hf(hf: dict, source: str = "config.json") -> TransformerConfig:
    """Our model configuration from a GPT-2 `config.json`, refusing what we cannot compute."""
    if not isinstance(hf, dict):
        raise UserError(f"{source}: must hold a JSON object")
    hf = dict(hf)
    for alias, name in _ALIASES.items():
        if alias in hf and hf.setdefault(name, hf[alias]) != hf[alias]:
            raise UserError(f"{source}: {alias}={hf[alias]} contradicts {name}={hf[name]}")
    for name, (values, reason) in _ONLY.items():
        if hf.get(name, values[0]) not in values:
            raise UserError(f"{source}: {name}={json.dumps(hf[name])} is not supported: {reason}")
    missing = [name for name in _REQUIRED if name not in hf]
    if missing:
        raise UserError(f"{source}: missing field(s) {', '.join(missing)}")
    # Old transformers attended within n_ctx tokens (its causal mask's size), newer ones
    # within n_positions: the two must agree.
    if hf.get("n_ctx", hf["n_positions"]) != hf["n_positions"]:
        raise UserError(f"{source}: n_ctx={hf['n_ctx']} differs from n_positions="
                        f"{hf['n_positions']}, which is not supported")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise UserError(f"{source}: activation_function={json.dumps(activation)} is not "
                        f"supported (supported: {', '.join(_ACTIVATIONS)})")
    flags = {name: hf.get(name, default) for name, default in (
        ("tie_word_embeddings", True), ("scale_attn_by_inverse_layer_idx", False))}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise UserError(f"{source}: {name}={json.dumps(value)} must be true or false")
    n_inner = hf.get("n_inner")
    try:
        return TransformerConfig(
            vocab_size=hf["vocab_size"], d_model=hf["n_embd"], layers=hf["n_layer"],
            heads=hf["n_head"], d_ff=4 * hf["n_embd"] if n_inner is None else n_inner,
            activation=_ACTIVATIONS[activation], norm="pre", positions="learned",
            max_len=hf["n_positions"], tie_embeddings=flags["tie_word_embeddings"],
            attn_scale_by_layer=flags["scale_attn_by_inverse_layer_idx"], dropout=0.0,
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}") from None


def params_from_state_dict(tensors: dict[str, np.ndarray], config: TransformerConfig,
                           source: str = "the checkpoint") -> dict:
    """Our float32 parameter tree from GPT-2's tensors (names with or without `transformer.`).

    Raises:
      UserError naming the tensor that is missing, unexpected or of the wrong shape.
    """
    tensors = {name.removeprefix("transformer."): value for name, value in tensors.items()}
    tensors = {name: value for name, value in tensors.items() if not _BUFFERS.fullmatch(name)}
    key_map = {**TOP_KEYS, **{("trunk", f"block_{i}", *path): name.format(i=i)
                               for i in range(config.layers) for path, name in BLOCK_KEYS.items()}}
    unrolled = dataclasses.replace(config, scan_layers=False)  # the map names block_{i}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(unrolled))

    def load(path, leaf):
        name = key_map[tuple(k.key for k in path)]
        if name is None:
            return jnp.zeros(leaf.shape, jnp.float32)
        if name not in tensors:
            raise UserError(f"{source}: missing tensor {name!r}")
        value = np.asarray(tensors.pop(name))
        want = leaf.shape[::-1] if name in TRANSPOSED else leaf.shape
        if value.shape != want:
            raise UserError(f"{source}: tensor {name!r} has shape {value.shape}, expected {want}")
        return jnp.asarray(value.T if name in TRANSPOSED else value, jnp.float32)

    params = treedef.unflatten([load(path, leaf) for path, leaf in leaves])
    head = tensors.pop("lm_head.weight", None)  # tied: a saved copy of wte is fine
    if head is not None and not np.array_equal(head, params["embed"]["embedding"]):
        raise UserError(f"{source}: lm_head.weight differs from wte.weight but "
                        "tie_word_embeddings is true")
    if tensors:
        raise UserError(f"{source}: unexpected tensor(s) {', '.join(sorted(tensors))}")
    return layered(params, config.scan_layers)


def _shard_map(index: Path) -> dict[str, str]:
    """The `weight_map` of a `model.safetensors.index.json`: tensor name -> shard file name (a
    safetensors file beside the index)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{index}: cannot read it as JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(shard, str) for shard in weight_map.values())):
        raise UserError(f"{index}: needs a non-empty \"weight_map\" object of tensor names to "
                        "shard file names")
    for shard in sorted(set(weight_map.values())):
        if not shard.endswith(".safetensors") or Path(shard).name != shard:
            raise UserError(f"{index}: names the shard {shard!r}, but only safetensors files "
                            "beside the index are read (never a pickle such as a .bin: "
                            "unpickling can run arbitrary code)")
    return weight_map


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The files that hold a GPT-2's weights (to read, or to hash): `model.safetensors`, else
    `model.safetensors.index.json` followed by the shards it names, sorted.

    Raises:
      UserError naming the file that is missing or malformed; pickled weights are refused.
    """
    directory = Path(directory)
    index = directory / INDEX
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    if index.is_file():
        shards = [directory / shard for shard in sorted(set(_shard_map(index).values()))]
        for shard in shards:
            if not shard.is_file():
                raise UserError(f"{shard} does not exist: {index} names it as a shard")
        return [index, *shards]
    pickled = [name for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")
               if (directory / name).is_file()]
    if pickled:
        raise UserError(
            f"{directory} has {pickled[0]} but no model.safetensors; pickled weights are "
            "refused (unpickling can run arbitrary code): in a trusted environment, convert "
            "them with transformers: GPT2LMHeadModel.from_pretrained(DIR).save_pretrained("
            "DIR, safe_serialization=True)")
    raise UserError(f"{directory} has no model.safetensors (nor {INDEX}; only safetensors "
                    "weights are read)")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as float32 whatever its stored type (float16 and
    bfloat16 included: numpy holds the latter through ml_dtypes)."""
    safetensors = need("safetensors")
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            return {name: f.get_tensor(name).astype(np.float32, copy=False) for name in f.keys()}
    except (OSError, safetensors.SafetensorError) as e:
        raise UserError(f"{path}: cannot read it as safetensors ({e})") from None


def read_weights(files: list[Path]) -> dict[str, np.ndarray]:
    """The float32 tensors, by name, of `weight_files`: one file, or an index and its shards,
    each shard holding exactly the tensors the index names for it."""
    if len(files) == 1:
        return _read_safetensors(files[0])
    index, shards, tensors = files[0], files[1:], {}
    promised = {shard.name: set() for shard in shards}
    for name, shard in _shard_map(index).items():
        promised[shard].add(name)
    for shard in shards:
        held = _read_safetensors(shard)
        missing, extra = promised[shard.name] - held.keys(), held.keys() - promised[shard.name]
        if missing:
            raise UserError(f"{shard}: lacks tensor(s) {', '.join(sorted(missing))} that "
                            f"{index.name} places in it")
        if extra:
            raise UserError(f"{shard}: holds tensor(s) {', '.join(sorted(extra))} that "
                            f"{index.name} does not place in it")
        tensors.update(held)
    return tensors


def _download(repo_id: str, patterns: list[str], revision: str | None = None) -> Path:
    """The snapshot of a hub repository in the Hugging Face cache, with the files matching
    `patterns` fetched if need be."""
    hub, errors = need("huggingface_hub"), need("huggingface_hub.errors")
    try:
        return Path(hub.snapshot_download(repo_id, allow_patterns=patterns, revision=revision))
    except errors.HFValidationError:
        raise UserError(f"{repo_id!r} is neither a directory nor a Hugging Face hub name") from None
    except errors.LocalEntryNotFoundError:
        raise UserError(f"{repo_id!r} is no local directory and cannot be downloaded: the Hugging "
                        "Face hub is unreachable (offline?) and it is not in the cache; pass a "
                        "directory with config.json and model.safetensors instead") from None
    except (errors.HfHubHTTPError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot download {repo_id!r} from the Hugging Face hub: {first}"
                        ) from None


def _snapshot(repo_id: str) -> Path:
    """The hub repository's files that we read, in the Hugging Face cache (fetched if need be):
    HUB_FILES, then, for a sharded model, every shard its index names (of the same revision:
    the snapshot directory is named by its commit)."""
    directory = _download(repo_id, HUB_FILES)
    if (directory / INDEX).is_file() and not (directory / WEIGHTS).is_file():
        shards = sorted(set(_shard_map(directory / INDEX).values()))
        directory = _download(repo_id, shards, revision=directory.name)
    return directory


def locate(name_or_path: str | os.PathLike) -> Path:
    """The directory of a GPT-2: a local path as it is, a hub name in the Hugging Face cache
    (downloaded first if need be)."""
    local = Path(name_or_path).expanduser()
    directory = local if local.exists() else _snapshot(str(name_or_path))
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    return directory


def from_pretrained(name_or_path: str | os.PathLike) -> tuple[Transformer, dict, BPETokenizer]:
    """GPT-2 from a local directory in Hugging Face layout or a hub name (`gpt2`, `gpt2-medium`).

    The directory needs config.json, model.safetensors (or model.safetensors.index.json and
    the shards it names) and tokenizer.json (or vocab.json and merges.txt).

    Returns:
      (model, params, tokenizer): `model.apply({"params": params}, ids_BxT)` gives float32
      logits (B, T, V); `tokenizer.encode(str) -> list[int]`, `tokenizer.decode(ids) -> str`.
    """
    directory = locate(name_or_path)
    config_path = directory / "config.json"
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{config_path} does not exist: {directory} is no GPT-2 in Hugging "
                        "Face layout (config.json, model.safetensors, tokenizer.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path}: cannot read it as JSON ({e})") from None
    config = config_from_hf(hf, str(config_path))
    files = weight_files(directory)
    params = params_from_state_dict(read_weights(files), config, str(files[0]))
    return Transformer(config), params, BPETokenizer.from_dir(directory)
