"""An OpenAI-compatible HTTP server over a `sampling.Sampler` (`transformer-jax-serve`).

One engine thread owns the sampler, so every JAX call happens there: between two compiled
chunks it admits waiting requests into free rows (requests that arrive together share one
decode), advances every row one chunk and hands each request its new text through the request's
asyncio queue. The HTTP side, Starlette on uvicorn, checks requests and answers OpenAI's legacy
completions API, streamed as server-sent events or whole, and serves a small page at `/`.

Errors are OpenAI's: `{"error": {"message", "type", "param", "code"}}` with status 400 for a
bad request, 401 without the API key, 404 for an unknown model (OpenAI's `model_not_found`)
or path, 503 when the queue of waiting requests is full, 500 (no traceback) for a bug.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import html
import json
import secrets
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jax
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from transformer_jax import sampling

MAX_BODY = 1 << 20  # bytes of a request; a prompt longer than the window keeps only its end
MAX_STOPS = 4  # as OpenAI
INT32_MAX = (1 << 31) - 1  # the decoder counts the tokens left in int32
# Each compiled chunk's aim in seconds: a row that finishes mid-chunk idles to its end, and a
# request that arrives waits for it, so chunks shorter than sample.py's (0.1 s) pay off once
# clients come and go (benchmarks/serve.py, 16 clients: 7,540 tokens/s against 5,020 at 0.1).
CHUNK_SECONDS = 0.03
# OpenAI's fields that this server does not implement: each is accepted at its neutral value.
NEUTRAL = {"best_of": (None, 1), "logprobs": (None,), "suffix": (None, ""),
           "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
           "logit_bias": (None, {})}
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
          "stream", "stream_options", "echo", "user", *NEUTRAL}


class ApiError(Exception):
    """An answer other than 200, in OpenAI's shape."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Completion:
    """A checked `POST /v1/completions` request: continue `prompt` as `settings` say; the
    answer `stream`ed as server-sent events or whole, each text after the prompt if `echo`,
    the token counts as a last event if `include_usage` (a stream's `stream_options`)."""

    prompt: str
    settings: sampling.Settings
    stream: bool = False
    echo: bool = False
    include_usage: bool = False


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _typed(body: dict, name: str, kind: str, default):
    """`body[name]` if it is of `kind` (integer, number, boolean, string), `default` if it is
    absent or null; else an ApiError naming it."""
    value = body.get(name)
    if value is None:
        return default
    ok = {"integer": isinstance(value, int), "number": isinstance(value, (int, float)),
          "boolean": isinstance(value, bool), "string": isinstance(value, str)}[kind]
    if not ok or (isinstance(value, bool) and kind != "boolean"):
        raise ApiError(f"{name} must be {'an' if kind == 'integer' else 'a'} {kind}, got "
                       f"{_shown(value)}", param=name)
    return value


