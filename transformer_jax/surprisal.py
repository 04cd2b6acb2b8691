"""A text with each token shaded by its surprisal: `TokenScores` holds what a model made of each
token of an evaluated text, and `page` turns it into one self-contained HTML document.

The page opens from disk and fetches nothing (inline CSS and script, a Content-Security-Policy
that forbids any load). Per token it holds one small `<span>`; everything the hover or tap
panel shows (probability, bits, rank, the likeliest alternatives) sits in one JSON blob that a
single delegated listener reads by index, so that 20,000 tokens stay quick to open and to use.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path

import numpy as np

STEP = 0.5  # bits per shade: each token's background is the colour of its half-bit band
TOP_BITS = 12.0  # the last band, everything at or above it
# The colour scale: (bits, colour) stops, linear in between. Text stays black on every shade.
STOPS = ((0.0, "#ffffff"), (2.0, "#fff1a8"), (4.0, "#ffd166"), (8.0, "#f4845f"),
         (12.0, "#e0464a"))
TICKS = (0, 2, 4, 8, 12)
# The browser itself refuses to load anything: only the page's own inline style and script run.
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


@dataclasses.dataclass(frozen=True, eq=False)
class TokenScores:
    """What a model made of each of the N tokens of a text.

    Attributes:
        pieces: each token's text as decoded; any string, empty included.
        bits: (N,) float, surprisal -log2 p of the token given those before it; NaN for a token
            that was not predicted (the first of a text, which is only context).
        prob: (N,) float, the model's probability of the token; NaN where not predicted.
        rank: (N,) int, 1 where the token was the model's likeliest; 0 where not predicted.
        top_pieces: N rows, each the K likeliest tokens' text at that position (K = 5 in
            practice), likeliest first; an empty row where not predicted.
        top_probs: (N, K) float, their probabilities (ignored in a row not predicted).
    """

    pieces: tuple[str, ...]
    bits: np.ndarray
    prob: np.ndarray
    rank: np.ndarray
    top_pieces: tuple[tuple[str, ...], ...]
    top_probs: np.ndarray

    def __post_init__(self):
        n = len(self.pieces)
        if not all(isinstance(piece, str) for piece in self.pieces):
            raise ValueError("pieces must all be strings")
        arrays = {name: np.asarray(getattr(self, name), None if name == "rank" else np.float64)
                  for name in ("bits", "prob", "rank", "top_probs")}
        for name in ("bits", "prob", "rank"):
            if arrays[name].shape != (n,):
                raise ValueError(f"{name} has shape {arrays[name].shape}; expected ({n},), one "
                                 "value per piece")
        if not np.issubdtype(arrays["rank"].dtype, np.integer):
            raise ValueError(f"rank must hold integers, not {arrays['rank'].dtype}")
        if arrays["top_probs"].ndim != 2 or len(arrays["top_probs"]) != n:
            raise ValueError(f"top_probs has shape {arrays['top_probs'].shape}; expected ({n}, K)")
        k = arrays["top_probs"].shape[1]
        if len(self.top_pieces) != n:
            raise ValueError(f"top_pieces has {len(self.top_pieces)} rows; expected {n}")
        for i, row in enumerate(self.top_pieces):
            if len(row) not in (0, k):
                raise ValueError(f"top_pieces row {i} has {len(row)} pieces; expected {k} "
                                 "(or none where the token was not predicted)")
        object.__setattr__(self, "pieces", tuple(self.pieces))
        object.__setattr__(self, "top_pieces", tuple(tuple(row) for row in self.top_pieces))
        for name, value in arrays.items():
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.pieces)


def colour(bits: float) -> str:
    """The `#rrggbb` shade of a surprisal in bits, on the scale of STOPS (clamped at its ends)."""
    xs = [b for b, _ in STOPS]
    rgb = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for _, c in STOPS], np.float64)
    channels = [round(float(np.interp(bits, xs, rgb[:, j]))) for j in range(3)]
    return "#" + "".join(f"{c:02x}" for c in channels)


def bands(bits_N: np.ndarray) -> np.ndarray:
    """(N,) int: each token's shade band (0 .. TOP_BITS/STEP), -1 where bits is NaN."""
    top = int(TOP_BITS / STEP)
    bits_N = np.asarray(bits_N, np.float64)
    safe = np.nan_to_num(bits_N, nan=0.0, posinf=TOP_BITS)
    band = np.clip(np.floor(np.maximum(safe, 0.0) / STEP), 0, top).astype(int)
    return np.where(np.isnan(bits_N), -1, band)


def _css() -> str:
    top = int(TOP_BITS / STEP)
    shades = "\n".join(f".s{k}{{background:{colour(min((k + 0.5) * STEP, TOP_BITS))}}}"
                       for k in range(top + 1))
    gradient = ", ".join(f"{c} {100 * b / TOP_BITS:g}%" for b, c in STOPS)
    return _STYLE.replace("GRADIENT", gradient) + shades


