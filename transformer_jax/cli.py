"""Command lines: flags -> config -> library calls. Bad input ends in one line and exit code 2.

Every config field has a flag built from its dataclass metadata, so help and config stay in step.
Precedence: preset, then --config file, then explicit flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

from transformer_jax import config as config_lib
from transformer_jax.errors import RunStopped, UserError

_CHOICES = {"activation": config_lib.ACTIVATIONS, "norm": config_lib.NORMS,
            "positions": config_lib.POSITIONS, "dtype": config_lib.DTYPES,
            "batching": config_lib.BATCHINGS, "on_nan": config_lib.ON_NAN,
            "finetune": config_lib.FINETUNES}
# Model flags that a pretrained --init still takes (its config.json fixes the others).
_PRETRAINED_MODEL_FLAGS = ("dropout", "dtype")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, False) that would only add noise."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_field_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (`d_model` -> `--d-model`); unset flags are absent."""
    sections = (("model", config_lib.MODEL_FIELDS), ("training", config_lib.TRAIN_FIELDS))
    for title, fields in sections:
        group = parser.add_argument_group(f"{title} (override the preset and --config)")
        for name, f in fields.items():
            if not f.metadata.get("flag", True):
                continue
            kind = config_lib.FIELD_TYPES[name]
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            flag = "--" + name.replace("_", "-")
            if base is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=f.metadata["help"])
            else:
                group.add_argument(flag, type=base, choices=_CHOICES.get(name),
                                   default=argparse.SUPPRESS, metavar=None if name in _CHOICES
                                   else base.__name__.upper(), help=f.metadata["help"])


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--config {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: must hold a JSON object of config fields")
    try:
        config_lib.check_fields(data)
    except ValueError as e:
        raise UserError(f"--config {path}: {e}") from None
    return data


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=_Help,
        description="Train a character-level causal transformer from scratch, or fine-tune a "
        "pretrained GPT-2 (--init); rerun to resume.")
    p.add_argument("--data", help="UTF-8 text file or directory of .txt files "
                   "(default: Shakespeare's plays, downloaded on first use)")
    p.add_argument("--run-dir", default="runs/default",
                   help="directory for checkpoints and metrics; resumed if it holds a run")
    p.add_argument("--preset", default="default", choices=tuple(config_lib.PRESETS),
                   help="starting configuration: lecture (the lecture's model), default, fast")
    p.add_argument("--config", help="JSON file of config fields, applied over the preset")
    p.add_argument("--fresh", action="store_true",
                   help="start over in an existing run directory instead of resuming")
    p.add_argument("--resume-from", choices=("latest", "last-good"), default="latest",
                   help="latest: an unreadable newest checkpoint is an error; last-good: set "
                   "unreadable steps aside and resume from the newest readable one")
    p.add_argument("--cpu-devices", type=_positive_int, default=None,
                   help="on CPU, XLA host devices to split each batch across (default: as many "
                   "as there are cores, less if needed to divide --batch-size); ignored on "
                   "GPU/TPU")
    _add_field_flags(p)
    return p


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _default_cpu_devices(config: config_lib.Config) -> int:
    """One device per core, fewer where the cores do not divide a random batch."""
    cores, train = cpu_cores(), config.train
    if train.batching == "stream":  # stream rows are padded to any device count
        return cores
    fits = [d for d in range(1, cores + 1) if train.batch_size % (d * train.micro_batches) == 0]
    return max(fits, default=1)


def use_cpu_devices(n: int) -> None:
    """Give the CPU backend `n` devices (before JAX starts), unless XLA_FLAGS already does."""
    import jax

    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", n)


