"""Debian's chromium, headless, driven by selenium through the system's chromedriver (nothing is
downloaded): the chat page's test, and pictures of the charts as a person would see them."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def browser():
    """A headless chromium, or a skip where chromium and chromedriver are not installed."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    # chromium's profile and the folders it makes in TMPDIR (its singleton socket, left behind when the
    # driver ends it) in one folder of the test's, removed on quit
    scratch = tempfile.mkdtemp(prefix="fate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,2400", "--hide-scrollbars", f"--user-data-dir={scratch}/profile"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver, env={**os.environ, "TMPDIR": scratch})
    try:
        page = webdriver.Chrome(options=options, service=service)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    quit_page = page.quit

    def quit_and_clean() -> None:
        try:
            quit_page()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    page.quit = quit_and_clean
    return page


def picture(path: Path, png: Path):
    """`path` (an SVG or an HTML page) rendered by chromium, saved as `png`, and read back as a
    Pillow image of the page's first element (the SVG itself, or the page's body)."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    page = browser()
    try:
        page.get(path.resolve().as_uri())
        element = page.find_element(By.CSS_SELECTOR, "svg" if path.suffix == ".svg" else "body")
        png.write_bytes(element.screenshot_as_png)
    finally:
        page.quit()
    return Image.open(io.BytesIO(png.read_bytes())).convert("RGB")


def colours(image, least_share: float = 0.0005) -> set[tuple[int, int, int]]:
    """The saturated colours that cover at least `least_share` of the picture (greys and white left out)."""
    counts = image.getcolors(maxcolors=1 << 20) or []
    total = image.width * image.height
    return {c for n, c in counts if n >= least_share * total and max(c) - min(c) > 60}