def _legend() -> str:
    ticks = "".join(f'<span style="left:{100 * t / TOP_BITS:g}%">{t}{"+" if t == TOP_BITS else ""}'
                    "</span>" for t in TICKS)
    return ('<div class="legend"><span class="name">surprisal (bits)</span>'
            f'<div class="scale"><div class="bar"></div><div class="ticks">{ticks}</div></div>'
            '<span class="blank">abc</span><span class="name">not predicted</span>'
            '<span class="hint">hover or tap a token; then arrow keys step, Esc closes</span>'
            '</div>')


def _tokens(scores: TokenScores) -> str:
    """One `<span class="t sK" data-i="I">` per token, its piece escaped; no shade where NaN."""
    out = []
    for i, (piece, band) in enumerate(zip(scores.pieces, bands(scores.bits))):
        cls = "t" if band < 0 else f"t s{band}"
        out.append(f'<span class="{cls}" data-i="{i}">{html.escape(piece, quote=False)}</span>')
    return "".join(out)


def _number(x: float) -> float | str | None:
    """x to four significant digits (small enough for a 20,000-token blob) for JSON: None for
    NaN, "Infinity" or "-Infinity" (which JavaScript's Number reads) for an infinity."""
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return float(f"{x:.4g}")


def blob(scores: TokenScores) -> str:
    """The per-token details as JSON columns (numbers as `_number` writes them), safe inside a
    `<script>`: every `<`, `>` and `&` is written as a \\u escape, so that no piece can close
    the script or open a comment in it."""
    data = {
        "pieces": list(scores.pieces),
        "bits": [_number(b) for b in scores.bits.tolist()],
        "prob": [_number(p) for p in scores.prob.tolist()],
        "rank": [int(r) for r in scores.rank.tolist()],
        "top": [list(row) for row in scores.top_pieces],
        "top_p": [[_number(p) for p in probs] if row else []
                  for row, probs in zip(scores.top_pieces, scores.top_probs.tolist())],
    }
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char in "<>&":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def page(scores: TokenScores, *, title: str, summary: str) -> str:
    """One self-contained HTML document showing the text of `scores` shaded by surprisal,
    with `title` and the `summary` line (e.g. bits per token) above a legend."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{html.escape(title)}</title>
<style>
{_css()}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="summary">{html.escape(summary)}</p>
{_legend()}
<div id="text">{_tokens(scores)}</div>
<div id="tip" role="tooltip" hidden></div>
<script type="application/json" id="scores">{blob(scores)}</script>
<script>
{_SCRIPT}
</script>
</body>
</html>
"""


def write_page(scores: TokenScores, path: str | Path, *, title: str, summary: str) -> Path:
    """Write `page(scores, ...)` to `path` as UTF-8; return the path."""
    path = Path(path)
    path.write_text(page(scores, title=title, summary=summary), encoding="utf-8")
    return path


_STYLE = """\
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b;
       background: #fff; max-width: 64rem; margin: 0 auto; padding: 1.2rem 1.5rem 4rem; }
h1 { font-size: 1.35rem; margin: 0 0 .2rem; }
.summary { margin: 0 0 .8rem; color: #444; }
.legend { display: flex; flex-wrap: wrap; align-items: center; gap: .4rem .8rem;
          font-size: 13px; color: #444; margin-bottom: .9rem; }
.scale { position: relative; width: 16rem; padding-bottom: 1.1rem; }
.scale .bar { height: .8rem; border: 1px solid #bbb; border-radius: 2px;
       background: linear-gradient(to right, GRADIENT); }
.ticks span { position: absolute; top: .95rem; transform: translateX(-50%); font-size: 12px; }
.ticks span:last-child { transform: translateX(-70%); }
.legend .blank { border: 1px dashed #bbb; padding: 0 .2rem; font-size: 12px; }
.hint { margin-left: auto; color: #777; }
#text { font: 14px/1.75 ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono",
        monospace; white-space: pre-wrap; overflow-wrap: anywhere; border: 1px solid #ddd;
        border-radius: 6px; padding: .9rem 1rem; }
.t { border-radius: 2px; }
.t:empty { display: inline-block; width: .3em; height: 1.1em; vertical-align: text-bottom; }
#text .t:hover, #text .t.on { outline: 2px solid #2653a6; outline-offset: 0; }
#tip { position: fixed; z-index: 10; pointer-events: none; min-width: 14rem; max-width: 24rem;
       background: #fff; border: 1px solid #999; border-radius: 6px; padding: .5rem .7rem;
       box-shadow: 0 3px 12px rgba(0, 0, 0, .18); font: 13px/1.45 system-ui, sans-serif; }
#tip[hidden] { display: none; }
#tip .piece, #tip td.alt { font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono",
                           monospace; white-space: pre; }
#tip .piece { font-size: 15px; font-weight: 600; padding: 0 .25rem; border-radius: 3px; }
#tip .ws { color: #6b6b6b; font-weight: 400; }
#tip .stats { margin: .25rem 0 .35rem; color: #333; }
#tip table { border-collapse: collapse; width: 100%; }
#tip td { padding: 1px .3rem; vertical-align: middle; }
#tip td.n { color: #888; text-align: right; width: 1.2rem; }
#tip td.p { text-align: right; width: 3.6rem; font-variant-numeric: tabular-nums; }
#tip td.len { width: 4rem; }
#tip td.len div { height: .55rem; background: #7a9cd6; border-radius: 1px; }
#tip tr.actual { background: #e6eeff; font-weight: 600; }
#tip .none { color: #666; font-style: italic; }
"""

