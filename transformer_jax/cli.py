"""Command lines: flags -> config -> library calls. Bad input ends in one line and exit code 2.

Every config field has a flag built from its dataclass metadata, so help and config stay in step.
Precedence: preset, then --config file, then explicit flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
import typing
from pathlib import Path
from typing import Any

from transformer_jax import config as config_lib, timing
from transformer_jax.errors import RunStopped, UserError


class _Parser(argparse.ArgumentParser):
    """Bad flags end in one `error:` line (exit code 2), like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


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


def _step(text: str) -> int | str:
    """A --step: a checkpoint's step number, or `best` (the kept best of `train.py --keep-best`)."""
    if text == "best":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a step number or best, got {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a step number or best, got {text}")
    return value


def _add_step(parser: argparse.ArgumentParser) -> None:
    """The --step of a program that reads one checkpoint of a run."""
    parser.add_argument("--step", type=_step, help="its checkpoint of this step, or best (the "
                        "lowest validation loss, kept by train.py --keep-best); default: the "
                        "newest (train.py keeps the last --keep)")


def _add_verbose(parser: argparse.ArgumentParser, first: str) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="print on standard error where the seconds go: each phase of "
                        f"start-up as it ends, up to {first}")


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
                choices = f.metadata["choices"] or None
                group.add_argument(flag, type=base, choices=choices, default=argparse.SUPPRESS,
                                   metavar=None if choices else base.__name__.upper(),
                                   help=f.metadata["help"])


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--config {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise UserError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: must hold a JSON object of config fields")
    try:
        config_lib.check_fields(data)
    except ValueError as e:
        raise UserError(f"--config {path}: {e}") from None
    return data


def train_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train.py", formatter_class=_Help,
        description="Train a character-level causal transformer from scratch, fine-tune a "
        "pretrained GPT-2 (--init), or train a series model of CSV columns (--columns); "
        "rerun to resume.")
    p.add_argument("--data", help="UTF-8 text file or directory of .txt files, or with "
                   "--columns a CSV file (default: Shakespeare's plays, downloaded on first "
                   "use)")
    p.add_argument("--run-dir", default="runs/default",
                   help="directory for checkpoints and metrics; resumed if it holds a run")
    p.add_argument("--preset", default="default", choices=tuple(config_lib.PRESETS),
                   help="starting configuration: lecture (the lecture's model), default, fast, "
                   "series (a small series model for --columns)")
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
    multi = p.add_argument_group(
        "multi-host (jax.distributed; on TPU pods, SLURM and Open MPI none are needed)")
    multi.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0, which every process of the run contacts")
    multi.add_argument("--num-processes", type=_positive_int, metavar="N",
                       help="number of processes in the run (one per host, usually)")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process: 0 to N - 1")
    _add_verbose(p, "the first compiled chunk of steps and the first evaluation")
    _add_field_flags(p)
    return p


def resolve_config(args: argparse.Namespace) -> config_lib.Config:
    """Preset, then the --config file, then explicit flags.

    A pretrained --init is fine-tuned with AdamW unless the file or a flag names the optimizer:
    the presets' Muon is a recipe for training from scratch.
    """
    flags = {k: v for k, v in vars(args).items() if k in config_lib.FIELDS}
    try:
        file = _read_config_file(args.config) if args.config else {}
        config = config_lib.preset(args.preset).replace(**file).replace(**flags)
        pretrained = config.kind == "transfer"
        if pretrained and "optimizer" not in {**file, **flags}:
            config = config.replace(optimizer="adamw")
    except ValueError as e:  # name where the setting came from: its flag, or the file
        name = str(e).split("=")[0].split()[-1]
        where = ("--" + name.replace("_", "-") if name in flags or name not in file
                 else f"--config {args.config}")
        raise UserError(f"{where if name in config_lib.FIELDS else 'config'}: {e}") from None
    shape = [k for k in flags
             if k in config_lib.MODEL_FIELDS and k not in config_lib.PRETRAINED_MODEL_FIELDS]
    if pretrained and shape:
        raise UserError(f"--{shape[0].replace('_', '-')} does not apply with --init "
                        f"{config.train.init}: the pretrained model's config.json fixes its shape")
    return config


