"""Side-by-side timings: engine overhead vs timm, and ToMe speed-ups vs FLOP savings.

Candidates are timed in interleaved rounds (one call each per round) and the median is
reported, so slow drifts of the machine hit every candidate alike. "Realized" is the
measured speed-up divided by the FLOP ratio: 1.0 means the saved FLOPs all became time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BenchRow:
    name: str
    schedule: str
    seconds: float  # median per batch
    images_per_second: float
    gmacs: float
    speedup: float  # vs the baseline row of its group
    flop_ratio: float  # baseline GMACs / this GMACs
    realized: float  # speedup / flop_ratio


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm ViT name")
    parser.add_argument("--weights", default="random", help="'random' (default), 'hub' or a path")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on GPU, 8 on CPU")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 GPU, fp32 CPU"
    )
    parser.add_argument("--r", type=int, nargs="+", default=[8, 13, 16], help="ToMe r values")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10/30)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")


def interleaved_medians(
    candidates: dict[str, Callable[[], Any]], rounds: int, warmup: int, sync: Callable[[], None]
) -> dict[str, float]:
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_main_args(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # here, so that building the CLI parser does not import torch

    from analysis.engine import run
    from analysis.models import load_model

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    batch = args.batch or (256 if cuda else 8)
    precision = args.precision or ("bf16" if cuda else "fp32")
    rounds = args.rounds or (30 if cuda else 10)
    model = load_model(args.model, weights=args.weights, device=device)
    size = model.data_config.input_size
    images = torch.randn(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def timm_forward() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32),
        ):
            model.module(images)

    def engine(schedule: str) -> Callable[[], Any]:
        return lambda: run(model, images, schedule, precision=precision)

    candidates: dict[str, Callable[[], Any]] = {
        "timm forward": timm_forward,
        "engine none": engine("none"),
    }
    for r in args.r:
        candidates[f"engine tome r={r}"] = engine(f"tome:r={r}")
    medians = interleaved_medians(candidates, rounds, args.warmup, sync)

    full = run(model, images[:1], "none").gmacs
    rows = [
        _row(
            "timm forward",
            "none",
            medians["timm forward"],
            batch,
            full,
            medians["timm forward"],
            full,
        )
    ]
    rows.append(
        _row(
            "engine none",
            "none",
            medians["engine none"],
            batch,
            full,
            medians["timm forward"],
            full,
        )
    )
    for r in args.r:
        name = f"engine tome r={r}"
        gmacs = run(model, images[:1], f"tome:r={r}").gmacs
        rows.append(
            _row(name, f"tome:r={r}", medians[name], batch, gmacs, medians["engine none"], full)
        )
    machine = (
        torch.cuda.get_device_name()
        if cuda
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    return {
        "model": args.model,
        "device": device,
        "machine": machine,
        "batch": batch,
        "precision": precision,
        "img_size": size,
        "rounds": rounds,
        "torch": torch.__version__,
        "engine_overhead": medians["engine none"] / medians["timm forward"] - 1.0,
        "rows": [asdict(row) for row in rows],
    }


def _row(name, schedule, seconds, batch, gmacs, base_seconds, base_gmacs) -> BenchRow:
    speedup = base_seconds / seconds
    flop_ratio = base_gmacs / gmacs
    return BenchRow(
        name, schedule, seconds, batch / seconds, gmacs, speedup, flop_ratio, speedup / flop_ratio
    )


def format_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}, {report['device']} ({report['machine']}), batch {report['batch']}, "
        f"{report['precision']}, {report['img_size']} px, median of {report['rounds']} rounds",
        "",
        "| run | GMACs | im/s | speed-up | FLOP ratio | realized |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['name']} | {row['gmacs']:.2f} | {row['images_per_second']:.1f} | "
            f"{row['speedup']:.2f}× | {row['flop_ratio']:.2f}× | {row['realized']:.2f} |"
        )
    lines.append("")
    lines.append(f"Engine overhead vs timm's own forward: {100 * report['engine_overhead']:+.1f}%")
    return "\n".join(lines)
