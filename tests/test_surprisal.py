"""The surprisal page: one escaped element per token, the details in one JSON blob that no piece
can break, nothing loaded from outside, and, in a real headless chromium, a 20,000-token page
that opens quickly and shows a token's panel on hover, on tap and from the keyboard."""

from __future__ import annotations

import dataclasses
import html.parser
import json
import math
import time
from pathlib import Path

import browser
import numpy as np
import pytest

from transformer_jax import surprisal
from transformer_jax.surprisal import TokenScores

WORDS = ("the", " the", " cat", " sat", " on", " mat", ".", ",", " and", "\n", "\n\n", " ",
         "  ", "\t", "<b>", " &", "&amp;", '"', "'s", "🙂", "é", " über", "ing", " model",
         " token", " bits", "</script>", "x", " 42", ":", "(", ")")


def scores_of(pieces, bits, rank=None, top=5) -> TokenScores:
    """Scores with the given pieces and bits (NaN: not predicted) and made-up alternatives."""
    bits = np.asarray(bits, np.float64)
    n, seen = len(pieces), ~np.isnan(bits)
    rank = np.where(seen, 1, 0) if rank is None else np.asarray(rank)
    top_pieces = tuple(tuple(f"alt{i}.{j}" for j in range(top)) if s else () for i, s in
                       enumerate(seen))
    top_probs = np.where(seen[:, None], np.full((n, top), 0.1), np.nan)
    return TokenScores(tuple(pieces), bits, 2.0 ** -bits, rank, top_pieces, top_probs)


def synthetic(n: int, seed: int = 0) -> TokenScores:
    """n tokens of made-up text: surprisal mostly low with a long tail, a rank and five
    alternatives per token that agree with its probability (the actual token among them when
    its rank is at most 5); the first token is context only."""
    rng = np.random.default_rng(seed)
    pieces = tuple(rng.choice(WORDS, size=n).tolist())
    rank = np.minimum(rng.geometric(0.45, size=n), 60)
    # The alternatives fall off by a factor 1.7 a rank; the actual token sits at its rank.
    start = rng.uniform(0.05, 0.9, size=n)
    top_probs = start[:, None] * 1.7 ** -np.arange(5)[None, :]
    prob = start * 1.7 ** -(rank - 1.0) * np.where(rank > 5, rng.uniform(0.1, 1, size=n), 1)
    top_pieces = []
    for i in range(n):
        others = [w for w in WORDS if w != pieces[i]]
        row = [others[j] for j in rng.permutation(len(others))[:5]]
        if rank[i] <= 5:
            row[rank[i] - 1] = pieces[i]
        top_pieces.append(tuple(row))
    bits = -np.log2(prob)
    bits[0], prob[0], rank[0], top_probs[0], top_pieces[0] = np.nan, np.nan, 0, np.nan, ()
    return TokenScores(pieces, bits, prob, rank, tuple(top_pieces), top_probs)