def _train(argv: list[str] | None) -> None:
    args = train_parser().parse_args(argv)
    config = resolve_config(args)
    if args.verbose:
        timing.show()
    from transformer_jax import parallel  # JAX only after the flags are good

    parallel.use_cpu_devices(args.cpu_devices or parallel.default_cpu_devices(config))
    parallel.use_compile_cache()
    import jax

    from transformer_jax import corpus, run, tasks
    from transformer_jax.tokens import Corpus

    timing.mark("imports: JAX, the model and the trainer")
    kind = tasks.kind_of(config)
    if kind.reader != "forecast" and str(args.data).endswith(".csv"):
        raise UserError(f"--data {args.data} is a CSV file: give --columns a,b,... (the series "
                        "to forecast) to train a series model on it")
    parallel.start_distributed(args.coordinator, args.num_processes, args.process_id)
    path = args.data or corpus.prepare_default_corpus()
    text = Corpus.scan(path)  # read in pieces: a corpus may be larger than memory
    timing.mark(f"corpus scanned: {path}")
    if parallel.is_lead():
        print(f"corpus: {path} ({text.chars:,} characters); devices: {jax.devices()}")
    run.train(config, text, args.run_dir, fresh=args.fresh, resume_command=_resume_command(),
              resume_from=args.resume_from)
    if parallel.is_lead():
        _after_training(kind, config, args.run_dir, text, path)


def _after_training(kind, config: config_lib.Config, run_dir: str, text, path: str) -> None:
    """The loss curve, and how to use the model: for a series model, its validation table."""
    from transformer_jax import forecast, plot, run

    try:
        print(f"loss curve: {plot.plot_run(run_dir, kind.loss_label(config))}")
    except UserError as e:  # matplotlib is an optional extra: a hint, not a failure
        print(f"no loss curve: {e}")
    best = " --step best" if config.train.keep_best else ""
    where = f"--run-dir {shlex.quote(run_dir)}{best}"
    if kind.reader == "forecast":
        report = forecast.validate(run.load_for_sampling(run_dir), text.read())
        (Path(run_dir) / "validation.json").write_text(json.dumps(report, indent=1) + "\n")
        print(forecast.validation_table(report))
        print(f"forecast with: {_program('forecast')} {where} --data "
              f"{shlex.quote(str(path))} --horizon 8")
    else:
        print(f"sample with: {_program('sample')} {where} --prompt \"...\"")
    print(f"judge it with: {_program('evaluate')} {where} [--data FILE] [--html page.html]")


def _load(run_dir: str, step: int | str | None, program: str):
    """The trained model of `run_dir` for `program` (sample, serve or forecast, which must
    read its kind of run: a text model for the first two; or evaluate, which reads every kind)."""
    from transformer_jax import run

    trained = run.load_for_sampling(run_dir, step)
    if program == "evaluate" or trained.kind.reader == program.replace("serve", "sample"):
        return trained
    if program in ("sample", "serve"):
        only = "; the server serves text models only" if program == "serve" else ""
        raise UserError(f"run directory {run_dir} holds a series model{only}; forecast with "
                        f"`{_program('forecast')} --run-dir {run_dir} --data FILE.csv`")
    raise UserError(f"run directory {run_dir} holds a text model; sample with "
                    f"`{_program('sample')} --run-dir {run_dir}`")


def _program(name: str) -> str:
    """How to call the command `name` (sample, forecast) the way this one was called."""
    return f"python {name}.py" if sys.argv[0].endswith(".py") else f"transformer-jax-{name}"


def _resume_command() -> str:
    """This process's own command line, without --fresh: what continues the run."""
    program = sys.argv[0]
    program = f"python {program}" if program.endswith(".py") else Path(program).name
    return " ".join([program] + [shlex.quote(a) for a in sys.argv[1:] if a != "--fresh"])


