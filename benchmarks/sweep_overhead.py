"""The sweep's overhead against the pure forward time of the same schedules, side by side.

"Forward" runs ``analysis.run`` on batches that were preprocessed beforehand, once per
schedule (the full model included, which the sweep runs once as its reference). "Sweep"
is ``analysis.sweep.run_sweep`` over the same plan and images with no cache: it also
decodes and preprocesses the images, computes the metrics and their bootstrap intervals.
The two alternate for ``--rounds`` rounds and the medians are compared:
overhead = sweep / forward - 1.

    python benchmarks/sweep_overhead.py                       # CPU, batch 8
    python benchmarks/sweep_overhead.py --device cuda --batch 64 --precision bf16 --images 256
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from analysis import load_model, run
from analysis.imagesets import open_image_set
from analysis.sweep import MethodSweep, plan_sweep, run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=16, help="images from the samples set")
    parser.add_argument("--source", default="samples", help="samples, fashion-mnist or a folder")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--methods", nargs="+", default=["tome:r=8", "evit:keep=0.7@3,6,9"], help="base schedules"
    )
    parser.add_argument("--points", type=int, default=3, help="cost targets per method")
    args = parser.parse_args()

    model = load_model(args.model, weights=args.weights, device=args.device)
    images = open_image_set(args.source, limit=args.images)
    targets = tuple(35 + i * 60 / max(1, args.points - 1) for i in range(args.points))
    plan = plan_sweep(model, methods=[MethodSweep(base, targets=targets) for base in args.methods])
    schedules = [point.schedule for point in plan.points]
    batches = [
        images.batch(range(start, min(start + args.batch, len(images))), model.data_config)
        for start in range(0, len(images), args.batch)
    ]

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    def forward() -> None:
        for schedule in schedules:
            for batch in batches:
                run(model, batch.to(model.device), schedule, precision=args.precision)
        sync()

    def sweep() -> None:
        for _ in run_sweep(model, images, plan, batch_size=args.batch, precision=args.precision):
            pass
        sync()

    forward()  # warm-up: allocator, kernels, lazy imports
    sweep()
    timings: dict[str, list[float]] = {"forward": [], "sweep": []}
    for _ in range(args.rounds):
        for name, action in (("forward", forward), ("sweep", sweep)):
            start = time.perf_counter()
            action()
            timings[name].append(time.perf_counter() - start)
    forward_s = statistics.median(timings["forward"])
    sweep_s = statistics.median(timings["sweep"])
    device = torch.cuda.get_device_name() if model.device.type == "cuda" else platform.processor()
    print(
        f"model {model.name} on {model.device} ({device or platform.machine()}), "
        f"{torch.get_num_threads()} threads, {args.precision}, batch {args.batch}"
    )
    print(f"{len(schedules)} schedules x {len(images)} images, median of {args.rounds} rounds")
    print(f"forward only: {forward_s:.3f} s")
    print(f"sweep:        {sweep_s:.3f} s")
    print(f"overhead:     {100 * (sweep_s / forward_s - 1):+.1f} %")


if __name__ == "__main__":
    main()