def _text(value: str, name: str) -> str:
    """`value`, refused if it holds a lone surrogate (JSON allows them, UTF-8 does not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(f"{name} is not valid Unicode (it holds a lone surrogate)",
                       param=name) from None
    return value


def _prompt(body: dict) -> str:
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError("prompt must be a string (or a list of one string); token ids and "
                       "several prompts in one request are not supported", param="prompt")
    return _text(prompt, "prompt")


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise ApiError(f"stop must be a string or a list of strings, got {_shown(stop)}",
                       param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(f"stop holds {len(stops)} strings; at most {MAX_STOPS}", param="stop")
    if "" in stops:
        raise ApiError("a stop string must not be empty", param="stop")
    return tuple(_text(s, "stop") for s in stops)


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ApiError("stream_options is only allowed with stream: true",
                       param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError('stream_options must be an object {"include_usage": BOOLEAN}',
                       param="stream_options")
    return _typed(options, "include_usage", "boolean", False)


def parse_completion(body, *, model: str, max_n: int) -> Completion:
    """The request of a `POST /v1/completions` JSON `body` to the server of `model` that
    decodes at most `max_n` samples at once; an ApiError names the first bad field.

    Defaults as OpenAI's: max_tokens 16, temperature 1, top_p 1, n 1; a missing model means
    the served one, a missing prompt the empty one (the start symbol); seed 0.
    """
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(f"Unrecognized request argument supplied: {unknown[0]}",
                       param=unknown[0])
    asked = _typed(body, "model", "string", model)
    if asked != model:
        raise ApiError(f"The model `{asked}` does not exist; this server has `{model}`",
                       status=404, param="model", code="model_not_found")
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in neutral:
            raise ApiError(f"{name} is not supported by this server", param=name)
    _typed(body, "user", "string", None)
    max_tokens = _typed(body, "max_tokens", "integer", 16)
    temperature = _typed(body, "temperature", "number", 1.0)
    top_p = _typed(body, "top_p", "number", 1.0)
    n = _typed(body, "n", "integer", 1)
    seed = _typed(body, "seed", "integer", 0)
    try:
        sampling.check_arguments(max_new_tokens=max_tokens, temperature=temperature, top_k=0,
                                 top_p=top_p, num_samples=n)
    except ValueError as e:
        name, rule = str(e).split("=", 1)
        param = {"max_new_tokens": "max_tokens", "num_samples": "n"}.get(name, name)
        raise ApiError(f"{param}={rule}", param=param) from None
    if max_tokens > INT32_MAX:
        raise ApiError(f"max_tokens={max_tokens} is more than {INT32_MAX}", param="max_tokens")
    if n > max_n:
        raise ApiError(f"n={n} is more than the {max_n} samples this server decodes at once",
                       param="n")
    if not -(1 << 63) <= seed < 1 << 63:
        raise ApiError(f"seed={seed} does not fit in 64 bits", param="seed")
    stream = _typed(body, "stream", "boolean", False)
    return Completion(_prompt(body),
                      sampling.Settings(max_tokens, float(temperature), float(top_p), n, seed,
                                        _stops(body)),
                      stream=stream, echo=_typed(body, "echo", "boolean", False),
                      include_usage=_include_usage(body, stream))


@dataclass(frozen=True)
class Delta:
    """New text of choice `index`; `finish` ("stop", "length") on its last."""

    index: int
    text: str
    finish: str | None = None


@dataclass(frozen=True)
class Done:
    """The end of a request: why each choice finished, its token counts, or the `error` that
    ended it."""

    finish_reasons: tuple[str | None, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class QueueFull(Exception):
    """Every place in the queue of waiting requests is taken."""


@dataclass(eq=False)
class Ticket:
    """A request from its arrival to its end: what it asks, the event loop and queue that its
    `Delta`s and last `Done` go to, and its job once it has rows."""

    prompt: str
    settings: sampling.Settings
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    job: sampling.Job | None = None

    def post(self, event: Delta | Done) -> None:
        """Hand `event` to the request's loop (from any thread)."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def warm_up(sampler: sampling.Sampler) -> None:
    """Compile what serving runs before the first request comes: the prefill of each prompt
    length the decoder rounds to (powers of two from 8, and the whole window), placing a row,
    a chunk of each number of rows it steps and of each cache prefix it reads there, and ending
    rows early (a stop string, a client gone)."""
    decoder = sampler.decoder
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    for length in sorted({min(decoder.width, 8 << k) for k in range(decoder.width.bit_length())}):
        decoder.place([0], np.zeros(length, np.int32), keys, max_new_tokens=2)
    # A chunk steps the first k rows only (k a power of two past the last live one): each k.
    for last in sorted({min(1 << k, decoder.size) - 1 for k in range(decoder.size.bit_length())}):
        for span in decoder.spans(last + 1):
            decoder.place([last], np.zeros(1, np.int32), keys, max_new_tokens=2)
            decoder.advance(span)
    decoder.finish(range(decoder.size))