def sample_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sample.py", formatter_class=_Help,
        description="Print text sampled from a trained run as it is produced: the prompt, then "
                    "its continuation. Several samples are printed whole, one after another "
                    "(each next one carries on live once those before it are done).")
    p.add_argument("--run-dir", default="runs/default", help="run directory written by train.py")
    _add_step(p)
    p.add_argument("--model", help="sample from this pretrained GPT-2 as it is instead of a run: "
                   "a Hugging Face hub name (gpt2, ...) or a local directory in its layout")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (empty: start symbol)")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    prompt.add_argument("--interactive", action="store_true",
                        help="load and compile once, then answer prompts read from standard "
                             "input one after another (a '>>> ' prompt with line editing on a "
                             "terminal, one prompt per line when piped); Ctrl-C stops an "
                             "answer, Ctrl-D exits; the i-th prompt samples with --seed + i")
    p.add_argument("--max-new-tokens", type=int, default=500,
                   help="tokens to generate (characters, or GPT-2 tokens)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end a sample at the first occurrence of STR, which is not printed "
                        "(repeatable: the first of any)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="go on past the end symbol (GPT-2: <|endoftext|>) instead of ending "
                        "the sample there")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature; 0 is greedy (always the likeliest character)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0: all")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the likeliest characters whose probability sums to p")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--num-samples", type=_positive_int, default=1, help="samples to print")
    _add_verbose(p, "the first new token")
    return p


def _sample(argv: list[str] | None) -> None:
    args = sample_parser().parse_args(argv)
    if args.verbose:
        timing.show()
    from transformer_jax import parallel, sampling

    parallel.use_compile_cache()
    timing.mark("imports: JAX, the model and the sampler")
    try:  # a larger --top-k than the vocabulary means all of it (clamped below)
        sampling.check_arguments(max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, num_samples=args.num_samples)
    except ValueError as e:
        raise UserError(f"--{str(e).split('=')[0].replace('_', '-')}: {e}") from None
    if "" in args.stop:
        raise UserError("--stop: a stop string must not be empty")
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 "
                            f"({e.__class__.__name__})") from None
    config, tokenizer, params = text_model(args.run_dir, args.step, args.model)
    timing.mark("model loaded")
    sampler = sampling.text_sampler(config, tokenizer, params, rows=args.num_samples,
                                    top_k=min(args.top_k, tokenizer.vocab_size),
                                    ignore_end=args.ignore_eos)
    settings = lambda seed: sampling.Settings(args.max_new_tokens, args.temperature,
                                              args.top_p, args.num_samples, seed,
                                              tuple(args.stop))
    if not args.interactive:
        _print_samples(sampler, prompt, settings(args.seed))
        return
    for i, line in enumerate(_prompts()):
        with _stop_on_ctrl_c() as stopped:
            _print_samples(sampler, line, settings(args.seed + i), stopped)


def text_model(run_dir: str, step: int | str | None, model: str | None,
               program: str = "sample"):
    """(config, tokenizer, params) of the text model of `run_dir` (its checkpoint `step`), or
    of the pretrained GPT-2 `model` as it is, for `program` (sample or serve)."""
    if model and step is not None:
        raise UserError("--step picks a checkpoint of --run-dir; a --model has none")
    if model:
        from transformer_jax import gpt2

        model, params, tokenizer = gpt2.from_pretrained(model)
        return config_lib.Config(model=model.config), tokenizer, params
    trained = _load(run_dir, step, program)
    return trained.config, trained.tokenizer, trained.params


def _print_samples(sampler, prompt: str, settings, stopped=lambda: False) -> None:
    """Stream the samples of `prompt` to standard output, sample 0 as it comes, each next one
    from where it is once those before it are done (its text so far held meanwhile); end
    them all early once `stopped()`."""
    from transformer_jax import sampling

    sampling.warn_unseen(sampler.tokenizer, prompt, _warn)
    job = sampler.start(prompt, settings)
    n = settings.n
    held, done = [prompt] * n, [reason is not None for reason in job.finish_reasons]
    shown = 0  # the sample being printed live

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def next_sample() -> None:
        nonlocal shown
        while shown < n:
            show(("" if shown == 0 else "\n") + (f"--- sample {shown + 1} ---\n" if n > 1 else "")
                 + held[shown])
            if not done[shown]:
                return
            shown += 1

    next_sample()
    first = True
    while not job.done:
        if stopped():
            sampler.cancel(job)
            break
        for piece in sampler.step():
            if first:
                timing.mark("first new tokens: the decoder compiled (or loaded from the "
                            "compilation cache) and run")
                first = False
            if piece.index == shown:
                show(piece.text)
            else:
                held[piece.index] += piece.text
            done[piece.index] = piece.finish is not None
            if done[shown]:
                shown += 1
                next_sample()
    show("\n")