def resolve_config(args: argparse.Namespace) -> config_lib.Config:
    """Preset, then the --config file, then explicit flags."""
    flags = {k: v for k, v in vars(args).items() if k in config_lib.FIELDS}
    try:
        config = config_lib.preset(args.preset)
        if args.config:
            config = config.replace(**_read_config_file(args.config))
        config = config.replace(**flags)
    except ValueError as e:
        name = str(e).split("=")[0].split()[-1]
        flag = "--" + name.replace("_", "-") if name in config_lib.FIELDS else "config"
        raise UserError(f"{flag}: {e}") from None
    shape = [k for k in flags if k in config_lib.MODEL_FIELDS and k not in _PRETRAINED_MODEL_FLAGS]
    if config.train.init != "scratch" and shape:
        raise UserError(f"--{shape[0].replace('_', '-')} does not apply with --init "
                        f"{config.train.init}: the pretrained model's config.json fixes its shape")
    return config


def _train(argv: list[str] | None) -> None:
    args = train_parser().parse_args(argv)
    config = resolve_config(args)
    use_cpu_devices(args.cpu_devices or _default_cpu_devices(config))
    from transformer_jax import corpus, data, plot, run  # JAX only after the flags are good

    path = args.data or corpus.prepare_default_corpus()
    text = data.read_text(path)
    import jax

    print(f"corpus: {path} ({len(text):,} characters); devices: {jax.devices()}")
    run.train(config, text, args.run_dir, fresh=args.fresh, resume_command=_resume_command(),
              resume_from=args.resume_from)
    try:
        print(f"loss curve: {plot.plot_run(args.run_dir)}")
    except UserError as e:  # matplotlib is an optional extra: a hint, not a failure
        print(f"no loss curve: {e}")
    sampler = "python sample.py" if sys.argv[0].endswith(".py") else "transformer-jax-sample"
    print(f"sample with: {sampler} --run-dir {shlex.quote(args.run_dir)} --prompt \"...\"")


def _resume_command() -> str:
    """This process's own command line, without --fresh: what continues the run."""
    program = sys.argv[0]
    program = f"python {program}" if program.endswith(".py") else Path(program).name
    return " ".join([program] + [shlex.quote(a) for a in sys.argv[1:] if a != "--fresh"])


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py", formatter_class=_Help,
        description="Print text sampled from a trained run: the prompt, then its continuation.")
    p.add_argument("--run-dir", default="runs/default", help="run directory written by train.py")
    p.add_argument("--model", help="sample from this pretrained GPT-2 as it is instead of a run: "
                   "a Hugging Face hub name (gpt2, ...) or a local directory in its layout")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (empty: start symbol)")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=500,
                   help="tokens to generate (characters, or GPT-2 tokens)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature; 0 is greedy (always the likeliest character)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0: all")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the likeliest characters whose probability sums to p")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--num-samples", type=_positive_int, default=1, help="samples to print")
    return p


def _sample(argv: list[str] | None) -> None:
    args = sample_parser().parse_args(argv)
    import logging

    # orbax logs absl warnings when it opens a checkpoint read-only; they are not for users.
    logging.getLogger("absl").setLevel(logging.ERROR)
    from transformer_jax import run, sampling

    try:  # a larger --top-k than the vocabulary means all of it (clamped below)
        sampling.check_arguments(max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, num_samples=args.num_samples)
    except ValueError as e:
        raise UserError(f"--{str(e).split('=')[0].replace('_', '-')}: {e}") from None
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 "
                            f"({e.__class__.__name__})") from None
    if args.model:
        from transformer_jax import gpt2

        model, params, tokenizer = gpt2.from_pretrained(args.model)
        config = config_lib.Config(model=model.config)
    else:
        config, tokenizer, params, _ = run.load_for_sampling(args.run_dir)
    samples = sampling.complete(config, tokenizer, params, prompt,
                                max_new_tokens=args.max_new_tokens, seed=args.seed,
                                temperature=args.temperature,
                                top_k=min(args.top_k, tokenizer.vocab_size), top_p=args.top_p,
                                num_samples=args.num_samples, warn=_warn)
    for i, sample in enumerate(samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(sample)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _main(body, argv: list[str] | None) -> None:
    try:
        body(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def train_main(argv: list[str] | None = None) -> None:
    """Entry point of `train.py` / `transformer-jax-train`."""
    _main(_train, argv)


def sample_main(argv: list[str] | None = None) -> None:
    """Entry point of `sample.py` / `transformer-jax-sample`."""
    _main(_sample, argv)