class Engine:
    """The thread that owns `sampler`: it places waiting requests in free rows between chunks
    (first come, first placed: a request waits for as many free rows as its n), steps while
    any row is live and posts each request's text to its ticket.

    At most `queue_size` requests wait for rows; `submit` refuses one more (QueueFull).
    `cancel` ends a request at the next chunk, freeing its rows, or takes it off the queue.
    """

    def __init__(self, sampler: sampling.Sampler, *, queue_size: int):
        self.sampler, self.queue_size = sampler, queue_size
        self.rows = sampler.decoder.size
        self.rows_busy = 0  # written by the engine thread around each chunk
        self._wake = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._cancelled: list[Ticket] = []
        self._live: dict[sampling.Job, Ticket] = {}
        self._stopping = False
        self._failure: Exception | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        """Start the thread and return once it has compiled (raising what failed)."""
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread after its current chunk; requests not done get an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, prompt: str, settings: sampling.Settings,
               loop: asyncio.AbstractEventLoop) -> Ticket:
        ticket = Ticket(prompt, settings, loop)
        with self._wake:
            if len(self._waiting) >= self.queue_size:
                raise QueueFull
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """End `ticket`'s request (nothing if it is done already)."""
        with self._wake:
            self._cancelled.append(ticket)
            self._wake.notify()

    def _run(self) -> None:
        try:
            warm_up(self.sampler)
        except Exception as e:  # raised again by start, in the thread that waits for it
            self._failure = e
            return
        finally:
            self._ready.set()
        while self._next():
            pass
        self._end_all("the server is shutting down")

    def _has_work(self) -> bool:
        head_fits = self._waiting and self._waiting[0].settings.n <= self.sampler.free
        return bool(self._stopping or self._cancelled or self.sampler.busy or head_fits)

    def _next(self) -> bool:
        """Cancel, place, then advance every row one chunk; False once stopping."""
        with self._wake:
            self._wake.wait_for(self._has_work)
            if self._stopping:
                return False
            cancelled, self._cancelled = self._cancelled, []
            dropped = [t for t in cancelled if t in self._waiting]
            for ticket in dropped:
                self._waiting.remove(ticket)
        for ticket in dropped:
            ticket.post(Done(error="cancelled"))
        try:
            for ticket in cancelled:
                if ticket.job in self._live:
                    self.sampler.cancel(ticket.job)
            while ticket := self._admit():
                ticket.job = self.sampler.start(ticket.prompt, ticket.settings)
                self._live[ticket.job] = ticket
            self.rows_busy = self.rows - self.sampler.free  # the rows this chunk decodes
            pieces = self.sampler.step() if self.sampler.busy else []
        except Exception:  # a bug: answer 500 and go on serving
            traceback.print_exc(file=sys.stderr)
            self._end_all("the server failed to decode; see its log")
            return True
        for piece in pieces:
            self._live[piece.job].post(Delta(piece.index, piece.text, piece.finish))
        for job in [job for job in self._live if job.done]:
            self._live.pop(job).post(Done(tuple(job.finish_reasons), job.prompt_tokens,
                                          sum(job.produced)))
        self.rows_busy = self.rows - self.sampler.free
        return True

    def _admit(self) -> Ticket | None:
        """The first waiting request if enough rows are free for it, off the queue."""
        with self._wake:
            if self._waiting and self._waiting[0].settings.n <= self.sampler.free:
                return self._waiting.popleft()
        return None

    def _end_all(self, error: str) -> None:
        """End every request placed or waiting with `error`, freeing their rows."""
        with self._wake:
            ended = [*self._live.values(), *self._waiting]
            self._waiting.clear()
        for ticket in self._live.values():
            with contextlib.suppress(Exception):  # a decoder that failed may fail again
                self.sampler.cancel(ticket.job)
        self._live.clear()
        self.rows_busy = self.rows - self.sampler.free
        for ticket in ended:
            ticket.post(Done(error=error))


async def _read_json(request: Request):
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY:
            raise ApiError(f"the request body is larger than {MAX_BODY} bytes", status=413)
    try:
        return json.loads(body)
    except ValueError as e:  # not JSON, not UTF-8, or a number of too many digits
        raise ApiError(f"We could not parse the JSON body of your request: {e}") from None


def _authorize(request: Request) -> None:
    key = request.app.state.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer "):
        raise ApiError("You didn't provide an API key: send the header 'Authorization: "
                       "Bearer KEY'", status=401, code="invalid_api_key")
    if not hmac.compare_digest(given.removeprefix("Bearer ").encode(), key.encode()):
        raise ApiError("Incorrect API key provided", status=401, code="invalid_api_key")


