"""Explore page latency: from a schedule change to new overlays, and a slider move.

Three levels, each on the default model and the astronaut sample:

* ``pieces``: what the page computes, without Streamlit: check the schedule, run the
  model with its trace, draw the four pictures and two charts, the filmstrip, and encode
  the pictures as PNG. A slider move only redraws the three per-layer pictures. Run in a
  worker thread, as Streamlit runs page scripts.
* ``page``: the whole page script rerun after a schedule edit, through Streamlit's
  AppTest (server side: everything but the browser's drawing).
* ``browser`` (with ``--browser``): in headless Chromium against ``streamlit run``, from
  pressing Ctrl+Enter in the schedule box until the new segment overlay has loaded, and
  from a slider key press until the redrawn overlay has loaded.

Every schedule is new to the caches, so each change really runs the model.

    python benchmarks/explore_latency.py [--repeat 7] [--browser] [--presets]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py sets it
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from analysis import load_model, parse_schedule, run  # noqa: E402
from analysis.images import fit_to_input  # noqa: E402
from viz import charts, overlays  # noqa: E402

FAMILIES = ("tome", "evit", "topk", "random")


def fresh_schedules(family: str) -> Iterator[str]:
    """Endless distinct schedules of one family, so no cache ever answers."""
    step = 0
    while True:
        step += 1
        if family == "tome":
            yield f"tome:r={4 + step % 9},inflect=-{(step // 9) % 10 / 10:g}"
        elif family == "evit":
            yield f"evit:keep={0.5 + (step % 40) / 100:g}@3,6,9"
        elif family == "topk":
            yield f"topk:keep={0.5 + (step % 40) / 100:g}@3"
        else:
            yield f"random:keep=0.5,seed={step}@2"


def sample() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def draw_layer(image, reduced, layer: int) -> list:
    """What a slider move redraws: the three per-layer pictures, PNG-encoded as sent."""
    trace = reduced.trace
    pictures = [
        overlays.render_segments(image, trace, layer),
        overlays.render_pruned(image, trace, layer),
    ]
    if overlays.layer_scores(trace, layer) is not None:
        pictures.append(overlays.render_heatmap(image, trace, layer))
    return [overlays.to_png(picture, fast=True) for picture in pictures]


def draw(image, reduced, full, layer: int) -> list:
    """What a new run draws: the per-layer pictures, the token-depth map and the charts."""
    return [
        *draw_layer(image, reduced, layer),
        overlays.to_png(overlays.render_token_depth(image, reduced.trace), fast=True),
        charts.tokens_chart(reduced.cost, full.cost).to_json(),
        charts.gmacs_chart(reduced.cost, full.cost).to_json(),
    ]


def filmstrip(image, trace) -> list:
    small = overlays.thumbnail(image, 16 * max(trace.grid))
    return [
        overlays.to_png(overlays.render_segments(small, trace, layer, thickness=1), fast=True)
        for layer in range(len(trace.layers))
    ]


def pieces(repeat: int) -> None:
    model = load_model("default")
    picture = sample()
    _, crop = fit_to_input(picture, model.data_config)
    full = run(model, picture, "none")
    image = overlays.display_image(picture, crop, full.trace.grid)
    print(f"display image {image.shape[1]}×{image.shape[0]} px")
    for _ in range(2):  # warm-up
        run(model, picture, "tome")
    print(f"\npieces: median of {repeat} (ms)")
    columns = ("check", "run", "draw", "strip", "total")
    header = f"{'schedule':22} " + " ".join(f"{c:>6}" for c in columns) + f" {'slider':>7}"
    print(header + "\n" + "-" * len(header))
    for family in FAMILIES:
        times: dict[str, list[float]] = {k: [] for k in ("check", "run", "draw", "strip", "slider")}
        texts = fresh_schedules(family)
        for _ in range(repeat):
            t0 = time.perf_counter()
            schedule = parse_schedule(next(texts), depth=model.facts.depth)
            schedule.resolve(model.facts)
            t1 = time.perf_counter()
            reduced = run(model, picture, schedule)
            t2 = time.perf_counter()
            last = len(reduced.trace.layers) - 1
            draw(image, reduced, full, last)
            t3 = time.perf_counter()
            filmstrip(image, reduced.trace)
            t4 = time.perf_counter()
            draw_layer(image, reduced, last // 2)
            t5 = time.perf_counter()
            for key, value in zip(
                times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True
            ):
                times[key].append(1000 * value)
        med = {key: statistics.median(values) for key, values in times.items()}
        total = med["check"] + med["run"] + med["draw"]  # the filmstrip: only when opened
        print(
            f"{family:22} {med['check']:6.0f} {med['run']:6.0f} {med['draw']:6.0f} "
            f"{med['strip']:6.0f} {total:6.0f} {med['slider']:7.0f}"
        )


def page(repeat: int) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    print(f"\npage (AppTest, server side): median of {repeat} (ms)")
    print(f"{'schedule':22} {'rerun':>6}\n" + "-" * 29)
    for family in FAMILIES:
        texts = fresh_schedules(family)
        at.text_area(key="schedule_text").input(next(texts)).run()  # warm-up
        values = []
        for _ in range(repeat):
            at.text_area(key="schedule_text").input(next(texts))
            start = time.perf_counter()
            at.run()
            values.append(1000 * (time.perf_counter() - start))
            assert not at.exception and not at.sidebar.error, at.sidebar.error
        print(f"{family:22} {statistics.median(values):6.0f}")


def preset_pages() -> None:
    """The whole page script after choosing each preset of the default model, once each
    (a preset is new to the run cache the first time), through AppTest."""
    from streamlit.testing.v1 import AppTest

    from analysis.presets import model_presets

    presets = model_presets(load_model("default"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.text_area(key="schedule_text").input("tome:r=5,inflect=-0.3").run()  # warm-up
    print(f"\npresets (AppTest, server side, first run of each): {len(presets)} (ms)")
    values = []
    for preset in presets:
        at.text_area(key="schedule_text").input(preset.schedule)
        start = time.perf_counter()
        at.run()
        values.append(1000 * (time.perf_counter() - start))
        assert not at.exception and not at.sidebar.error, (preset.schedule, at.sidebar.error)
        print(f"{values[-1]:6.0f}  {preset.title}")
    print(f"median {statistics.median(values):.0f}, slowest {max(values):.0f}")


def browser(repeat: int) -> None:
    from playwright.sync_api import sync_playwright

    port = 8700 + os.getpid() % 200
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
        "--server.headless", "true", "--server.address", "127.0.0.1",
        "--server.port", str(port), "--server.fileWatcherType", "none",
    ]  # fmt: skip
    server = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    overlay = '[data-testid="stMain"] [data-testid="stImage"] img'
    # Done when the first overlay has a new source and has loaded, or, where the picture
    # happens to be the same, when a run was seen and has finished with images loaded.
    changed = (
        "(old) => { const w = document.querySelector('[data-testid=\"stStatusWidget\"]');"
        " if (w) window.__sawRun = true;"
        " const i = document.querySelector('" + overlay + "');"
        " const loaded = [...document.querySelectorAll('" + overlay + "')]"
        ".every(x => x.complete && x.naturalWidth > 0);"
        " if (!i || !loaded) return false;"
        " return i.getAttribute('src') !== old || (window.__sawRun === true && !w); }"
    )
    reset = "() => { window.__sawRun = false; }"
    # A slider move is done when the caption names the new layer and the images have loaded.
    moved = (
        "(layer) => [...document.querySelectorAll('[data-testid=\"stCaptionContainer\"]')]"
        ".some(c => c.innerText.startsWith(`After layer ${layer}:`))"
        " && [...document.querySelectorAll('" + overlay + "')]"
        ".every(x => x.complete && x.naturalWidth > 0)"
    )
    idle = "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(
                executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--no-first-run"],
            )  # fmt: skip
            tab = chromium.new_page(viewport={"width": 1500, "height": 1400})
            tab.goto(url)
            tab.locator(overlay).first.wait_for(timeout=300_000)
            tab.wait_for_function(idle, timeout=300_000)
            box = tab.locator('[data-testid="stSidebar"] textarea')
            print(f"\nbrowser (Chromium, end to end): median of {repeat} (ms)")
            print(f"{'schedule':22} {'change':>6} {'slider':>7}\n" + "-" * 37)
            slider = tab.locator('[data-testid="stSlider"] input[type="range"]').first
            for family in FAMILIES:
                texts = fresh_schedules(family)
                change, move = [], []
                for _ in range(repeat):
                    before = tab.locator(overlay).first.get_attribute("src")
                    box.fill(next(texts))
                    tab.evaluate(reset)
                    start = time.perf_counter()
                    box.press("Control+Enter")
                    tab.wait_for_function(changed, arg=before, timeout=120_000)
                    change.append(1000 * (time.perf_counter() - start))
                    tab.wait_for_function(idle, timeout=120_000)
                    layer = int(slider.get_attribute("aria-valuetext"))
                    last = int(slider.get_attribute("max"))
                    # Stay at the last two layers, after every schedule here has acted, so
                    # that each new schedule changes the overlay (a fast rerun may never
                    # show Streamlit's status widget, so a same picture cannot be told).
                    left = layer == last
                    start = time.perf_counter()
                    slider.press("ArrowLeft" if left else "ArrowRight")
                    target = layer - 1 if left else layer + 1
                    tab.wait_for_function(moved, arg=target, timeout=120_000)
                    move.append(1000 * (time.perf_counter() - start))
                    tab.wait_for_function(idle, timeout=120_000)
                print(
                    f"{family:22} {statistics.median(change):6.0f} {statistics.median(move):7.0f}"
                )
            chromium.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--browser", action="store_true", help="also measure in Chromium")
    parser.add_argument("--skip-page", action="store_true", help="skip the AppTest level")
    parser.add_argument(
        "--presets", action="store_true", help="also time the page once for every preset"
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, Python {platform.python_version()}"
    )
    # Streamlit runs page scripts in a worker thread; so do we.
    worker = threading.Thread(target=pieces, args=(args.repeat,))
    worker.start()
    worker.join()
    if not args.skip_page:
        page(args.repeat)
    if args.presets:
        preset_pages()
    if args.browser:
        browser(args.repeat)
    print(
        "\nchange = schedule edit until new overlays (pieces: check + run + draw; the "
        "filmstrip (strip) is drawn only while its expander is open); slider = redraw of "
        "one layer"
    )


if __name__ == "__main__":
    main()