def _prompts():
    """Prompts read from standard input until its end: after a '>>> ' prompt with readline's
    line editing on a terminal, else one per line. Ctrl-C at the prompt asks again."""
    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401  (input() then edits lines and keeps a history)
    while True:
        try:
            line = input(">>> ") if tty else sys.stdin.readline()
        except EOFError:
            return
        except KeyboardInterrupt:
            print()
            continue
        if not (tty or line):  # the end of piped input
            return
        yield line.rstrip("\n")


@contextlib.contextmanager
def _stop_on_ctrl_c():
    """Within: Ctrl-C (SIGINT) sets a flag instead of raising, so an answer ends between two
    compiled chunks, never inside one; yields a function that says whether it came."""
    came = []
    previous = signal.signal(signal.SIGINT, lambda *_: came.append(True))
    try:
        yield lambda: bool(came)
    finally:
        signal.signal(signal.SIGINT, previous)


def forecast_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="forecast.py", formatter_class=_Help,
        description="Forecast the series of a run trained on CSV data (train.py --columns): "
        "from the history in --data, each prediction is fed back for --horizon steps, and a "
        "Gaussian head's sample paths give an interval. Prints the forecast and draws it in "
        "RUN_DIR/forecast.png.")
    p.add_argument("--run-dir", default="runs/default",
                   help="run directory written by train.py --columns")
    _add_step(p)
    p.add_argument("--data", required=True, help="CSV file with the run's columns: the history "
                   "(and the known covariates of the forecast times)")
    p.add_argument("--horizon", type=_positive_int, default=8, help="times to forecast")
    p.add_argument("--origin", help="forecast the times after this row: its time label, or its "
                   "row number (from 0) when the run has no --time-column (default: the last "
                   "row)")
    p.add_argument("--samples", type=_positive_int, default=1000,
                   help="sample paths drawn from a Gaussian head")
    p.add_argument("--interval", type=float, default=0.9,
                   help="probability of the central interval of the sample paths")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sample paths")
    return p


def _forecast(argv: list[str] | None) -> None:
    args = forecast_parser().parse_args(argv)
    if not 0 < args.interval < 1:
        raise UserError(f"--interval {args.interval} must be between 0 and 1")
    from transformer_jax import data, forecast, parallel, plot

    parallel.use_compile_cache()
    trained = _load(args.run_dir, args.step, "forecast")
    table = forecast.read(trained.config, data.read_text(args.data), where=f"--data {args.data}")
    origin = len(table) - 1 if args.origin is None else table.row(args.origin)
    result = forecast.forecast(trained.config, trained.scaler, trained.params, table,
                               origin=origin,
                               horizon=args.horizon, samples=args.samples,
                               interval=args.interval, seed=args.seed)
    print(forecast.forecast_table(result))
    try:
        print(f"picture: {plot.plot_forecast(result, Path(args.run_dir) / 'forecast.png')}")
    except UserError as e:  # matplotlib is an optional extra: a hint, not a failure
        print(f"no picture: {e}")


