"""The server (transformer-jax-serve) through the official `openai` client and a real browser.

Two servers of the committed tiny character run serve the module: one in this process (16
rows, the default ending at the end symbol) for the API's answers, and one started by the real
command line (`serve.py --max-batch 1 --queue-size 1 --ignore-eos --api-key`) whose samples
never end by themselves, for the queue, disconnects, the key and the page. Every wait is
bounded and both servers are always shut down.
"""

from __future__ import annotations

import contextlib
import io
import json
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import browser
import openai
import pytest

from transformer_jax import cli, run, sampling, serve

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "runs"
KEY = "sk-test-key"
LONG = 10**6  # max_tokens that only a cancel ends (with --ignore-eos)


def wait_until(ready, seconds: float, what: str):
    """Poll `ready()` until it returns something true (returned), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := ready():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {seconds} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("runs")
    for name in ("char", "series"):
        shutil.copytree(FIXTURES / name, where / name)
    return where


@contextlib.contextmanager
def serving(run_dir: Path, **app_options):
    """An in-process server of `run_dir` on a free port: (its URL, its engine)."""
    trained = run.load_for_sampling(run_dir)
    sampler = sampling.text_sampler(trained.config, trained.tokenizer, trained.params, rows=16)
    engine = serve.Engine(sampler, queue_size=64)
    engine.start()
    sock = serve.bind("127.0.0.1", 0)
    server = serve.server(serve.make_app(engine, model=run_dir.name, **app_options), sock,
                          log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "the server started")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(15)
        engine.stop()
        sock.close()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def local(runs):
    with serving(runs / "char") as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(local) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{local[0]}/v1", api_key="unused", max_retries=0,
                         timeout=30)


@pytest.fixture(scope="module")
def guarded(runs, tmp_path_factory):
    """The URL of `serve.py --ignore-eos --max-batch 1 --queue-size 1 --api-key KEY`, a
    subprocess, read from what it prints; SIGTERM (then SIGKILL) at the end."""
    log = tmp_path_factory.mktemp("log") / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "serve.py", "--run-dir", str(runs / "char"), "--port", "0",
             "--max-batch", "1", "--queue-size", "1", "--ignore-eos", "--api-key", KEY],
            cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no URL within 120 s:\n{log.read_text()}") from None
            if line.startswith("serving char at "):
                url = line.split()[3].rstrip("/")
        wait_until(lambda: _health(url), 30, "the subprocess server answered")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def fetch(url: str, body: bytes | None = None, headers: dict | None = None,
          timeout: float = 10) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET, or of a POST of `body` (the standard library's
    client: no more than the bytes given)."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _health(url: str) -> dict | None:
    try:
        return json.loads(fetch(f"{url}/health", timeout=5)[2])
    except OSError:  # not listening yet
        return None


def keyed(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def test_the_readme_client_example_streams_from_a_server(local, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "base_url=" in b]
    assert "http://127.0.0.1:8000/v1" in block and 'model="default"' in block
    block = block.replace("http://127.0.0.1:8000", local[0]).replace('"default"', '"char"')
    exec(compile(block, "README.md", "exec"), {})
    whole = openai.OpenAI(base_url=f"{local[0]}/v1", api_key="unused").completions.create(
        model="char", prompt="ROMEO:", max_tokens=200, temperature=0.8)
    assert capsys.readouterr().out == whole.choices[0].text


def test_a_completion_answers_in_openai_shape(client):
    reply = client.completions.create(model="char", prompt="the market", max_tokens=20, seed=3)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.model == "char"
    (choice,) = reply.choices
    assert choice.index == 0 and choice.logprobs is None
    tokens = reply.usage.completion_tokens
    assert choice.finish_reason == ("length" if tokens == 20 else "stop")
    # One character a token, but the special symbols (start, pad) it may draw print nothing.
    assert reply.usage.prompt_tokens == 10 and len(choice.text) <= tokens
    assert reply.usage.total_tokens == 10 + tokens
    assert [m.id for m in client.models.list().data] == ["char"]
    assert client.models.retrieve("char").owned_by == "transformer-jax"
    echoed = client.completions.create(model="char", prompt="the market", max_tokens=20, seed=3,
                                       echo=True)
    assert echoed.choices[0].text == "the market" + choice.text
    nothing = client.completions.create(model="char", prompt="the", max_tokens=0)
    assert (nothing.choices[0].text, nothing.choices[0].finish_reason) == ("", "length")


def test_a_streamed_completion_is_the_whole_one_in_pieces(client):
    asked = dict(model="char", prompt="price of", max_tokens=60, seed=11, n=3, temperature=0.9)
    whole = client.completions.create(**asked)
    texts, finish, usage = ["", "", ""], [None] * 3, None
    for chunk in client.completions.create(**asked, stream=True,
                                           stream_options={"include_usage": True}):
        assert chunk.object == "text_completion" and chunk.model == "char"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            assert finish[choice.index] is None, "a text after its finish reason"
            texts[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_a_stop_string_ends_each_text_before_it(client):
    asked = dict(model="char", prompt="the", max_tokens=40, seed=2, n=16)
    free = [c.text for c in client.completions.create(**asked).choices]
    longest = max(free, key=len)
    stops = [longest[8:10], longest[15:17]]
    stopped = client.completions.create(**asked, stop=stops).choices
    cut = 0
    for text, choice in zip(free, stopped):
        at = [i for i in (text.find(s) for s in stops) if i >= 0]
        if at:
            cut += 1
            assert (choice.text, choice.finish_reason) == (text[:min(at)], "stop")
        else:
            assert choice.text == text
    assert cut >= 1


def test_n_samples_are_different_choices_with_their_indexes(client):
    reply = client.completions.create(model="char", prompt="the market", max_tokens=30, n=4,
                                      seed=7)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert len({c.text for c in reply.choices}) > 1
    alone = client.completions.create(model="char", prompt="the market", max_tokens=30, n=1,
                                      seed=7)
    assert alone.choices[0].text == reply.choices[0].text  # sample i draws with key i


def test_a_seeded_request_is_what_sample_py_prints(client, runs):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.sample_main(["--run-dir", str(runs / "char"), "--prompt", "the market",
                         "--max-new-tokens", "50", "--seed", "5", "--num-samples", "2",
                         "--temperature", "0.9", "--top-p", "0.95", "--stop", "ba"])
    reply = client.completions.create(model="char", prompt="the market", max_tokens=50, seed=5,
                                      n=2, temperature=0.9, top_p=0.95, stop="ba", echo=True)
    first, second = (c.text for c in reply.choices)
    assert printed.getvalue() == f"--- sample 1 ---\n{first}\n--- sample 2 ---\n{second}\n"


def test_sixteen_concurrent_requests_are_each_answered_as_alone(client, local):
    asked = [dict(model="char", prompt=prompt, max_tokens=40, seed=seed, temperature=1.0)
             for seed, prompt in enumerate(["the market", "price of", "", "money"] * 4)]
    ask = lambda a: client.completions.create(**a).choices[0].text
    alone = [ask(a) for a in asked]
    engine, peak, done = local[1], [0], threading.Event()

    def watch():  # the most rows in use at once
        while not done.is_set():
            peak[0] = max(peak[0], engine.rows_busy)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, asked))
    finally:
        done.set()
        watcher.join()
    assert together == alone
    assert peak[0] > 1  # decoded together, not one after another
    assert wait_until(lambda: _health(local[0])["rows_busy"] == 0, 10, "rows freed")


@pytest.mark.parametrize("body, status, param, needle", [
    (b'{"prompt": "the", ', 400, None, "could not parse the JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    (b'{"prompt": "the", "max_tokens": -1}', 400, "max_tokens", "must not be negative"),
    (b'{"max_tokens": "10"}', 400, "max_tokens", "must be an integer"),
    (b'{"max_tokens": 1.5}', 400, "max_tokens", "must be an integer"),
    (b'{"temperature": -0.5}', 400, "temperature", "not negative"),
    (b'{"temperature": true}', 400, "temperature", "must be a number"),
    (b'{"top_p": 0}', 400, "top_p", "(0, 1]"),
    (b'{"top_p": 1.5}', 400, "top_p", "(0, 1]"),
    (b'{"n": 0}', 400, "n", "at least 1"),
    (b'{"n": 17}', 400, "n", "16 samples"),
    (b'{"stop": ""}', 400, "stop", "must not be empty"),
    (b'{"stop": ["a", "b", "c", "d", "e"]}', 400, "stop", "at most 4"),
    (b'{"stop": [1]}', 400, "stop", "list of strings"),
    (b'{"prompt": [1, 2]}', 400, "prompt", "token ids"),
    (b'{"prompt": "\\ud800"}', 400, "prompt", "lone surrogate"),
    (b'{"stream": "yes"}', 400, "stream", "must be a boolean"),
    (b'{"stream_options": {"include_usage": true}}', 400, "stream_options", "stream: true"),
    (b'{"seed": 99999999999999999999}', 400, "seed", "64 bits"),
    (b'{"logprobs": 2}', 400, "logprobs", "not supported"),
    (b'{"temprature": 1}', 400, "temprature", "Unrecognized request argument"),
    (b'{"model": "gpt-4", "prompt": "the"}', 404, "model", "gpt-4"),
])
def test_a_bad_request_gets_an_openai_error(local, body, status, param, needle):
    got, _, reply = fetch(f"{local[0]}/v1/completions", body,
                          {"Content-Type": "application/json"})
    assert got == status, reply
    error = json.loads(reply)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"], error["message"]
    assert error["code"] == ("model_not_found" if status == 404 else None)


def test_the_client_raises_on_bad_requests_and_unknown_paths_are_json(client, local):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="char", prompt="the", max_tokens=-3)
    with pytest.raises(openai.NotFoundError, match="davinci-002") as unknown:
        client.completions.create(model="davinci-002", prompt="the")
    assert unknown.value.code == "model_not_found"
    for path, status in (("/v1/nope", 404), ("/v1/completions", 405)):  # GET
        got, _, reply = fetch(f"{local[0]}{path}")
        assert got == status and "error" in json.loads(reply)


def test_a_client_that_leaves_mid_stream_frees_its_rows(guarded):
    client = keyed(guarded)
    stream = client.completions.create(model="char", prompt="the", max_tokens=LONG,
                                       stream=True)
    assert next(iter(stream)).choices[0].text
    assert _health(guarded)["rows_busy"] == 1
    stream.close()
    wait_until(lambda: _health(guarded)["rows_busy"] == 0, 10, "the stream's row freed")
    # A whole answer's client that gives up frees its row too.
    with pytest.raises(TimeoutError):
        fetch(f"{guarded}/v1/completions", json.dumps({"prompt": "the", "max_tokens": LONG})
              .encode(), {"Authorization": f"Bearer {KEY}"}, timeout=1)
    wait_until(lambda: _health(guarded)["rows_busy"] == 0, 10, "the whole answer's row freed")
    reply = client.completions.create(model="char", prompt="the", max_tokens=25)
    assert reply.usage.completion_tokens == 25  # --ignore-eos: always max_tokens
    assert reply.choices[0].finish_reason == "length"


def test_a_full_queue_answers_503(guarded):
    client = keyed(guarded)
    ask = lambda: client.completions.create(model="char", prompt="the", max_tokens=LONG,
                                            stream=True)
    running = ask()
    assert next(iter(running)).choices[0].text
    waiting = ask()  # its answer has begun (status 200) but its row is not free yet
    assert wait_until(lambda: _health(guarded)["waiting"] == 1, 10, "one request waiting")
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model="char", prompt="the", max_tokens=5)
    assert refused.value.status_code == 503
    assert refused.value.body["code"] == "server_busy"
    running.close()
    assert next(iter(waiting)).choices[0].text  # placed once the row was freed
    waiting.close()
    idle = lambda: (health := _health(guarded))["rows_busy"] == 0 and health["waiting"] == 0
    wait_until(idle, 10, "every row freed, nothing waiting")


def test_the_api_key_is_required(guarded):
    with pytest.raises(openai.AuthenticationError) as refused:
        keyed(guarded, "sk-wrong").completions.create(model="char", prompt="the", max_tokens=3)
    assert refused.value.code == "invalid_api_key"
    status, headers, reply = fetch(f"{guarded}/v1/models")
    assert status == 401 and json.loads(reply)["error"]["code"] == "invalid_api_key"
    assert headers["www-authenticate"] == "Bearer"
    assert keyed(guarded).models.list().data[0].id == "char"
    assert fetch(f"{guarded}/health")[0] == 200  # no key needed


def served_error(argv: list[str], capsys) -> str:
    """The one `error:` line that serve_main(argv) ends with (exit code 2)."""
    with pytest.raises(SystemExit) as exited:
        cli.serve_main(argv)
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ")
    return line


def test_the_command_line_refuses_a_taken_port_a_series_run_and_no_run(runs, tmp_path, capsys):
    with serve.bind("127.0.0.1", 0) as taken:
        taken.listen()
        port = str(taken.getsockname()[1])
        line = served_error(["--run-dir", str(runs / "char"), "--port", port], capsys)
        assert f"--port {port}: cannot listen there" in line
    line = served_error(["--run-dir", str(runs / "series"), "--port", "0"], capsys)
    assert "holds a series model; the server serves text models only" in line
    missing = ["--run-dir", str(tmp_path / "none"), "--port", "0"]
    assert "holds no checkpoint" in served_error(missing, capsys)
    assert "between 0 and 65535" in served_error(["--port", "70000"], capsys)


def test_the_page_loads_nothing_from_elsewhere(guarded):
    status, headers, page = fetch(f"{guarded}/")
    policy, page = headers["content-security-policy"], page.decode()
    assert status == 200 and "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "http://" not in page and "https://" not in page
    assert 'id="key"' in page  # the server needs a key: the page asks for it


def test_the_page_streams_text_and_stops_in_chromium(guarded):
    browser.or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with browser.chromium() as driver:
        driver.get(f"{guarded}/")
        field = lambda name: driver.find_element(By.ID, name)
        text = lambda: field("text").text
        status = lambda: field("status").text
        field("key").send_keys(KEY)
        field("prompt").send_keys("the market")
        field("max_tokens").clear()
        field("max_tokens").send_keys(str(LONG))
        field("generate").click()
        WebDriverWait(driver, 30).until(lambda _: len(text()) > 20)
        assert field("shown").text == "the market" and status().startswith("generating")
        field("stop").click()
        WebDriverWait(driver, 10).until(lambda _: status().startswith("stopped"))
        shown = text()
        wait_until(lambda: _health(guarded)["rows_busy"] == 0, 10, "the page's row freed")
        assert text() == shown  # nothing after Stop

        field("max_tokens").clear()
        field("max_tokens").send_keys("30")
        field("generate").click()
        WebDriverWait(driver, 30).until(lambda _: status().startswith("done"))
        assert 0 < len(text()) <= 30 and status().endswith("length")  # --ignore-eos
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors


def test_requests_are_parsed_with_openai_defaults():
    request = serve.parse_completion({"prompt": ["hi"], "stop": "\n"}, model="m", max_n=4)
    assert request == serve.Completion("hi", sampling.Settings(16, 1.0, 1.0, 1, 0, ("\n",)))
    assert serve.parse_completion({}, model="m", max_n=1).prompt == ""
    with pytest.raises(serve.ApiError) as bad:
        serve.parse_completion({"user": 3}, model="m", max_n=1)
    assert json.loads(json.dumps(bad.value.body()))["error"]["param"] == "user"