def _choice(index: int, text: str, finish: str | None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _event(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _failed(done: Done) -> ApiError:
    return ApiError(f"the request ended: {done.error}", status=500, kind="server_error")


class _EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends: done, the client
    gone (Starlette cancels the stream then), or the server stopping."""

    def __init__(self, events: AsyncIterator[str], on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _streamed(ticket: Ticket, request: Completion, head: dict) -> AsyncIterator[str]:
    """A completion's events: each choice's new text as it comes (after the prompt with
    echo), its finish reason on its last, the usage if asked, then `[DONE]`."""
    chunk = lambda choices: {**head, "choices": choices}
    if request.echo:
        for i in range(request.settings.n):
            yield _event(chunk([_choice(i, request.prompt, None)]))
    finished = set()
    while isinstance(event := await ticket.events.get(), Delta):
        finished.update([event.index] if event.finish else [])
        yield _event(chunk([_choice(event.index, event.text, event.finish)]))
    if event.error:
        yield _event(_failed(event).body())
        return
    for i, reason in enumerate(event.finish_reasons):
        if i not in finished:  # a choice of no tokens (max_tokens 0) has had no event
            yield _event(chunk([_choice(i, "", reason)]))
    if request.include_usage:
        yield _event({**chunk([]), "usage": _usage(event)})
    yield _event("[DONE]")


async def _cancel_when_gone(request: Request, engine: Engine, ticket: Ticket) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    engine.cancel(ticket)


async def _whole(http: Request, ticket: Ticket, request: Completion, head: dict) -> dict:
    """A completion's answer once every choice is done (cancelled if the client leaves)."""
    engine = http.app.state.engine
    watcher = asyncio.create_task(_cancel_when_gone(http, engine, ticket))
    texts = [request.prompt if request.echo else ""] * request.settings.n
    try:
        while isinstance(event := await ticket.events.get(), Delta):
            texts[event.index] += event.text
    finally:
        watcher.cancel()
        engine.cancel(ticket)  # nothing if done; the rows back if this coroutine was cancelled
    if event.error:
        raise _failed(event)
    return {**head, "choices": [_choice(i, text, reason) for i, (text, reason)
                                in enumerate(zip(texts, event.finish_reasons))],
            "usage": _usage(event)}


async def completions(http: Request):
    """POST /v1/completions."""
    _authorize(http)
    state = http.app.state
    request = parse_completion(await _read_json(http), model=state.model,
                               max_n=state.engine.rows)
    try:
        ticket = state.engine.submit(request.prompt, request.settings, asyncio.get_running_loop())
    except QueueFull:
        raise ApiError(f"the server is busy: {state.engine.queue_size} requests are waiting "
                       "already; try again later", status=503, kind="server_error",
                       code="server_busy") from None
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
            "created": int(time.time()), "model": state.model}
    if request.stream:
        return _EventStream(_streamed(ticket, request, head),
                            lambda: state.engine.cancel(ticket))
    return JSONResponse(await _whole(http, ticket, request, head))


def _card(state) -> dict:
    return {"id": state.model, "object": "model", "created": state.created,
            "owned_by": "transformer-jax"}


async def models(http: Request):
    """GET /v1/models."""
    _authorize(http)
    return JSONResponse({"object": "list", "data": [_card(http.app.state)]})


async def one_model(http: Request):
    """GET /v1/models/{model}."""
    _authorize(http)
    name = http.path_params["model"]
    if name != http.app.state.model:
        raise ApiError(f"The model `{name}` does not exist", status=404, param="model",
                       code="model_not_found")
    return JSONResponse(_card(http.app.state))


async def health(http: Request):
    """GET /health: the server is up; rows in use and requests waiting."""
    engine = http.app.state.engine
    return JSONResponse({"status": "ok", "model": http.app.state.model, "rows": engine.rows,
                         "rows_busy": engine.rows_busy, "waiting": engine.waiting,
                         "queue_size": engine.queue_size})


STYLE = """
body { font: 16px/1.4 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.3rem; }
textarea { width: 100%; box-sizing: border-box; font: 15px/1.4 ui-monospace, monospace; }
.row { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; margin: .6rem 0; }
input[type=number] { width: 6rem; }
#output { white-space: pre-wrap; font: 15px/1.4 ui-monospace, monospace; background: #f6f6f4;
          padding: 1rem; min-height: 8rem; border-radius: 4px; }
#shown { color: #777; }
#status { color: #555; min-height: 1.4em; }
"""

SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
let controller = null;

function busy(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
}

function say(text) { $("status").textContent = text; }

async function failure(response) {
  try { return (await response.json()).error.message; }
  catch (e) { return `HTTP ${response.status}`; }
}

// Each event of the stream: `data: JSON` (one choice's new text) or `data: [DONE]`.
function read(event, state) {
  for (const line of event.split("\\n")) {
    if (!line.startsWith("data: ")) continue;
    const data = line.slice(6);
    if (data === "[DONE]") { state.done = true; continue; }
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message);
    for (const choice of chunk.choices) {
      $("text").textContent += choice.text;
      if (choice.finish_reason) state.finish = choice.finish_reason;
    }
  }
}