def evaluate_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="evaluate.py", formatter_class=_Help,
        description="Judge trained runs (and pretrained GPT-2) on a text: every token predicted "
        "once, the loss in nats per token, perplexity, and bits per token, character and UTF-8 "
        "byte (which compare models with different tokenizers); for a series run, its one-step "
        "errors beside the random walk and AR baselines. Several models print one table.")
    p.add_argument("--run-dir", action="append", metavar="RUN_DIR",
                   help="run directory written by train.py; repeat to compare runs (default: "
                   "runs/default unless --model is given)")
    p.add_argument("--model", action="append", metavar="NAME_OR_DIR",
                   help="also judge this pretrained GPT-2 as it is: a Hugging Face hub name "
                   "(gpt2, ...) or a local directory in its layout; repeatable")
    p.add_argument("--step", type=_step, help="the runs' checkpoint of this step, or best "
                   "(train.py --keep-best); default: the newest")
    p.add_argument("--data", help="UTF-8 text file or directory of .txt files to judge on (a CSV "
                   "file for series runs); default: each run's own validation split (for a "
                   "--model, the first run's)")
    p.add_argument("--context", type=_positive_int, help="tokens of context per window "
                   "(default: the run's --seq-len; a pretrained model's whole context)")
    p.add_argument("--stride", type=_positive_int, help="overlapping windows: each window "
                   "starts this many tokens after the one before and scores only its last "
                   "STRIDE tokens, which then see at least context - stride + 1 tokens before "
                   "them (default: the context, non-overlapping windows as training's "
                   "validation)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="windows per compiled call (default: the run's --batch-size)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per model instead of a table")
    p.add_argument("--html", metavar="OUT.html", help="write a page of the text with each token "
                   "shaded by its surprisal (one model only)")
    p.add_argument("--html-tokens", type=_positive_int, default=20000,
                   help="tokens shown on the --html page: the text's first ones")
    p.add_argument("--cpu-devices", type=_positive_int, default=None,
                   help="on CPU, XLA host devices to split each batch across (default: one per "
                   "core); ignored on GPU/TPU")
    return p


def _evaluate(argv: list[str] | None) -> None:
    args = evaluate_parser().parse_args(argv)
    models = [("run", r) for r in args.run_dir or []] + [("model", m) for m in args.model or []]
    models = models or [("run", "runs/default")]
    if args.html and len(models) > 1:
        raise UserError("--html draws the page of one model; give one --run-dir or --model")
    if args.model and args.step is not None and not args.run_dir:
        raise UserError("--step picks a checkpoint of --run-dir; a --model has none")
    if args.model and not (args.data or args.run_dir):
        raise UserError("give --data FILE: a --model has no validation split of its own")
    from transformer_jax import parallel

    parallel.use_cpu_devices(args.cpu_devices or parallel.cpu_cores())
    parallel.use_compile_cache()
    from transformer_jax import evaluate

    mesh, reports = parallel.data_mesh(), []
    text = evaluate.file_text(args.data) if args.data else None
    first_split = None  # without --data, a --model is judged on the first run's split
    for what, name in models:
        if what == "run":
            trained = _load(name, args.step, "evaluate")
        else:
            trained = evaluate.pretrained(name)
        report, scores = evaluate.judge(
            trained, name, text or (first_split if what == "model" else None), mesh=mesh,
            context=args.context, stride=args.stride, batch_size=args.batch_size,
            page_tokens=args.html_tokens if args.html else 0, quiet=args.json)
        if not (text or first_split) and what == "run" and trained.kind.reader == "sample":
            first_split = evaluate.validation_split(trained, name)
        reports.append(report)
        if report.get("unknown_chars"):
            _warn(f"{name}: the characters {', '.join(map(repr, report['unknown_chars']))} are "
                  "not in its vocabulary; each was read and scored as the unknown symbol")
        if report.get("skipped_tokens"):
            _warn(f"{name}: {report['skipped_tokens']:,} tokens lie outside its prediction "
                  "layer (the tokens of its training corpus) and were not scored")
        if args.json:
            print(json.dumps(report), flush=True)
        if scores is not None:
            _write_page(scores, report, args.html)
    if not args.json:
        print(evaluate.report_table(reports))


def _write_page(scores, report: dict, path: str) -> None:
    from transformer_jax import surprisal

    shown, unit = len(scores.pieces), report["unit"]
    per_char = "" if unit == "char" else f", {report['bits_per_char']:.3f} per character"
    part = "all of them" if shown == report["tokens"] else f"the first {shown:,}"
    summary = (f"{report['model']} (step {report['step']}) on {report['data']}: "
               f"{report['bits_per_token']:.3f} bits per {unit}{per_char}, "
               f"{report['bits_per_byte']:.3f} per UTF-8 byte, over {report['tokens']:,} "
               f"{unit}s; the page shows {part}")
    try:
        out = surprisal.write_page(scores, path, title=f"Surprisal: {report['model']}",
                                   summary=summary)
    except OSError as e:
        raise UserError(f"--html {path}: cannot write it ({e.strerror})") from None
    print(f"surprisal page: {out}", file=sys.stderr)


def serve_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="serve.py", formatter_class=_Help,
        description="Serve a trained text model, or a pretrained GPT-2, over HTTP: OpenAI's "
        "completions API (POST /v1/completions, streamed or whole; GET /v1/models; GET "
        "/health) and a page at / to try it. Requests that arrive together are decoded "
        "together, up to --max-batch samples at once; the others wait in a queue.")
    p.add_argument("--run-dir", default="runs/default",
                   help="run directory written by train.py (a text model); requests name the "
                        "model by the directory's name")
    _add_step(p)
    p.add_argument("--model", metavar="NAME_OR_DIR",
                   help="serve this pretrained GPT-2 as it is instead of a run: a Hugging Face "
                        "hub name (gpt2, ...) or a local directory in its layout; requests "
                        "name the model NAME_OR_DIR as given here")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface, so other machines "
                        "can reach it)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require the header 'Authorization: Bearer KEY' on /v1/ (default: no "
                        "authentication, anyone who reaches the port may use it)")
    p.add_argument("--max-batch", type=_positive_int, default=16,
                   help="samples decoded at once, over all requests (a request's n is at most "
                        "this); each costs its decoding step whether it is in use or not")
    p.add_argument("--queue-size", type=_positive_int, default=64,
                   help="requests that may wait for free rows; one more is answered 503")
    p.add_argument("--ignore-eos", action="store_true",
                   help="go on past the end symbol (GPT-2: <|endoftext|>) instead of ending "
                        "a sample there, so every sample runs to its max_tokens")
    return p


