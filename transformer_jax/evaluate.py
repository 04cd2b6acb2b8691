"""Judging a model: how well it predicts a text, in units that compare models with different
tokenizers, and, for a series model, its one-step errors beside its baselines.

A text is read in pieces, encoded, and cut into rows that predict each of its tokens exactly once
(the "scored" targets), scored batch by batch on the devices: memory is bounded by the batch,
not by the text. The rows are cut as training cuts its validation rows:

- sliding windows (random batching, and pretrained GPT-2): rows of T + 1 tokens. The first row
  scores its T targets; each later row starts `stride` S tokens after the one before and scores
  its last S targets, each of which then sees at least T - S + 1 tokens before it. S = T gives
  training's non-overlapping validation windows, the default. The text's first token is only
  context, unless the model was trained with start symbols (stream batching): then it reads one
  before the text and predicts the first token too.
- the lecture's pieces (stream batching, no --stride): start symbol, T characters, end symbol,
  exactly as training's validation rows; the end symbols are predicted and counted as tokens.

The loss is summed in nats over the scored tokens: per token it is the run's validation loss;
per character or per UTF-8 byte of the text it compares a character model with GPT-2.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from transformer_jax import data, forecast, parallel, tasks
from transformer_jax.config import Config, TrainConfig
from transformer_jax.errors import UserError
from transformer_jax.model import Transformer
from transformer_jax.surprisal import TokenScores
from transformer_jax.tasks import Trained
from transformer_jax.tokens import Corpus

TOP = 5  # alternatives per token on the surprisal page
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class Windows:
    """How a text's ids are cut into scored rows.

    context: T, input positions per row; stride: S, targets a row adds after the first; pad:
    the pad id; start: an id read before the text (None: none); end: the lecture's pieces,
    with this end id (None: sliding windows).
    """

    context: int
    stride: int
    pad: int
    start: int | None = None
    end: int | None = None


def windows_for(trained: Trained, context: int | None = None, stride: int | None = None
                ) -> Windows:
    """The rows training cut for `trained`'s validation (see the module docstring), with
    another `context` or `stride` if given; UserError when one is out of range."""
    tcfg, tokenizer, max_len = trained.config.train, trained.tokenizer, trained.config.model.max_len
    stream = tcfg.batching == "stream"
    pieces = stream and stride is None  # each piece reads a start symbol before its T ids
    T = context or (tcfg.seq_len if pieces else tcfg.tokens_per_sequence - 1)
    if not 1 <= T <= max_len - pieces:
        raise UserError(f"--context {T} must be between 1 and {max_len - pieces} (the model's "
                        f"context{', less its start symbol' if pieces else ''})")
    if stride is not None and not 1 <= stride <= T:
        raise UserError(f"--stride {stride} must be between 1 and the context ({T} tokens)")
    if pieces:
        return Windows(T, T, tokenizer.pad_id, tokenizer.start_id, tokenizer.end_id)
    return Windows(T, stride or T, tokenizer.pad_id, tokenizer.start_id if stream else None)


def sliding_rows(chunks: Iterable[np.ndarray], w: Windows, block: int = 1024
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sliding-window rows of the ids in `chunks` (one text, in consecutive pieces).

    Yields:
      blocks of at most `block` rows: (rows (n, T + 1) int32, scored (n, T) bool: which targets
      rows[:, 1:] a row scores), in text order, every target (position 1 on; after `w.start`,
      position 0 on) once.
    """
    T, S = w.context, w.stride
    buf = np.array([] if w.start is None else [w.start], np.int32)
    base, k = 0, 0  # buf[0]'s position in the text, the next row's index
    for ids in chunks:
        buf = np.concatenate([buf, ids.astype(np.int32)])
        while (n := min(block, (base + len(buf) - T - 1) // S - k + 1)) > 0:  # whole rows
            first = (k + np.arange(n)) * S  # each row's position 0
            rows = buf[(first - base)[:, None] + np.arange(T + 1)]
            previous_end = np.where(first == 0, 0, first - S + T)
            yield rows, first[:, None] + np.arange(1, T + 1) > previous_end[:, None]
            k += n
        buf, base = buf[k * S - base:], k * S
    done = (k - 1) * S + T if k else 0  # targets scored so far
    total = base + len(buf)
    if total - 1 > done:  # the targets left: one padded row
        row = np.full(T + 1, w.pad, np.int32)
        row[:len(buf)] = buf
        position = base + np.arange(1, T + 1)
        yield row[None], ((position > done) & (position < total))[None]


def piece_rows(chunks: Iterable[np.ndarray], w: Windows, block: int = 1024
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The lecture's pieces of the ids in `chunks`: blocks of at most `block` rows (n, T + 2)
    int32 of start, T ids, end, then pads (`data.stream_rows` of one stream), and their scored
    targets (n, T + 1): all but pads."""
    T, buf = w.context, np.zeros(0, np.int32)

    def pieces(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = -(-len(ids) // T)
        rows = np.full((n, T + 2), w.pad, np.int32)
        body = np.full(n * T, w.pad, np.int32)
        body[:len(ids)] = ids
        rows[:, 0], rows[:, 1:T + 1] = w.start, body.reshape(n, T)
        lengths = np.minimum(len(ids) - np.arange(n) * T, T)
        rows[np.arange(n), lengths + 1] = w.end
        return rows, rows[:, 1:] != w.pad

    for ids in chunks:
        buf = np.concatenate([buf, ids.astype(np.int32)])
        whole = len(buf) // T * T
        for i in range(0, whole, block * T):
            yield pieces(buf[i:min(whole, i + block * T)])
        buf = buf[whole:]
    if len(buf):
        yield pieces(buf)


def batched(blocks: Iterable[tuple[np.ndarray, np.ndarray]], batch: int, pad: int
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of (rows (n, R), scored (n, R - 1)) regrouped into exactly `batch` rows, the last
    batch padded with all-pad, unscored rows."""
    rows, scored, held = [], [], 0
    for r, s in blocks:
        rows.append(r)
        scored.append(s)
        held += len(r)
        if held >= batch:
            all_rows, all_scored = np.concatenate(rows), np.concatenate(scored)
            whole = held // batch * batch
            for i in range(0, whole, batch):
                yield all_rows[i:i + batch], all_scored[i:i + batch]
            rows, scored, held = [all_rows[whole:]], [all_scored[whole:]], held - whole
    if held:
        all_rows, all_scored = np.concatenate(rows), np.concatenate(scored)
        yield (data.pad_rows(all_rows, batch, pad),
               np.concatenate([all_scored, np.zeros((batch - held, all_scored.shape[1]), bool)]))


def compile_scores(model, pad: int, mesh, *, details: bool):
    """A compiled (params, rows_BxR, scored_BxT) -> nll_BxT (nats, 0 where not scored), and with
    `details` also each target's rank (1: the likeliest) and the TOP likeliest ids and their
    probabilities, (B, T) and (B, T, TOP)."""

    def scores(params, rows_BxR, scored_BxT):
        rows_BxR = rows_BxR.astype(jnp.int32)
        inputs_BxT, targets_BxT = rows_BxR[:, :-1], rows_BxR[:, 1:]
        valid_BxT = inputs_BxT != pad
        logits = model.apply({"params": params}, jnp.where(valid_BxT, inputs_BxT, 0), valid_BxT)
        logp_BxTxV = jax.nn.log_softmax(
            logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
        targets_BxT = jnp.where(scored_BxT, targets_BxT, 0)
        target_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
        nll_BxT = jnp.where(scored_BxT, -target_BxT, 0.0)
        if not details:
            return nll_BxT
        rank_BxT = 1 + jnp.sum(logp_BxTxV > target_BxT[..., None], axis=-1)
        top_logp, top_ids = jax.lax.top_k(logp_BxTxV, min(TOP, logp_BxTxV.shape[-1]))
        return nll_BxT, rank_BxT, top_ids, jnp.exp(top_logp)

    rows = parallel.split_rows(mesh)
    return jax.jit(scores, in_shardings=(parallel.replicated(mesh), rows, rows))


@dataclass(frozen=True)
class TextReport:
    """A text model's loss on a text: `nats` summed over `tokens` scored targets of a text of
    `chars` characters and `bytes` UTF-8 bytes; `skipped` tokens lay outside the model's
    prediction layer (a transfer run's head over its corpus's tokens), `unknown` characters
    outside its vocabulary (each read and scored as the unknown symbol)."""

    nats: float
    tokens: int
    chars: int
    bytes: int
    skipped: int = 0
    unknown: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        loss = self.nats / max(self.tokens, 1)
        bits = self.nats / _LN2
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                "bits_per_token": loss / _LN2, "bits_per_char": bits / max(self.chars, 1),
                "bits_per_byte": bits / max(self.bytes, 1), "tokens": self.tokens,
                "chars": self.chars, "bytes": self.bytes, "skipped_tokens": self.skipped,
                "unknown_chars": "".join(self.unknown)}


class _Counted:
    """The text pieces of one or more documents, counting their characters and UTF-8 bytes and
    the characters outside a vocabulary, and advancing a progress bar by bytes."""

    def __init__(self, tokenizer, bar):
        self.tokenizer, self.bar = tokenizer, bar
        self.chars = self.bytes = 0
        self.unknown: set[str] = set()

    def encoded(self, pieces: Iterable[str]) -> Iterator[np.ndarray]:
        """The ids of one document's pieces, cut where the tokenizer allows (`cut`)."""
        carry = ""
        for piece in pieces:
            size = len(piece.encode("utf-8", "surrogatepass"))
            self.chars, self.bytes = self.chars + len(piece), self.bytes + size
            self.unknown.update(self.tokenizer.unknown_chars(piece))
            self.bar.update(size)
            text = carry + piece
            cut = self.tokenizer.cut(text)
            if cut:
                yield np.asarray(self.tokenizer.encode(text[:cut]), np.int32)
            carry = text[cut:]
        if carry:
            yield np.asarray(self.tokenizer.encode(carry), np.int32)


def evaluate_text(trained: Trained, documents: Iterable[Iterable[str]], w: Windows, *, mesh,
                  batch_size: int, page_tokens: int = 0, total_bytes: int | None = None,
                  quiet: bool = False) -> tuple[TextReport, TokenScores | None]:
    """The loss of text model `trained` on `documents` (each an iterable of text pieces, cut
    into rows by `w` on its own), `batch_size` rows per compiled call across `mesh`; and, when
    `page_tokens` > 0, the surprisal of the first `page_tokens` scored tokens (`TokenScores`).
    A progress bar of the bytes read goes to a terminal's stderr (of `total_bytes`).
    """
    model, params = Transformer(trained.config.model), trained.params
    n_dev = mesh.devices.size
    batch = -(-batch_size // n_dev) * n_dev
    fast = compile_scores(model, w.pad, mesh, details=False)
    detailed = compile_scores(model, w.pad, mesh, details=True) if page_tokens else None
    covered = _covered(trained)
    params = parallel.place(params, parallel.replicated(mesh))
    split = parallel.split_rows(mesh)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="evaluating",
              disable=True if quiet else None, dynamic_ncols=True, leave=False) as bar:
        counted = _Counted(trained.tokenizer, bar)
        rows_of = piece_rows if w.end is not None else sliding_rows
        blocks = (block for doc in documents for block in rows_of(counted.encoded(doc), w))
        nats, tokens, skipped, page = 0.0, 0, 0, _Page(trained.tokenizer, page_tokens)
        pending = collections.deque()  # one batch in flight while the next is prepared
        for rows, scored in batched(blocks, batch, w.pad):
            if covered is not None:
                inside = covered[np.minimum(rows[:, 1:], len(covered) - 1)]
                skipped += int((scored & ~inside).sum())
                scored = scored & inside
            tokens += int(scored.sum())
            call = detailed if page.wants_more() else fast
            pending.append((rows, scored, call(params, parallel.place(rows, split),
                                               parallel.place(scored, split))))
            if len(pending) > 1:
                nats += page.add(*pending.popleft())
        while pending:
            nats += page.add(*pending.popleft())
    report = TextReport(nats, tokens, counted.chars, counted.bytes, skipped,
                        tuple(sorted(counted.unknown)))
    return report, page.scores() if page_tokens else None


def _covered(trained: Trained) -> np.ndarray | None:
    """Which ids the prediction layer covers, (V + 1,) bool with a final False for the pad;
    None when it covers every id."""
    if trained.targets is None:
        return None
    covered = np.zeros(trained.config.model.vocab_size + 2, bool)
    covered[np.asarray(trained.targets)] = True
    return covered


class _Page:
    """The scored tokens of the first batches, in text order, for the surprisal page."""

    def __init__(self, tokenizer, limit: int):
        self.tokenizer, self.limit = tokenizer, limit
        self.ids, self.nll, self.rank, self.top_ids, self.top_probs = [], [], [], [], []
        self.held = 0
        self._pieces: dict[int, str] = {}

    def wants_more(self) -> bool:
        return self.held < self.limit

    def add(self, rows, scored, out) -> float:
        """Take one batch's result; returns its summed loss (float64)."""
        if not isinstance(out, tuple):
            return float(np.asarray(out, np.float64).sum())
        nll, rank, top_ids, top_probs = (np.asarray(o) for o in out)
        take = min(self.limit - self.held, int(scored.sum()))
        if take > 0:
            self.ids.append(rows[:, 1:][scored][:take])
            for kept, values in ((self.nll, nll), (self.rank, rank), (self.top_ids, top_ids),
                                 (self.top_probs, top_probs)):
                kept.append(values[scored][:take])
            self.held += take
        return float(nll.astype(np.float64).sum())

    def piece(self, i: int) -> str:
        if i not in self._pieces:
            self._pieces[i] = self.tokenizer.decode([i])
        return self._pieces[i]

    def scores(self) -> TokenScores:
        cat = lambda parts, shape: np.concatenate(parts) if parts else np.zeros(shape)
        ids, nll = cat(self.ids, (0,)).astype(int), cat(self.nll, (0,))
        top = cat(self.top_ids, (0, TOP)).astype(int)
        return TokenScores(tuple(map(self.piece, ids)), nll / _LN2, np.exp(-nll),
                           cat(self.rank, (0,)).astype(int),
                           tuple(tuple(map(self.piece, row)) for row in top),
                           cat(self.top_probs, (0, TOP)))


def pretrained(name_or_path: str) -> Trained:
    """An untouched pretrained GPT-2 as a `Trained` of the transfer kind (step 0), judged on
    windows of its whole context."""
    from transformer_jax import gpt2

    model, params, tokenizer = gpt2.from_pretrained(name_or_path)
    config = Config(model.config, TrainConfig(init=name_or_path, seq_len=model.config.max_len))
    return Trained(tasks.KINDS["transfer"], config, params, 0, tokenizer=tokenizer)


@dataclass(frozen=True)
class Text:
    """A text to judge text models on: `name` says what it is; `documents()` reads it afresh
    for each model as documents, each an iterable of text pieces; `size` in bytes; `path` the
    file or directory it is read from (None: a run's validation split)."""

    name: str
    documents: Callable[[], Iterable[Iterable[str]]]
    size: int
    path: str | None = None


def file_text(path: str) -> Text:
    """A file, or a directory's .txt files (`data.iter_text`), read in pieces."""
    where = Path(path)
    if not where.exists():
        raise UserError(f"--data {path} does not exist; give a UTF-8 text file")
    files = sorted(where.glob("*.txt")) if where.is_dir() else [where]
    size = sum(f.stat().st_size for f in files)
    if not size:
        raise UserError(f"--data {path} is empty; give a file with some text")
    return Text(str(path), lambda: [data.iter_text(path, 1 << 20, what="--data")], size,
                str(path))


def validation_split(trained: Trained, name: str) -> Text:
    """Run `name`'s own validation split, from the corpus it recorded: what training scored
    (with --split-docs, its documents of at least --min-len tokens)."""
    tcfg, corpus = trained.config.train, recorded_corpus(trained, name)
    cut = corpus.split(tcfg.val_fraction)
    if tcfg.split_docs is None:  # read in pieces: the corpus may be larger than memory
        size = sum(len(p.encode("utf-8", "surrogatepass")) for p in corpus.pieces(cut))
        return Text(f"validation split of {name}", lambda: [corpus.pieces(cut)], size)
    val_text = corpus.read()[cut:]
    documents = [d for d in data.split_documents(val_text, tcfg.split_docs)
                 if len(trained.tokenizer.encode(d)) >= tcfg.min_len]
    return Text(f"validation split of {name}", lambda: [_pieces(d) for d in documents],
                len(val_text.encode("utf-8", "surrogatepass")))


def recorded_corpus(trained: Trained, name: str) -> Corpus:
    """The corpus that run `name` was trained on, checked against its record."""
    record = trained.corpus
    if not record:
        raise UserError(f"{name} does not record its corpus (trained before evaluate.py "
                        "existed); give the text to judge with --data FILE")
    path = Path(record["path"])
    corpus = Corpus.scan(path) if path.exists() else None
    if corpus is None or corpus.sha256 != record["sha256"]:
        state = "has changed" if corpus is not None else "is gone"
        raise UserError(f"the corpus of {name}, {path}, {state} since training; give the text "
                        "to judge with --data FILE")
    return corpus


def _pieces(text: str, size: int = 1 << 20) -> Iterator[str]:
    """`text` in pieces of `size` characters (a long split's pieces move the progress bar)."""
    for i in range(0, len(text), size):
        yield text[i:i + size]


def judge(trained: Trained, name: str, text: Text | None, *, mesh, context: int | None = None,
          stride: int | None = None, batch_size: int | None = None, page_tokens: int = 0,
          quiet: bool = False) -> tuple[dict, TokenScores | None]:
    """The report of model `trained` (called `name`) on `text`, or, when None, on the run's own
    validation split: for a text model the loss per token, perplexity and bits per token,
    character and byte (`TextReport`) and, with `page_tokens`, its first tokens' surprisal;
    for a series model the one-step error table (`forecast.validate`)."""
    about = {"model": name, "step": trained.step}
    if trained.kind.reader == "forecast":
        if context or stride or page_tokens:
            raise UserError(f"--context, --stride and --html apply to text models; {name} is a "
                            "series model")
        if text is None:
            csv, where = recorded_corpus(trained, name).read(), f"the corpus of {name}"
        else:
            csv, where = data.read_text(text.path), f"--data {text.path}"
        return {**about, "data": where, **forecast.validate(trained, csv, where=where)}, None
    if text is not None and text.path and text.path.lower().endswith(".csv"):
        raise UserError(f"--data {text.path} is a CSV file, but {name} is a text model; give "
                        "it a text file (CSV data is for series runs)")
    text = text or validation_split(trained, name)
    w = windows_for(trained, context, stride)
    report, scores = evaluate_text(trained, text.documents(), w, mesh=mesh,
                                   batch_size=batch_size or trained.config.train.batch_size,
                                   page_tokens=page_tokens, total_bytes=text.size, quiet=quiet)
    if not report.tokens:
        raise UserError(f"{text.name} holds no token to predict; give a longer text")
    return {**about, "data": text.name, "unit": trained.kind.unit(trained.config),
            "context": w.context, "stride": w.stride, **report.to_dict()}, scores


_COLUMNS = (("tokens", "tokens", "{:,}"), ("loss", "nats/token", "{:.4f}"),
            ("perplexity", "perplexity", "{:.3f}"), ("bits_per_token", "bits/token", "{:.4f}"),
            ("bits_per_char", "bits/char", "{:.4f}"), ("bits_per_byte", "bits/byte", "{:.4f}"))


def report_table(reports: list[dict]) -> str:
    """The reports of `judge` as text: one table row per text model, then each series model's
    error table."""
    text = [r for r in reports if "bits_per_char" in r]
    lines = []
    if text:
        names = [f"{r['model']} @ {r['step']}" for r in text]
        width = max(map(len, names + ["model @ step"])) + 2
        cells = [[f.format(r[key]) for key, _, f in _COLUMNS] for r in text]
        widths = [max(len(title), *(len(row[i]) for row in cells)) + 2
                  for i, (_, title, _) in enumerate(_COLUMNS)]
        lines.append(f"{'model @ step':<{width}}" + "".join(
            f"{title:>{w}}" for (_, title, _), w in zip(_COLUMNS, widths)) + "  data")
        lines += [f"{name:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(row, widths))
                  + f"  {r['data']}" for name, row, r in zip(names, cells, text)]
    for r in reports:
        if "rmse" in r:
            lines += [f"{r['model']} @ {r['step']} on {r['data']}: validation loss "
                      f"{r['loss']:.4f}", forecast.validation_table(r)]
    return "\n".join(lines)
