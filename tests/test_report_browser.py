"""The report as a person sees it: served over HTTP, opened in headless Chromium.

Needs Debian's chromium and chromium-driver (scripts/install-chromium.sh) and the selenium
package. Missing, the test fails with a message saying so; TICKETLAB_SKIP_BROWSER=1 skips it.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from report_fixtures import make_fake_run
from ticketlab.io.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)


def _require_browser() -> None:
    if os.environ.get("TICKETLAB_SKIP_BROWSER") == "1":
        pytest.skip("TICKETLAB_SKIP_BROWSER=1")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"headless browser test needs {' and '.join(missing)}: run scripts/install-chromium.sh "
            "(apt-get install chromium chromium-driver), or set TICKETLAB_SKIP_BROWSER=1 to skip",
            pytrace=False,
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail(
            "headless browser test needs the selenium package: pip install selenium "
            "(or set TICKETLAB_SKIP_BROWSER=1 to skip)",
            pytrace=False,
        )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


@pytest.fixture
def serve() -> Iterator:
    """serve(folder) -> base URL of that folder on 127.0.0.1 (a free port)."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let selenium-manager download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _open_and_check(driver, url: str, screenshot: Path) -> list[dict]:
    """Load the page, check every image decoded and nothing failed; full-page screenshot."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && "
            "Array.from(document.images).every(i => i.complete)"
        )
    )
    images = driver.execute_script(
        "return Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
        "naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight, shown: i.width}))"
    )
    assert images, "the page shows no image"
    for image in images:
        assert image["naturalWidth"] > 0 and image["naturalHeight"] > 0, f"not loaded: {image}"
        assert image["shown"] > 0, f"not displayed: {image}"
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    base = url.rsplit("/", 1)[0] + "/"
    assert all(name.startswith(base) for name in resources), f"external request: {resources}"
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"browser console errors: {errors}"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height, 800), 12000))
    assert driver.save_screenshot(str(screenshot))
    data = screenshot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    return images


def test_report_renders_in_chromium(tmp_path: Path, browser, serve) -> None:
    run = make_fake_run(tmp_path / "run", levels=5, replicates=2, diverged=[(3, "reinit", 0)])
    index = write_report([run])
    images = _open_and_check(browser, serve(index.parent) + "index.html", tmp_path / "page.png")
    assert {i["src"] for i in images} == {
        "accuracy.png",
        "early_stop.png",
        "curves.png",
        "layers.png",
        "untrained.png",
    }
    text = browser.find_element("tag name", "body").text
    assert "Smallest winning ticket" in text
    assert "1 diverged" in text
    assert browser.title.startswith("ticketlab report")


def test_overlay_report_renders_in_chromium(tmp_path: Path, browser, serve) -> None:
    a = make_fake_run(tmp_path / "A", levels=3)
    b = make_fake_run(tmp_path / "B", levels=4, summary=False)
    index = write_report([a, b], tmp_path / "compare")
    images = _open_and_check(browser, serve(index.parent) + "index.html", tmp_path / "page.png")
    assert len(images) == 5
    text = browser.find_element("tag name", "body").text
    assert "A:" in text and "B:" in text and "not finished" in text
