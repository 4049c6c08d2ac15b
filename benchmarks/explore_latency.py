"""Explore page latency: from a schedule change to new overlays, and a slider move.

Times what the page does, without Streamlit: check the schedule, run the model with the
trace, draw the four pictures, the two charts and the filmstrip, and encode the pictures
as PNG (as ``st.image`` does). A slider move only redraws and encodes.

    python benchmarks/explore_latency.py [--model default] [--repeat 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from analysis import load_model, parse_schedule, run
from analysis.images import fit_to_input
from viz import charts, overlays

SCHEDULES = ("tome:r=8", "evit:keep=0.7@3,6,9", "topk:keep=0.5@3", "random:keep=0.5@2")


def sample() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def draw(image, reduced, full, layer: int) -> list:
    """Everything the layer views draw for one layer, PNG-encoded like st.image does."""
    trace = reduced.trace
    pictures = [
        overlays.render_segments(image, trace, layer),
        overlays.render_pruned(image, trace, layer),
        overlays.render_token_depth(image, trace),
    ]
    if overlays.layer_scores(trace, layer) is not None:
        pictures.append(overlays.render_heatmap(image, trace, layer))
    figures = [
        charts.tokens_chart(reduced.cost, full.cost, layer).to_json(),
        charts.gmacs_chart(reduced.cost, full.cost, layer).to_json(),
    ]
    return [overlays.to_png(picture) for picture in pictures] + figures


def filmstrip(image, trace) -> list:
    small = overlays.thumbnail(image, 8 * max(trace.grid))
    return [
        overlays.to_png(overlays.render_segments(small, trace, layer, mode="tint", thickness=1))
        for layer in range(len(trace.layers))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--weights", default=None, help="for timm names: hub, random or a path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    start = time.perf_counter()
    model = load_model(args.model, args.weights, device=args.device)
    print(f"model load: {time.perf_counter() - start:.2f} s ({args.model}, {args.device})")
    picture = sample()
    _, crop = fit_to_input(picture, model.data_config)
    full = run(model, picture, "none")
    image = overlays.display_image(picture, crop, full.trace.grid)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"display image {image.shape[1]}×{image.shape[0]} px"
    )
    for _ in range(2):  # warm-up
        run(model, picture, SCHEDULES[0])

    print(f"\nmedian of {args.repeat} (ms)")
    columns = ("check", "run", "draw", "strip", "total")
    header = f"{'schedule':24} " + " ".join(f"{c:>6}" for c in columns) + f" {'slider':>7}"
    print(header)
    print("-" * len(header))
    for text in SCHEDULES:
        rows: dict[str, list[float]] = {k: [] for k in ("check", "run", "draw", "strip", "slider")}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            schedule = parse_schedule(text, depth=model.facts.depth)
            schedule.resolve(model.facts)
            t1 = time.perf_counter()
            reduced = run(model, picture, schedule)
            t2 = time.perf_counter()
            layer = len(reduced.trace.layers) - 1
            draw(image, reduced, full, layer)
            t3 = time.perf_counter()
            filmstrip(image, reduced.trace)
            t4 = time.perf_counter()
            draw(image, reduced, full, layer // 2)
            t5 = time.perf_counter()
            for key, value in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                rows[key].append(1000 * value)
        med = {key: statistics.median(values) for key, values in rows.items()}
        total = med["check"] + med["run"] + med["draw"] + med["strip"]
        print(
            f"{text:24} {med['check']:6.0f} {med['run']:6.0f} {med['draw']:6.0f} "
            f"{med['strip']:6.0f} {total:6.0f} {med['slider']:7.0f}"
        )
    print(
        "\ntotal = schedule change to new overlays (check + run + draw + filmstrip); "
        "slider = redraw of one layer"
    )


if __name__ == "__main__":
    main()