class Parsed(html.parser.HTMLParser):
    """What a browser's parser would make of the page: the token spans (index, class, text),
    every script (attributes, text), every attribute, and the text of the style."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tokens, self.scripts, self.attrs, self.style, self.tags = [], [], [], "", []
        self._open = None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attrs.extend(attrs.items())
        if tag == "span" and "data-i" in attrs:
            self.tokens.append([int(attrs["data-i"]), attrs.get("class", ""), ""])
            self._open = self.tokens[-1]
        elif tag == "script":
            self.scripts.append([attrs, ""])
            self._open = self.scripts[-1]
        elif tag == "style":
            self._open = "style"

    def handle_endtag(self, tag):
        self._open = None

    def handle_data(self, data):
        if self._open == "style":
            self.style += data
        elif self._open is not None:
            self._open[-1] += data


def blob_of(parsed: Parsed) -> dict:
    (blob,) = [text for attrs, text in parsed.scripts if attrs.get("type") == "application/json"]
    return json.loads(blob)


HOSTILE = ("Hello", "</script><b>", " & ", "\n", "", '"q" \'r\'', "🙂", "\t<!--", "<script>",
           "</SCRIPT >", "&amp;", "\r\n")


def test_pieces_that_look_like_markup_stay_one_text_element_each():
    bits = [math.nan] + [1.5] * (len(HOSTILE) - 1)
    scores = scores_of(HOSTILE, bits)
    parsed = Parsed(surprisal.page(scores, title="t </title>", summary="a < b & c"))
    assert [i for i, _, _ in parsed.tokens] == list(range(len(HOSTILE)))
    assert [text for _, _, text in parsed.tokens] == list(HOSTILE)
    assert "b" not in parsed.tags  # `<b>` in a piece stayed text
    assert len(parsed.scripts) == 2  # the blob and the code; no piece opened or closed one
    blob = blob_of(parsed)
    assert blob["pieces"] == list(HOSTILE)
    assert blob["bits"] == [None] + [1.5] * (len(HOSTILE) - 1)
    assert blob["rank"] == [0] + [1] * (len(HOSTILE) - 1)
    assert blob["top"][0] == [] and blob["top"][3] == [f"alt3.{j}" for j in range(5)]
    assert blob["top_p"][0] == [] and blob["top_p"][3] == [0.1] * 5


def test_the_blob_round_trips_a_synthetic_text():
    scores = synthetic(300, seed=1)
    blob = blob_of(Parsed(surprisal.page(scores, title="t", summary="s")))
    assert blob["pieces"] == list(scores.pieces)
    assert blob["rank"] == scores.rank.tolist()
    assert blob["top"] == [list(row) for row in scores.top_pieces]
    assert blob["bits"][0] is None and blob["prob"][0] is None
    np.testing.assert_allclose(blob["bits"][1:], scores.bits[1:], rtol=1e-3)
    np.testing.assert_allclose(blob["prob"][1:], scores.prob[1:], rtol=1e-3)
    np.testing.assert_allclose(blob["top_p"][1:], scores.top_probs[1:], rtol=1e-3)


def test_the_page_loads_nothing_from_outside():
    page = surprisal.page(synthetic(50), title="t", summary="s")
    parsed = Parsed(page)
    assert "http://" not in page and "https://" not in page
    assert not [name for name, _ in parsed.attrs if name in ("src", "href", "srcset")]
    assert "url(" not in parsed.style and "@import" not in parsed.style
    (policy,) = [v for k, v in parsed.attrs if k == "content" and "default-src" in v]
    assert "default-src 'none'" in policy


def test_tokens_not_predicted_are_unshaded_and_the_rest_take_their_band():
    scores = scores_of(["a", "b", "c", "d", "e", "f"], [math.nan, 0.0, 1.2, 11.9, 12.0, 40.0])
    classes = [cls for _, cls, _ in Parsed(surprisal.page(scores, title="", summary="")).tokens]
    assert classes == ["t", "t s0", "t s2", "t s23", "t s24", "t s24"]
    assert surprisal.colour(0.0) == "#ffffff" and surprisal.colour(99.0) == "#e0464a"


def test_a_token_of_probability_zero_is_infinitely_surprising_and_still_valid_json():
    scores = scores_of(["a", "b"], [math.nan, math.inf])
    parsed = Parsed(surprisal.page(scores, title="", summary=""))
    assert [cls for _, cls, _ in parsed.tokens] == ["t", "t s24"]
    assert blob_of(parsed)["bits"] == [None, "Infinity"] and blob_of(parsed)["prob"] == [None, 0]


def test_per_token_markup_stays_small():
    n = 2_000
    page = surprisal.page(synthetic(n), title="t", summary="s")
    assert len(page.encode()) / n < 250  # span and blob entry together, bytes per token


@pytest.mark.parametrize("change, message", [
    (dict(bits=np.zeros(3)), "bits has shape"),
    (dict(prob=np.zeros((4, 1))), "prob has shape"),
    (dict(rank=np.zeros(4)), "rank must hold integers"),
    (dict(top_probs=np.zeros((4, 5, 1))), "top_probs has shape"),
    (dict(top_pieces=((),) * 3), "top_pieces has 3 rows"),
    (dict(top_pieces=(("a",),) * 4), "top_pieces row 0 has 1 pieces"),
    (dict(pieces=("a", "b", "c", 4)), "pieces must all be strings"),
])
def test_shapes_are_checked(change, message):
    good = scores_of(["a", "b", "c", "d"], [math.nan, 1.0, 2.0, 3.0])
    fields = dict(pieces=good.pieces, bits=good.bits, prob=good.prob, rank=good.rank,
                  top_pieces=good.top_pieces, top_probs=good.top_probs)
    with pytest.raises(ValueError, match=message):
        TokenScores(**(fields | change))


def test_write_page_writes_utf8(tmp_path):
    path = surprisal.write_page(scores_of(["🙂", " é"], [math.nan, 2.0]), tmp_path / "p.html",
                                title="emoji", summary="s")
    assert path == tmp_path / "p.html"
    assert [text for _, _, text in Parsed(path.read_text(encoding="utf-8")).tokens] == ["🙂", " é"]


def test_a_missing_browser_skips_unless_required(monkeypatch, tmp_path):
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setattr(browser, "CHROMEDRIVER", Path(__file__))  # present: only one missing
    monkeypatch.delenv("TJ_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium not installed"):
        browser.or_skip()
    monkeypatch.setenv("TJ_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="TJ_REQUIRE_BROWSER=1 but"):
        browser.or_skip()


def shown(piece: str) -> str:
    """A piece as the panel writes it: whitespace made visible."""
    return piece.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t") or "(empty)"


# The panel's parts, read in one round trip: the token, its stats line, and the alternatives
# (text, probability, which row is the actual token).
PANEL = """var tip = document.getElementById("tip"), rows = [...tip.querySelectorAll("tr")];
return {piece: tip.querySelector(".piece").textContent,
        stats: tip.querySelector(".stats, .none").textContent,
        alts: rows.map(r => r.querySelector("td.alt").textContent),
        probs: rows.map(r => Number(r.querySelector("td.p").textContent)),
        actual: rows.flatMap((r, i) => r.classList.contains("actual") ? [i] : [])};"""


def hovered(driver, index: int) -> dict:
    """The panel's parts once the mouse is on token `index`."""
    browser.hover(driver, index)
    return driver.execute_script(PANEL)