def _serve(argv: list[str] | None) -> None:
    args = serve_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} must be between 0 and 65535")
    if args.api_key == "":
        raise UserError("--api-key must not be empty")
    try:
        from transformer_jax import serve
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("starlette", "uvicorn"):
            raise
        raise UserError(f"serving needs {e.name}: pip install 'transformer-jax[serve]'") from None
    try:  # bound before loading, so a taken port fails at once
        sock = serve.bind(args.host, args.port)
    except OSError as e:
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen there "
                        f"({e.strerror or e}); pick another --port") from None
    with contextlib.closing(sock):
        from transformer_jax import parallel, sampling

        parallel.use_compile_cache()
        config, tokenizer, params = text_model(args.run_dir, args.step, args.model, "serve")
        name = args.model or Path(args.run_dir).resolve().name
        sampler = sampling.text_sampler(config, tokenizer, params, rows=args.max_batch,
                                        ignore_end=args.ignore_eos,
                                        chunk_seconds=serve.CHUNK_SECONDS)
        print(f"compiling {name} for {args.max_batch} rows...", flush=True)
        engine = serve.Engine(sampler, queue_size=args.queue_size)
        engine.start()
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        print(f"serving {name} at {url}/ (page) and {url}/v1 (OpenAI API)", flush=True)
        print("API key required: Authorization: Bearer KEY" if args.api_key else
              "no authentication: anyone who can reach this address may use it "
              "(--api-key KEY requires a key)", flush=True)
        try:
            app = serve.make_app(engine, model=name, api_key=args.api_key)
            serve.server(app, sock).run(sockets=[sock])
        finally:
            engine.stop()


def export_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="export.py", formatter_class=_Help,
        description="Write a trained text run as a GPT-2 in Hugging Face's layout (config.json, "
        "model.safetensors, tokenizer files, generation_config.json) that transformers' "
        "GPT2LMHeadModel.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) load. A "
        "transfer run's head over the corpus's tokens becomes an lm_head over the whole "
        "vocabulary, the other ids in suppress_tokens; a character model needs GPT-2's "
        "architecture (--norm pre --positions learned --activation gelu_tanh, tied).")
    p.add_argument("--run-dir", default="runs/default", help="run directory written by train.py")
    _add_step(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory to write (new or empty; written whole or not at all)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier export in a non-empty --out")
    return p


def _export(argv: list[str] | None) -> None:
    args = export_parser().parse_args(argv)
    from transformer_jax import export

    out = export.export(args.run_dir, args.out, step=args.step, force=args.force)
    print(f"exported to {out}; load it with transformers: "
          f"GPT2LMHeadModel.from_pretrained({str(out)!r}), "
          f"AutoTokenizer.from_pretrained({str(out)!r})")


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


def forecast_main(argv: list[str] | None = None) -> None:
    """Entry point of `forecast.py` / `transformer-jax-forecast`."""
    _main(_forecast, argv)


def evaluate_main(argv: list[str] | None = None) -> None:
    """Entry point of `evaluate.py` / `transformer-jax-evaluate`."""
    _main(_evaluate, argv)


def serve_main(argv: list[str] | None = None) -> None:
    """Entry point of `serve.py` / `transformer-jax-serve`."""
    _main(_serve, argv)


def export_main(argv: list[str] | None = None) -> None:
    """Entry point of `export.py` / `transformer-jax-export`."""
    _main(_export, argv)
