"""A real browser for the tests and the docs: Debian's chromium, headless, driven by selenium
through Debian's chromedriver (never a browser or driver that a Python package downloads).

`chromium()` yields a driver and always quits it; `screenshot(page, png)` saves a picture of a
page, a token hovered if asked. From the shell:

    python tests/browser.py PAGE.html OUT.png [TOKEN_INDEX]
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Headless in a container without internet: no sandbox (root), no GPU, no /dev/shm (small in
# containers), and none of the background connections (updates, sync, field trials) that would
# each be refused here.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync")


def missing() -> str | None:
    """Why the browser cannot start here (a sentence naming what is not installed), or None."""
    absent = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if absent:
        return (f"{' and '.join(absent)} not installed "
                "(apt-get install chromium chromium-driver)")
    return None


def or_skip() -> None:
    """In a test: skip when chromium or its driver is not installed, unless
    TJ_REQUIRE_BROWSER=1 (CI), where a missing browser is a failure."""
    import pytest

    if reason := missing():
        if os.environ.get("TJ_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TJ_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 800) -> Iterator:
    """A headless chromium WebDriver with a fresh profile and a `width` x `height` window; the
    browser's console is kept (`driver.get_log("browser")`). Quits the browser on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="tj-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                                  options=options)
        try:
            yield driver
        finally:
            driver.quit()


def hover(driver, index: int, timeout: float = 5.0):
    """Move the mouse onto token `index` of the open surprisal page (scrolled to the middle of
    the window first) and wait until its panel shows; return the panel element."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    token = driver.find_element(By.CSS_SELECTOR, f'#text [data-i="{index}"]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", token)
    ActionChains(driver).move_to_element(token).perform()
    tip = driver.find_element(By.ID, "tip")
    WebDriverWait(driver, timeout).until(lambda _: tip.is_displayed())
    return tip


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1200,
               height: int = 800, hover_index: int | None = None) -> Path:
    """Open `html_path` in a `width` x `height` window, hover token `hover_index` if given (so
    that its panel shows), and save what the window shows as a PNG at `png_path`."""
    with chromium(width, height) as driver:
        driver.get(Path(html_path).resolve().as_uri())
        if hover_index is not None:
            hover(driver, hover_index)
        if not driver.save_screenshot(str(png_path)):
            raise RuntimeError(f"chromium could not write {png_path}")
    return Path(png_path)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or (len(args) == 3 and not args[2].isdigit()):
        print("usage: python tests/browser.py PAGE.html OUT.png [TOKEN_INDEX]", file=sys.stderr)
        sys.exit(2)
    if reason := missing():
        print(f"error: {reason}", file=sys.stderr)
        sys.exit(2)
    print(screenshot(args[0], args[1], hover_index=int(args[2]) if len(args) == 3 else None))


if __name__ == "__main__":
    main()