async function generate(event) {
  event.preventDefault();
  const prompt = $("prompt").value, seed = Math.floor(Math.random() * 2 ** 31);
  $("shown").textContent = prompt;
  $("text").textContent = "";
  const headers = {"Content-Type": "application/json"};
  if ($("key")) headers.Authorization = "Bearer " + $("key").value;
  const body = {prompt, stream: true, seed, max_tokens: Number($("max_tokens").value),
                temperature: Number($("temperature").value)};
  controller = new AbortController();
  busy(true);
  say(`generating (seed ${seed})...`);
  const state = {done: false, finish: null};
  try {
    const response = await fetch("v1/completions", {method: "POST", headers,
      body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) throw new Error(await failure(response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        read(buffer.slice(0, cut), state);
        buffer = buffer.slice(cut + 2);
      }
    }
    say(state.done ? `done (seed ${seed}): ${state.finish}` : "the stream broke off");
  } catch (e) {
    say(e.name === "AbortError" ? `stopped (seed ${seed})` : `error: ${e.message}`);
  } finally {
    busy(false);
  }
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
<form id="form">
<textarea id="prompt" rows="5" placeholder="A prompt (empty: from the start)"></textarea>
<div class="row">
<label>Temperature <input id="temperature" type="number" min="0" step="0.1" value="0.8"></label>
<label>Max tokens <input id="max_tokens" type="number" min="0" step="1" value="300"></label>
{key}<button id="generate" type="submit">Generate</button>
<button id="stop" type="button" disabled>Stop</button>
</div>
</form>
<pre id="output"><span id="shown"></span><span id="text"></span></pre>
<p id="status" role="status"></p>
<script>{script}</script>
</body>
</html>
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# The page may run its own script and style only, and fetch from its own origin only.
POLICY = (f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
          "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
          "frame-ancestors 'none'")


def page(model: str, *, api_key: bool) -> str:
    """The page at `/`: a prompt, temperature, length (and the API key if one is needed); the
    text streams in from /v1/completions and Stop aborts it."""
    key = ('<label>API key <input id="key" type="password" autocomplete="off"></label>\n'
           if api_key else "")
    return PAGE.format(title=html.escape(f"transformer-jax: {model}"), style=STYLE,
                       script=SCRIPT, key=key)


async def home(http: Request):
    """GET /: the page."""
    return HTMLResponse(http.app.state.page, headers={"Content-Security-Policy": POLICY,
                                                      "X-Content-Type-Options": "nosniff"})


async def _api_error(http: Request, error: ApiError, headers: dict | None = None):
    if error.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _http_error(http: Request, error: HTTPException):
    """Starlette's own errors (no such path, wrong method) in OpenAI's shape."""
    return await _api_error(http, ApiError(f"{http.method} {http.url.path}: {error.detail}",
                                           status=error.status_code), error.headers)


async def _server_error(http: Request, error: Exception):
    return await _api_error(http, ApiError("the server failed; see its log", status=500,
                                           kind="server_error"))


def make_app(engine: Engine, *, model: str, api_key: str | None = None) -> Starlette:
    """The server's routes over a started `engine`; requests must name `model` (or none);
    with `api_key`, /v1/ needs `Authorization: Bearer API_KEY`."""
    app = Starlette(routes=[
        Route("/", home),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{model:path}", one_model),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                           Exception: _server_error})
    app.state.engine, app.state.model, app.state.api_key = engine, model, api_key
    app.state.created, app.state.page = int(time.time()), page(model, api_key=bool(api_key))
    return app


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (0: any free port), not yet listening: it refuses
    connections until the server starts (OSError if the address is taken or unknown)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # no wait after a restart
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def server(app: Starlette, sock: socket.socket, *, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server of `app` for `sock` (`.run(sockets=[sock])` serves until Ctrl-C or
    `.should_exit`); open streams get 5 s to end when it stops."""
    host, port = sock.getsockname()[:2]
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=5))
