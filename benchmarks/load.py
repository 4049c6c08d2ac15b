"""Load test: concurrent browser sessions against the real Streamlit server, on loopback.

The server is Streamlit's own (``streamlit.web.bootstrap.run``, what ``streamlit run``
calls) in this process, listening on 127.0.0.1 only, so that the shared model can be
hashed at the end. Headless Chromium (Debian's, ``/usr/bin/chromium``) opens
``--sessions`` browser contexts, one session each, which at the same time:

- open Explore, pick their own sample image and schedules, read the GMACs and the
  feature fidelity, and move the layer slider;
- upload an image of their own (every other session);
- run a small sweep on Trade-off (sessions 0 and 1).

Checked: no exception or error box on any page, no failed request and no HTTP error
(a broken picture is a 404 on ``/media/``), every number equal to the same run done here
alone (no mixed results), and the shared model's state hash unchanged. ``--uploads N``
then has one session upload N distinct images and reports the server's memory.

    python benchmarks/load.py --sessions 8 --rounds 2
    python benchmarks/load.py --sessions 1 --rounds 0 --uploads 200
    TOKENSCOPE_MEDIA_GRACE_S=0 python benchmarks/load.py   # Streamlit's own media cleanup
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SAMPLES = ("astronaut", "chelsea (cat)", "coffee", "rocket")
SCHEDULES = (
    "tome:r=8",
    "evit:keep=0.7@3,6,9",
    "tome:r=4@0-5",
    "topk:keep=0.5@6",
    "evit:keep=0.5@3,6,9",
    "tome:r=12",
)
TIMEOUT_MS = 240_000


@dataclass
class SessionLog:
    """What one browser session saw."""

    index: int
    readings: list[dict] = field(default_factory=list)  # image, schedule, gmacs, fidelity
    http_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    blocked_external: list[str] = field(default_factory=list)  # never let out of loopback
    console_errors: list[str] = field(default_factory=list)
    error_boxes: list[str] = field(default_factory=list)
    broken_images: int = 0
    retyped: int = 0  # schedules typed again: the first keystrokes were lost in a rerun
    problem: str = ""


# --------------------------------------------------------------------------- the server side


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def shared_model_hash() -> str:
    """sha256 of the shared default model's tensors, as the server's sessions hold it."""
    from app_pages import model_inputs

    model = model_inputs.cached_model("default", "default", "cpu")
    digest = hashlib.sha256()
    for key, value in sorted(model.module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    for method, weights in sorted(model.learned.items()):
        for layer, module in sorted(weights.modules.items()):
            for key, value in sorted(module.state_dict().items()):
                digest.update(f"{method}.{layer}.{key}".encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def expected_reading(sample: str, schedule: str) -> tuple[str, str]:
    """GMACs and feature fidelity of one run here, alone, formatted as the page shows them."""
    from analysis import run
    from app_pages.common import SAMPLES as APP_SAMPLES
    from viz import summary

    model = _reference_model()
    image = Image.fromarray(APP_SAMPLES[sample]()).convert("RGB")
    full, reduced = run(model, image, "none"), run(model, image, schedule)
    cosine = summary.feature_cosine(full.features, reduced.features)
    return f"{reduced.gmacs:.2f}", f"{cosine:.4f}"


_REFERENCE: list = []
EXPECTED: dict[tuple[str, str], tuple[str, str]] = {}  # (image, schedule) -> the page's text


def _reference_model():
    if not _REFERENCE:
        from analysis import load_model

        _REFERENCE.append(load_model("default"))
    return _REFERENCE[0]


# --------------------------------------------------------------------------- a browser session


def photo(seed: int, size: tuple[int, int] = (360, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def wait_run(page, settle_ms: int = 3000) -> None:
    """Wait for a run to start (up to ``settle_ms``), then until its 'Running…' status is
    gone."""
    with contextlib.suppress(Exception):  # too fast to see: the check below still holds
        await page.wait_for_selector('[data-testid="stStatusWidget"]', timeout=settle_ms)
    await page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT_MS
    )


async def metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return (await box.locator('[data-testid="stMetricValue"]').inner_text()).strip()


async def choose(page, key: str, option: str) -> None:
    """Pick ``option`` in a selectbox, again until the box shows it (a rerun can eat it)."""
    for _ in range(5):
        box = page.locator(f".st-key-{key} input").first
        await box.click()
        await box.fill(option)
        await box.press("Enter")
        await wait_run(page)
        if await page.locator(f".st-key-{key} input").first.input_value() == option:
            return
    raise RuntimeError(f"{key} would not take {option!r}")


async def set_schedule(page, text: str) -> None:
    """Type a schedule, again until the box holds it (a rerun can reset it)."""
    for _ in range(5):
        area = page.locator(".st-key-schedule_text textarea")
        await area.fill(text)
        await area.press("Control+Enter")
        await wait_run(page)
        if await area.input_value() == text:
            return
    raise RuntimeError(f"the schedule box would not take {text!r}")


async def settled_reading(page, gmacs: str, wait_s: float = 90) -> tuple[str, str]:
    """GMACs and fidelity once the page shows ``gmacs`` (the run has redrawn) and two reads
    1.5 s apart agree; after ``wait_s`` seconds, whatever it shows then. A busy server
    can take seconds to start a rerun, so one read is not enough."""
    previous = None
    deadline = time.monotonic() + wait_s
    while True:
        await wait_run(page, 500)
        now = (await metric(page, "GMACs"), await metric(page, "Feature fidelity"))
        if now == previous and (now[0] == gmacs or time.monotonic() > deadline):
            return now
        previous = now
        await page.wait_for_timeout(1500)


async def explore_session(browser, url: str, log: SessionLog, rounds: int, upload: bool) -> None:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    await loopback_only(context, log)
    page = await context.new_page()
    watch(page, log)
    try:
        await explore_steps(page, url, log, rounds, upload)
    except Exception:
        await page.screenshot(path=f"/tmp/tokenscope-load-session{log.index}.png")
        raise
    finally:
        await context.close()


async def explore_steps(page, url: str, log: SessionLog, rounds: int, upload: bool) -> None:
    await page.goto(url, wait_until="domcontentloaded")
    main = page.locator('[data-testid="stMain"]')
    await main.get_by_text("Merged-token segments").wait_for(timeout=TIMEOUT_MS)
    await wait_run(page)
    say(log, "Explore open")
    sample = SAMPLES[log.index % len(SAMPLES)]
    await choose(page, "sample", sample)
    say(log, f"sample {sample}")
    await wait_run(page)
    for step in range(rounds):
        schedule = SCHEDULES[(log.index + step) % len(SCHEDULES)]
        analytic = EXPECTED[(sample, schedule)][0]  # GMACs are analytic: they name the run
        for _ in range(3):
            await set_schedule(page, schedule)
            gmacs, fidelity = await settled_reading(page, analytic)
            if gmacs == analytic:
                break
            log.retyped += 1
            say(log, f"{schedule}: the page still shows {gmacs} GMACs; typing it again")
        log.readings.append(
            {"image": sample, "schedule": schedule, "gmacs": gmacs, "fidelity": fidelity}
        )
        say(log, f"{schedule}: {gmacs} GMACs, fidelity {fidelity}")
        slider = page.locator('.st-key-layer input[type="range"]').first
        await slider.wait_for(state="attached", timeout=TIMEOUT_MS)
        for _ in range(3):
            await slider.focus()
            await slider.press("ArrowLeft")
            await wait_run(page, 1000)
        say(log, "slider moved")
    if upload:
        files = page.locator('[data-testid="stSidebar"] .st-key-upload input[type="file"]')
        name = f"session{log.index}.png"
        await files.set_input_files(
            files=[{"name": name, "mimeType": "image/png", "buffer": photo(log.index)}]
        )
        await (
            page.locator('[data-testid="stSidebar"]')
            .get_by_text("360×240 px resized to", exact=False)
            .wait_for(timeout=TIMEOUT_MS)
        )
        await wait_run(page)
    await check_page(page, log)


async def tradeoff_session(browser, url: str, log: SessionLog) -> None:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    await loopback_only(context, log)
    page = await context.new_page()
    watch(page, log)
    await page.goto(url, wait_until="domcontentloaded")  # /tradeoff directly: probe 404s
    await page.get_by_text("Merged-token segments").first.wait_for(timeout=TIMEOUT_MS)
    await page.locator('[data-testid="stSidebarNav"]').get_by_text("Trade-off").click()
    main = page.locator('[data-testid="stMain"]')
    await main.get_by_text("Run sweep").wait_for(timeout=TIMEOUT_MS)
    await wait_run(page)
    limit = main.locator(".st-key-sweep_limit input")
    await limit.fill("2")
    await limit.press("Enter")
    await wait_run(page)
    methods = main.locator(".st-key-sweep_methods input")
    await methods.click()
    for _ in range(12):
        await methods.press("Backspace")
    await methods.fill("ToMe" if log.index % 2 == 0 else "EViT")
    await methods.press("Enter")
    await page.keyboard.press("Escape")
    count = main.locator(".st-key-sweep_count input")
    await count.fill("3")
    await count.press("Enter")
    await wait_run(page)
    await main.get_by_role("button", name="Run sweep").click()
    say(log, "sweep started")
    await main.get_by_text("Done:", exact=False).wait_for(timeout=TIMEOUT_MS)
    say(log, "sweep done")
    await wait_run(page)
    await check_page(page, log)
    await context.close()


async def loopback_only(context, log: SessionLog) -> None:
    """Abort every request that would leave 127.0.0.1 (the favicon font, for one)."""

    async def route(request_route) -> None:
        url = request_route.request.url
        if url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            await request_route.continue_()
        else:
            log.blocked_external.append(url)
            await request_route.abort()

    await context.route("**/*", route)


def say(log: SessionLog, text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} session {log.index}: {text}", file=sys.stderr, flush=True)


def watch(page, log: SessionLog) -> None:
    def on_response(response) -> None:
        if response.status >= 400:
            log.http_errors.append(f"{response.status} {response.url}")

    page.on("response", on_response)
    page.on(
        "requestfailed",
        lambda request: (
            log.failed_requests.append(f"{request.failure} {request.url}")
            if request.url.startswith("http://127.0.0.1")
            else None
        ),
    )
    page.on(
        "console",
        lambda message: (
            log.console_errors.append(message.text) if message.type == "error" else None
        ),
    )


async def check_page(page, log: SessionLog) -> None:
    for box in await page.locator('[data-testid="stException"]').all():
        log.error_boxes.append("exception: " + (await box.inner_text())[:200])
    for box in await page.locator('[data-testid="stAlertContentError"]').all():
        log.error_boxes.append("error: " + (await box.inner_text())[:200])
    log.broken_images += await page.evaluate(
        "() => [...document.images].filter(i => i.complete && i.naturalWidth === 0).length"
    )


async def drive(url: str, sessions: int, rounds: int, logs: list[SessionLog]) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            jobs = []
            for index in range(sessions):
                log = SessionLog(index)
                logs.append(log)
                if index in (0, 1) and sessions > 2:
                    jobs.append(guard(tradeoff_session(browser, url, log), log))
                else:
                    jobs.append(
                        guard(explore_session(browser, url, log, rounds, index % 2 == 1), log)
                    )
            await asyncio.gather(*jobs)
        finally:
            await browser.close()


async def guard(job, log: SessionLog) -> None:
    try:
        await job
    except Exception as error:  # a timeout or a missing element: the session failed
        log.problem = f"{type(error).__name__}: {str(error)[:300]}"


async def upload_many(url: str, count: int, memory: list[tuple[int, float]]) -> SessionLog:
    from playwright.async_api import async_playwright

    log = SessionLog(0)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 1000})
            await loopback_only(context, log)
            page = await context.new_page()
            watch(page, log)
            await page.goto(url, wait_until="domcontentloaded")
            await page.get_by_text("Merged-token segments").first.wait_for(timeout=TIMEOUT_MS)
            await wait_run(page)
            files = page.locator('[data-testid="stSidebar"] .st-key-upload input[type="file"]')
            for index in range(count):
                data = photo(1000 + index, (300 + index % 50, 200 + index % 30))
                await files.set_input_files(
                    files=[{"name": f"upload{index}.png", "mimeType": "image/png", "buffer": data}]
                )
                await wait_run(page)
                memory.append((index + 1, rss_mb()))
            await check_page(page, log)
        except Exception as error:
            log.problem = f"{type(error).__name__}: {str(error)[:300]}"
        finally:
            await browser.close()
    return log


# --------------------------------------------------------------------------- the run


def driver(args: argparse.Namespace, url: str, report: dict) -> None:
    """Everything the browsers do, then the checks; stops the server at the end."""
    try:
        wait_healthy(url)
        started = time.monotonic()
        report["rss_start_mb"] = round(rss_mb())
        for sample in SAMPLES:  # what each page should show, from runs done here alone
            for schedule in SCHEDULES:
                EXPECTED[(sample, schedule)] = expected_reading(sample, schedule)
        warm: list[SessionLog] = []
        asyncio.run(drive(url, 1, 1, warm))  # the first load converts and caches the model
        report["warm_up"] = warm[0].problem or "ok"
        before = shared_model_hash()
        logs: list[SessionLog] = []
        peak = [rss_mb()]
        sampler = threading.Thread(target=sample_memory, args=(peak, logs), daemon=True)
        sampler.start()
        if args.sessions:
            asyncio.run(drive(url, args.sessions, args.rounds, logs))
        report["sessions"] = [log.__dict__ for log in logs]
        mismatches = []
        for log in logs:
            for reading in log.readings:
                gmacs, fidelity = EXPECTED[(reading["image"], reading["schedule"])]
                if (reading["gmacs"], reading["fidelity"]) != (gmacs, fidelity):
                    mismatches.append({**reading, "expected": [gmacs, fidelity]})
        report["readings"] = sum(len(log.readings) for log in logs)
        report["mismatches"] = mismatches
        if args.uploads:
            memory: list[tuple[int, float]] = []
            upload_log = asyncio.run(upload_many(url, args.uploads, memory))
            report["uploads"] = {
                "count": len(memory),
                "problem": upload_log.problem,
                "http_errors": upload_log.http_errors,
                "error_boxes": upload_log.error_boxes,
                "rss_mb_after": [(n, round(mb)) for n, mb in memory[:: max(1, len(memory) // 10)]],
                "rss_mb_last": round(memory[-1][1]) if memory else None,
                "rss_mb_max": round(max(mb for _, mb in memory)) if memory else None,
            }
        report["model_hash_before"] = before
        report["model_hash_after"] = shared_model_hash()
        report["rss_peak_mb"] = round(max(peak))
        report["seconds"] = round(time.monotonic() - started)
    except Exception:
        report["driver_error"] = traceback.format_exc()[-2000:]
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # Streamlit's handler stops the server


def sample_memory(peak: list[float], logs: list) -> None:
    while True:
        peak.append(rss_mb())
        time.sleep(0.5)


def wait_healthy(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the server did not become healthy")


def summary(report: dict) -> list[str]:
    """One line per check, and whether it held."""
    sessions = report.get("sessions", [])
    problems = [f"session {s['index']}: {s['problem']}" for s in sessions if s["problem"]]
    http = [e for s in sessions for e in s["http_errors"]]
    failed = [e for s in sessions for e in s["failed_requests"]]
    cancelled = [e for e in failed if e.startswith("net::ERR_ABORTED")]
    failed = [e for e in failed if not e.startswith("net::ERR_ABORTED")]
    boxes = [e for s in sessions for e in s["error_boxes"]]
    broken = sum(s["broken_images"] for s in sessions)
    lines = [
        f"sessions: {len(sessions)}, each finished: {not problems} {problems[:3]}",
        f"HTTP errors (404 on /media/ = broken picture): {len(http)} {http[:3]}",
        f"failed requests: {len(failed)} {failed[:3]}",
        f"requests the browser cancelled itself (a picture replaced before it loaded): "
        f"{len(cancelled)}",
        f"requests that would have left 127.0.0.1 (aborted): "
        f"{sum(len(s['blocked_external']) for s in sessions)}",
        f"error or exception boxes: {len(boxes)} {boxes[:3]}",
        f"broken <img> at the end: {broken}",
        f"schedules typed again (keystrokes lost in a rerun): "
        f"{sum(s['retyped'] for s in sessions)}",
        f"readings checked against a run alone: {report.get('readings', 0)}, "
        f"mismatched: {len(report.get('mismatches', []))}",
        f"shared model hash: {report.get('model_hash_before')} -> {report.get('model_hash_after')}",
        f"server RSS: start {report.get('rss_start_mb')} MB, peak {report.get('rss_peak_mb')} MB",
        f"wall time: {report.get('seconds')} s",
    ]
    if "uploads" in report:
        lines.append(f"uploads: {json.dumps(report['uploads'])}")
    if "driver_error" in report:
        lines.append("driver error:\n" + report["driver_error"])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="schedules per Explore session")
    parser.add_argument("--uploads", type=int, default=0, help="then N uploads in one session")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="the full report as JSON")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # .streamlit/config.toml is read from here
    from streamlit.web import bootstrap

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    flags = {
        "server.port": port,
        "server.address": "127.0.0.1",
        "server.headless": True,
        "server.fileWatcherType": "none",
        "browser.gatherUsageStats": False,
    }
    report: dict = {"sessions_asked": args.sessions, "media_grace_s": os.environ.get(
        "TOKENSCOPE_MEDIA_GRACE_S", "60 (default)"
    )}  # fmt: skip
    thread = threading.Thread(target=driver, args=(args, url, report), daemon=True)
    thread.start()
    bootstrap.load_config_options(flag_options=flags)
    bootstrap.run(str(ROOT / "app.py"), False, [], flags)
    thread.join(timeout=30)
    lines = summary(report)
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    sessions = report.get("sessions", [])
    bad = (
        "driver_error" in report
        or any(s["problem"] or s["http_errors"] or s["error_boxes"] for s in sessions)
        or any(not e.startswith("net::ERR_ABORTED") for s in sessions for e in s["failed_requests"])
        or any(s["blocked_external"] for s in sessions)
        or report.get("mismatches")
        or report.get("model_hash_before") != report.get("model_hash_after")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
