"""Head-only, LoRA and full fine-tuning of one base on one corpus: loss, step time, checkpoint.

Each is trained by `run.train` with the same settings.

    python benchmarks/finetune_quality.py [--init tests/fixtures/gpt2-tiny]
        [--data ../shared/data/tinyshakespeare.txt] [--steps 400] [--lr 3e-3]

The three runs differ only in --finetune: the same base, corpus split, batches, schedule, seed
and number of steps. Validation loss is the run's last evaluation over its whole validation
split (nats per token of the base's tokenizer); seconds per step the median over the run's
chunks after the first (which compiles); the checkpoint size is the bytes on disk of the last
step's directory (trained parameters and AdamW's moments of them). `benchmarks/finetune.py`
gives step time and peak memory at GPT-2 124M's shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KINDS = ("head", "lora", "full")


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def seconds_per_step(run_dir: Path, tokens_per_step: int) -> float:
    """Median seconds per step over the run's chunks after the first (metrics.jsonl)."""
    import numpy as np

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return float(np.median([tokens_per_step / r for r in rates]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", default=str(REPO / "tests" / "fixtures" / "gpt2-tiny"),
                   help="the base: a GPT-2 directory or hub name")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"),
                   help="the text corpus (UTF-8) all three fine-tune on")
    p.add_argument("--steps", type=int, default=400, help="training steps of each run")
    p.add_argument("--batch-size", type=int, default=16, help="rows per step")
    p.add_argument("--seq-len", type=int, default=63, help="the tiny fixture's window is 64")
    p.add_argument("--lr", type=float, default=3e-3, help="the same for the three")
    args = p.parse_args()
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file; give a UTF-8 text corpus")

    import jax

    from transformer_jax import run
    from transformer_jax.config import preset

    text = Path(args.data).read_text(encoding="utf-8")
    config = preset("default").replace(
        init=args.init, optimizer="adamw", steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, lr=args.lr, warmup_steps=args.steps // 20, eval_every=args.steps,
        save_every=args.steps, steps_per_call=max(args.steps // 20, 1))
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            run_dir = Path(tmp) / kind
            result = run.train(config.replace(finetune=kind), text, run_dir, quiet=True,
                               devices=jax.devices()[:1])
            step_dir = run_dir / "checkpoints" / str(result["step"])
            figures[f"{kind}_val_loss"] = round(result["val_loss"], 4)
            figures[f"{kind}_seconds_per_step"] = round(
                seconds_per_step(run_dir, args.batch_size * args.seq_len), 4)
            figures[f"{kind}_checkpoint_bytes"] = directory_bytes(step_dir)
            print(f"{kind}: validation loss {result['val_loss']:.4f}, "
                  f"{figures[f'{kind}_seconds_per_step']:.4f} s/step, checkpoint "
                  f"{figures[f'{kind}_checkpoint_bytes']:,} bytes", flush=True)
    print(f"base {args.init}, corpus {args.data}: {len(text):,} characters, {args.steps} steps "
          f"of {args.batch_size} x {args.seq_len}, AdamW lr {args.lr}")
    common.report(**figures)


if __name__ == "__main__":
    main()
