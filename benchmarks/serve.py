"""Serving speed: requests/s and generated tokens/s at 1, 4 and 16 concurrent clients.

    python benchmarks/serve.py --data ../shared/data/tinyshakespeare.txt

Trains the `default` preset's model for a few steps (speed does not depend on the weights)
unless --run-dir names a run, starts `serve.py` on it (16 rows, --ignore-eos, so every request
makes exactly --new-tokens tokens), then lets 1, 4 and 16 clients each send --requests
completions one after another (temperature 1, each its own seed) and times them all, each
count --rounds times, interleaved, so that a slow spell of a shared machine hits all alike.
`ratio_16_to_1` is the 16 clients' aggregate tokens/s over one client's in the same round
(the median over rounds): what batching the concurrent requests into one decode gains.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLIENTS = (1, 4, 16)


def train_briefly(data: str, run_dir: Path) -> None:
    subprocess.run([sys.executable, "train.py", "--preset", "default", "--data", data,
                    "--run-dir", str(run_dir), "--steps", "10", "--steps-per-call", "10",
                    "--eval-every", "10", "--eval-batches", "1", "--save-every", "10"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def start_server(run_dir: Path, rows: int) -> tuple[subprocess.Popen, str]:
    """`serve.py` on a free port, and its URL once it answers (at most 5 minutes)."""
    proc = subprocess.Popen([sys.executable, "serve.py", "--run-dir", str(run_dir), "--port",
                             "0", "--max-batch", str(rows), "--ignore-eos"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],
                     daemon=True).start()
    deadline = time.monotonic() + 300
    while True:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        if line.startswith("serving "):
            url = line.split()[3].rstrip("/")
            break
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the server did not answer")


def client(url: str, seeds: range, new_tokens: int) -> int:
    """Send one completion per seed, one after another on one connection: the tokens
    generated."""
    made, where = 0, urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
    try:
        for seed in seeds:
            connection.request("POST", "/v1/completions", json.dumps({
                "prompt": "ROMEO:", "max_tokens": new_tokens, "temperature": 1.0,
                "seed": seed}), {"Content-Type": "application/json"})
            tokens = json.loads(connection.getresponse().read())["usage"]["completion_tokens"]
            if tokens != new_tokens:
                raise RuntimeError(f"a request made {tokens} tokens, not {new_tokens}")
            made += tokens
    finally:
        connection.close()
    return made


def measure(url: str, clients: int, requests: int, new_tokens: int) -> tuple[float, float]:
    """(requests/s, tokens/s) of `clients` clients sending `requests` each."""
    seeds = [range(c * requests, (c + 1) * requests) for c in range(clients)]
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(lambda s: client(url, s, new_tokens), seeds))
    spent = time.perf_counter() - began
    return clients * requests / spent, tokens / spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text corpus to train the model briefly on")
    p.add_argument("--run-dir", help="serve this run instead of training one")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens each request makes")
    p.add_argument("--requests", type=int, default=6, help="requests per client")
    p.add_argument("--rounds", type=int, default=5,
                   help="times each client count is measured, interleaved (medians shown)")
    p.add_argument("--rows", type=int, default=16, help="the server's --max-batch")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tj-serve-bench-") as tmp:
        run_dir = Path(args.run_dir or Path(tmp) / "default")
        if not args.run_dir:
            train_briefly(args.data, run_dir)
        proc, url = start_server(run_dir, args.rows)
        try:
            measure(url, 1, 1, args.new_tokens)  # the first request pays what is left to pay
            rounds = [{clients: measure(url, clients, args.requests, args.new_tokens)
                       for clients in CLIENTS} for _ in range(args.rounds)]
        finally:
            proc.terminate()
            proc.wait(30)
    figures = {}
    for clients in CLIENTS:
        figures[f"requests_per_s_{clients}"] = statistics.median(r[clients][0] for r in rounds)
        figures[f"tokens_per_s_{clients}"] = statistics.median(r[clients][1] for r in rounds)
    # Each round's ratio is of figures timed seconds apart: the median of those is steadier
    # than the ratio of the medians on a machine whose speed drifts.
    ratios = [r[16][1] / r[1][1] for r in rounds]
    print(f"default preset, {args.rows} rows, {args.new_tokens} new tokens a request, "
          f"{args.requests} requests a client, medians of {args.rounds} rounds; ratio in each "
          f"round: {' '.join(f'{x:.2f}' for x in ratios)}")
    common.report(**figures, ratio_16_to_1=statistics.median(ratios))

if __name__ == "__main__":
    main()