# One listener per kind of event, on the text (delegated), never one per token. The panel is
# built with textContent only, so no piece is ever parsed as markup.
_SCRIPT = r"""(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("scores").textContent);
  var text = document.getElementById("text");
  var tip = document.getElementById("tip");
  var current = null, pinned = false;
  var SHOWN = {" ": "\u2423", "\n": "\\n", "\t": "\\t", "\r": "\\r"};

  function el(tag, cls, content) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (content !== undefined) e.textContent = content;
    return e;
  }
  // A piece with its whitespace made visible: a space as a visible-space sign, a newline as \n.
  function visible(piece) {
    var out = el("span", "piece");
    if (piece === "") { out.appendChild(el("span", "ws", "(empty)")); return out; }
    var plain = "";
    for (var ch of piece) {
      var code = ch.codePointAt(0);
      var shown = SHOWN[ch] || ((code < 32 || code === 127) ?
        "\\x" + code.toString(16).padStart(2, "0") : null);
      if (shown === null) { plain += ch; continue; }
      if (plain) { out.appendChild(document.createTextNode(plain)); plain = ""; }
      out.appendChild(el("span", "ws", shown));
    }
    if (plain) out.appendChild(document.createTextNode(plain));
    return out;
  }
  function num(x) { return x === null ? NaN : Number(x); }
  function fmt(p) { return isNaN(p) ? "?" : p >= 0.9995 ? "1" : p.toPrecision(3); }

  function fill(i) {
    tip.textContent = "";
    var head = el("div");
    head.appendChild(visible(data.pieces[i]));
    tip.appendChild(head);
    if (data.bits[i] === null) {
      tip.appendChild(el("div", "none", "not predicted (context only)"));
      return;
    }
    tip.appendChild(el("div", "stats", "p = " + fmt(num(data.prob[i])) + " \u00b7 " +
      num(data.bits[i]).toFixed(2) + " bits \u00b7 rank " + data.rank[i]));
    var table = el("table");
    data.top[i].forEach(function (alt, j) {
      var row = el("tr", j + 1 === data.rank[i] ? "actual" : "");
      row.appendChild(el("td", "n", String(j + 1)));
      row.appendChild(el("td", "alt")).appendChild(visible(alt));
      var p = num(data.top_p[i][j]);
      row.appendChild(el("td", "p", fmt(p)));
      var cell = el("td", "len"), length = el("div");
      length.style.width = Math.max(1, Math.round(100 * (p || 0))) + "%";
      cell.appendChild(length);
      row.appendChild(cell);
      table.appendChild(row);
    });
    tip.appendChild(table);
  }
  function place(token) {
    var r = token.getClientRects()[0] || token.getBoundingClientRect();
    var w = tip.offsetWidth, h = tip.offsetHeight, gap = 6;
    var top = r.bottom + gap;
    if (top + h > window.innerHeight - 4) top = Math.max(4, r.top - h - gap);
    var left = Math.min(Math.max(4, r.left), window.innerWidth - w - 4);
    tip.style.top = top + "px";
    tip.style.left = Math.max(4, left) + "px";
  }
  function show(token) {
    if (current) current.classList.remove("on");
    current = token;
    token.classList.add("on");
    fill(Number(token.dataset.i));
    tip.hidden = false;
    place(token);
  }
  function hide() {
    if (current) current.classList.remove("on");
    current = null; pinned = false;
    tip.hidden = true;
  }
  function tokenOf(target) { return target.closest ? target.closest("#text .t") : null; }

  text.addEventListener("mouseover", function (e) {
    var token = tokenOf(e.target);
    if (token && !pinned) show(token);
  });
  text.addEventListener("mouseleave", function () { if (!pinned) hide(); });
  // A tap or click pins the panel to a token (touch has no hover); again, or elsewhere, unpins.
  document.addEventListener("click", function (e) {
    var token = tokenOf(e.target);
    if (!token) { hide(); return; }
    if (pinned && token === current) { hide(); return; }
    show(token);
    pinned = true;
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape") { hide(); return; }
    if (!current || (e.key !== "ArrowRight" && e.key !== "ArrowLeft")) return;
    var i = Number(current.dataset.i) + (e.key === "ArrowRight" ? 1 : -1);
    var token = text.children[Math.min(Math.max(i, 0), text.children.length - 1)];
    if (!token) return;
    e.preventDefault();
    show(token);
    pinned = true;
    token.scrollIntoView({block: "nearest"});
    place(token);
  });
  window.addEventListener("scroll", function () { if (current) place(current); },
                          {passive: true});
})();"""