@pytest.mark.slow
def test_twenty_thousand_tokens_open_fast_and_show_their_panel_in_chromium(tmp_path):
    browser.or_skip()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    n = 20_000
    scores = synthetic(n)
    bits, prob = scores.bits.copy(), scores.prob.copy()
    bits[7], prob[7] = math.inf, 0.0  # a token the model gave no chance at all
    scores = dataclasses.replace(scores, bits=bits, prob=prob)
    path = surprisal.write_page(scores, tmp_path / "page.html", title="synthetic surprisal",
                                summary="made up: 3.00 bits per token")
    began = time.perf_counter()
    with browser.chromium() as driver:
        started = time.perf_counter()
        driver.get(path.as_uri())
        loaded = time.perf_counter()
        assert loaded - started < 10, f"page load took {loaded - started:.1f} s"
        assert driver.title == "synthetic surprisal"
        assert driver.find_element(By.TAG_NAME, "h1").text == "synthetic surprisal"
        count = "return document.querySelectorAll('#text [data-i]').length"
        assert driver.execute_script(count) == n
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0

        i = next(i for i in range(12_345, n) if 2 <= scores.rank[i] <= 5)
        got = hovered(driver, i)
        assert got["piece"] == shown(scores.pieces[i])
        p, bits, rank = got["stats"].split(" · ")
        assert float(p.removeprefix("p = ")) == pytest.approx(scores.prob[i], rel=6e-3)
        assert (bits, rank) == (f"{scores.bits[i]:.2f} bits", f"rank {scores.rank[i]}")
        assert got["alts"] == [shown(p) for p in scores.top_pieces[i]]
        np.testing.assert_allclose(got["probs"], scores.top_probs[i], rtol=6e-3)
        assert got["actual"] == [scores.rank[i] - 1]

        first = hovered(driver, 0)
        assert first["stats"] == "not predicted (context only)" and first["alts"] == []
        assert hovered(driver, 7)["stats"].startswith("p = 0.00 · Infinity bits")

        # A tap pins the panel: it stays when the pointer leaves; arrows step; Esc closes.
        j = 500
        tip = driver.find_element(By.ID, "tip")
        driver.find_element(By.CSS_SELECTOR, f'#text [data-i="{j}"]').click()
        ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
        assert tip.is_displayed()
        assert driver.execute_script(PANEL)["piece"] == shown(scores.pieces[j])
        ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
        assert driver.execute_script(PANEL)["piece"] == shown(scores.pieces[j + 1])
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()
        assert not tip.is_displayed()

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    assert time.perf_counter() - began < 25
