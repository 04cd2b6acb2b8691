"""Write tests/fixtures/runs/: tiny run directories of every kind and what they print.

Run by hand, by a given version of the code, to pin down what its run directories mean:

    python tests/make_run_fixtures.py

When what sample.py or forecast.py prints changes on purpose (another sampler, say), record
what the current code prints for the committed directories, which stay as they are:

    python tests/make_run_fixtures.py --printed-only

Trains, with train.py's own entry point, a character model, a GPT-2 transfer run of each
fine-tuning mode (on the tiny GPT-2 fixture) and a Gaussian series model, keeping one
checkpoint each; then records in expected.json what sample.py and forecast.py print for them.
tests/test_run_fixtures.py checks that the current code reads these directories and prints
exactly the same. The transfer runs record their base model's absolute path: the test points it
at the fixture wherever the checkout lies.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures" / "runs"
GPT2 = HERE / "fixtures" / "gpt2-tiny"
TINY = ["--d-model", "16", "--layers", "2", "--heads", "2", "--d-ff", "32", "--keep", "1",
        "--cpu-devices", "1", "--steps-per-call", "5", "--eval-every", "10"]
TRAIN = {
    "char": ["--preset", "fast", "--data", "corpus.txt", "--steps", "20", "--seq-len", "32",
             "--max-len", "32", "--batch-size", "4", "--save-every", "20", *TINY],
    "transfer-head": ["--data", "corpus.txt", "--init", str(GPT2), "--finetune", "head",
                      "--steps", "10", "--seq-len", "24", "--batch-size", "4", "--lr", "1e-2",
                      "--save-every", "10", "--keep", "1", "--cpu-devices", "1",
                      "--steps-per-call", "5", "--eval-every", "10"],
    "transfer-full": ["--data", "corpus.txt", "--init", str(GPT2), "--finetune", "full",
                      "--steps", "10", "--seq-len", "24", "--batch-size", "4", "--lr", "1e-3",
                      "--save-every", "10", "--keep", "1", "--cpu-devices", "1",
                      "--steps-per-call", "5", "--eval-every", "10"],
    "series": ["--preset", "series", "--data", "series.csv", "--columns", "a,b",
               "--covariates", "c", "--time-column", "t", "--head", "gaussian", "--steps", "20",
               "--seq-len", "8", "--max-len", "8", "--save-every", "20", *TINY],
}
SAMPLE = [["--prompt", "the market", "--max-new-tokens", "40", "--seed", "1", "--top-k", "5",
           "--num-samples", "2"],
          ["--prompt", "price of", "--max-new-tokens", "30", "--temperature", "0"]]
FORECAST = [["--data", "series.csv", "--horizon", "4", "--origin", "q110", "--samples", "64",
             "--seed", "2"],
            ["--data", "series.csv", "--horizon", "3", "--origin", "q90", "--samples", "32"]]


def corpus(n: int = 60, seed: int = 0) -> str:
    rnd = random.Random(seed)
    words = ("the market economics science dismal money price trade labour capital value "
             "growth interest rate bank of").split()
    return "".join(" ".join(rnd.choice(words) for _ in range(rnd.randint(5, 30))) + ".\n"
                   for _ in range(n))


def series_csv(n: int = 120, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    a, b, c = np.zeros(n), np.zeros(n), rng.normal(size=n)
    for t in range(1, n):
        a[t] = 0.8 * a[t - 1] + 0.3 * c[t] + 0.1 * rng.normal()
        b[t] = 0.5 * b[t - 1] + 0.4 * a[t - 1] + 0.1 * rng.normal()
    return "t,a,b,c\n" + "".join(f"q{t},{a[t]:.6f},{b[t]:.6f},{c[t]:.6f}\n" for t in range(n))


def printed(main, argv: list[str]) -> str:
    """What `main(argv)` prints on stdout, less the line naming the picture it drew."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return "".join(line for line in out.getvalue().splitlines(keepends=True)
                   if not line.startswith(("picture:", "no picture:")))


def main(printed_only: bool = False) -> None:
    from transformer_jax import cli

    if printed_only:
        base = json.loads((OUT / "expected.json").read_text())["base_model"]
        if base != str(GPT2):
            sys.exit(f"the transfer runs name {base}: run this from that checkout")
    else:
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        (OUT / "corpus.txt").write_text(corpus())
        (OUT / "series.csv").write_text(series_csv())
    expected = {}
    with contextlib.chdir(OUT):
        for name, argv in TRAIN.items():
            if not printed_only:
                printed(cli.train_main, ["--run-dir", name, *argv])
            for extra in ("metrics.jsonl", "loss.png", "validation.json", "forecast.png"):
                (Path(name) / extra).unlink(missing_ok=True)
            calls = FORECAST if name == "series" else SAMPLE
            run = cli.forecast_main if name == "series" else cli.sample_main
            expected[name] = [{"argv": argv, "stdout": printed(run, ["--run-dir", name, *argv])}
                              for argv in calls]
            (Path(name) / "forecast.png").unlink(missing_ok=True)
    (OUT / "expected.json").write_text(json.dumps({"base_model": str(GPT2), "runs": expected},
                                                  indent=1) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main(printed_only="--printed-only" in sys.argv[1:])
