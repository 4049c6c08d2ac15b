"""The real app in a real browser: `streamlit run app.py` driven by headless Chromium.

Chromium comes from Debian (`apt-get install chromium`, which `.ci/run` does); browser
downloads such as `playwright install` are blocked here. Without it this test fails, on
purpose: CI must run it.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
START_TIMEOUT_S = 120
RUN_TIMEOUT_MS = 180_000


def chromium_path() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(
        "Chromium is missing: install it with `apt-get install -y chromium` "
        "(.ci/run does this); set CHROMIUM=/path/to/chromium to use another build"
    )


def die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, even if it is killed (Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"streamlit exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(
        f"streamlit did not become healthy in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
    )


@pytest.fixture
def app_url(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path):
    """`streamlit run app.py` on a free loopback port, stopped after the test."""
    cache = tmp_path_factory.getbasetemp() / "tokenscope-cache"  # shared with test_app
    cache.mkdir(exist_ok=True)
    port = free_port()
    env = {**os.environ, "TOKENSCOPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "streamlit.log"
    command = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
        "--server.headless", "true",
        "--server.address", "127.0.0.1",
        "--server.port", str(port),
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def photo() -> bytes:
    y, x = np.mgrid[0:240, 0:360]
    array = np.stack([x * 255 // 360, y * 255 // 240, (x + y) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def wait_idle(page) -> None:
    """Until the app has finished its run (the 'Running…' status widget is gone)."""
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
        timeout=RUN_TIMEOUT_MS,
    )


def open_explore(browser, app_url: str):
    """A page on the app's start (Explore) once its first run has drawn; (page, main)."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(app_url, wait_until="domcontentloaded")
    main = page.locator('[data-testid="stMain"]')
    main.get_by_text("Merged-token segments").wait_for(timeout=RUN_TIMEOUT_MS)
    wait_idle(page)
    return page, main


@pytest.mark.browser
@pytest.mark.slow
def test_upload_shows_overlays_and_charts(app_url: str, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page, main = open_explore(browser, app_url)

            uploader = page.locator('[data-testid="stSidebar"] .st-key-upload input[type="file"]')
            uploader.set_input_files(
                files=[{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": photo()}]
            )
            sidebar = page.locator('[data-testid="stSidebar"]')
            sidebar.get_by_text("360×240 px resized to", exact=False).wait_for(
                timeout=RUN_TIMEOUT_MS
            )
            wait_idle(page)

            overlay = main.locator('[data-testid="stImage"] img').first
            overlay.wait_for(timeout=RUN_TIMEOUT_MS)
            assert overlay.evaluate("img => img.complete && img.naturalWidth") >= 448
            chart = main.locator(".js-plotly-plot").first
            chart.wait_for(timeout=RUN_TIMEOUT_MS)
            assert chart.is_visible()
            assert page.locator('[data-testid="stException"]').count() == 0
            page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.browser
@pytest.mark.slow
def test_tradeoff_page_draws_a_curve(app_url: str, tmp_path: Path):
    """A newcomer's sweep: two sample images, ToMe at three costs; the curve gets drawn."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"{app_url}/tradeoff", wait_until="domcontentloaded")
            main = page.locator('[data-testid="stMain"]')
            main.get_by_role("button", name="Run sweep").wait_for(timeout=RUN_TIMEOUT_MS)
            wait_idle(page)
            limit = main.locator(".st-key-sweep_limit input")
            limit.fill("2")  # the first two sample images
            limit.press("Enter")
            wait_idle(page)
            # ToMe only: empty the multiselect with Backspace, then pick ToMe.
            methods = main.locator(".st-key-sweep_methods input")
            methods.click()
            for _ in range(12):
                methods.press("Backspace")
            methods.fill("ToMe")
            methods.press("Enter")
            page.keyboard.press("Escape")
            wait_idle(page)
            assert main.locator(".st-key-sweep_methods").inner_text().count("×") <= 1
            main.get_by_role("button", name="Run sweep").click()
            main.get_by_text("Done:", exact=False).wait_for(timeout=RUN_TIMEOUT_MS)
            wait_idle(page)
            chart = main.locator(".st-key-tradeoff_chart .js-plotly-plot").last
            chart.wait_for(timeout=RUN_TIMEOUT_MS)
            markers = chart.locator(".scatterlayer .trace .points path")
            assert markers.count() >= 3  # the full model and at least two ToMe points
            assert page.locator('[data-testid="stException"]').count() == 0
            chart.screenshot(path=str(tmp_path / "tradeoff.png"))
            # One chart once the page has settled (the fragment's last frame can linger for
            # a moment while the whole page reruns at the end of the sweep).
            page.wait_for_function(
                "() => document.querySelectorAll("
                "'[data-testid=\"stMain\"] .st-key-tradeoff_chart').length === 1",
                timeout=15_000,
            )
            # Selecting a ToMe point opens its schedule in Explore.
            chart.locator(".scatterlayer .trace").filter(
                has=page.locator("path.point")
            ).nth(1).locator("path.point").first.click(force=True)
            main.get_by_text("Merged-token segments").wait_for(timeout=RUN_TIMEOUT_MS)
            wait_idle(page)
            text = page.locator(".st-key-schedule_text textarea").input_value()
            assert text.startswith("tome:r="), text
        finally:
            browser.close()
