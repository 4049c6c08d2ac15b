"""``python -m analysis sweep``: trade-off sweeps without the app, on one process or many.

One process::

    python -m analysis sweep --images samples --method tome --method evit \\
        --targets 35:100:8 --out results.json

Many GPUs or machines, with PyTorch's own launcher (each rank takes whole batches, rank 0
gathers and writes; the numbers equal a one-process run)::

    torchrun --standalone --nproc_per_node=8 -m analysis sweep --config sweep.json --out r.json
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m analysis sweep --config sweep.json --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from analysis.errors import TokenScopeError

# The command line runs on the user's own machine: keep up to 4 GiB of preprocessed images
# between points (about 7,000 at 224 px), so a GPU is not left waiting on decoding.
CLI_PREPROCESSED_BYTES = 4 * 2**30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis sweep",
        description=(
            "Run a trade-off sweep: every schedule over an image set, with each metric's "
            "mean and 95%% bootstrap interval. Finished points are cached (TOKENSCOPE_CACHE), "
            "so a rerun or an interrupted sweep recomputes nothing it already has."
        ),
        epilog=(
            "examples:\n"
            "  python -m analysis sweep --method tome --method evit --targets 35:100:8\n"
            "  python -m analysis sweep --images fashion-mnist --limit 300 --method tome "
            "--values tome=0,4,8,12,16\n"
            "  torchrun --standalone --nproc_per_node=2 -m analysis sweep --config sweep.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="a sweep configuration (JSON); replaces the options")
    parser.add_argument("--model", default="default", help="'default' or a timm ViT name")
    parser.add_argument("--weights", default=None, help="'hub', 'random' or a checkpoint path")
    parser.add_argument(
        "--learned", action="append", default=[], help="a learned reducer's weights file"
    )
    parser.add_argument(
        "--images", default="samples", help="'samples', 'fashion-mnist' or a folder"
    )
    parser.add_argument("--limit", type=int, default=None, help="use at most N images")
    parser.add_argument(
        "--schedule", action="append", default=[], help="an explicit schedule (repeatable)"
    )
    parser.add_argument(
        "--method",
        action="append",
        default=[],
        help="a method to sweep: its name (default placement) or a base schedule such as "
        "'evit:keep=0.7@3,6,9' (repeatable)",
    )
    parser.add_argument(
        "--targets",
        default=None,
        help="cost targets in %% of full for every --method: LOW:HIGH:COUNT or a list "
        "'40,60,80' (default 35:100:8)",
    )
    parser.add_argument(
        "--values",
        action="append",
        default=[],
        metavar="METHOD=V1,V2,...",
        help="strength values for one method instead of cost targets, e.g. tome=4,8,16",
    )
    parser.add_argument("--metric", action="append", default=[], help="a metric (repeatable)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--throughput", action="store_true", help="also measure images/s of each schedule"
    )
    parser.add_argument("--no-full", action="store_true", help="leave out the full model point")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def spec_from_args(args: argparse.Namespace) -> Any:
    """The :class:`SweepSpec` the options (or ``--config``) describe."""
    from analysis.sweep import DEFAULT_BASES, MethodSweep, SweepSpec, cost_targets

    if args.config:
        try:
            data = json.loads(Path(args.config).read_text())
        except OSError as error:
            raise TokenScopeError(f"could not read {args.config}: {error.strerror}") from None
        except ValueError as error:
            raise TokenScopeError(f"{args.config} is not valid JSON: {error}") from None
        return SweepSpec.from_dict(data.get("config", data) if isinstance(data, dict) else data)
    targets = _targets(args.targets) if args.targets else cost_targets()
    values = dict(_values(item) for item in args.values)
    methods = []
    for item in args.method:
        base = DEFAULT_BASES.get(item.strip().lower(), item)
        name = base.split(":", 1)[0].split("@", 1)[0].strip().lower()
        if name in values:
            methods.append(MethodSweep(base=base, values=values.pop(name)))
        else:
            methods.append(MethodSweep(base=base, targets=targets))
    if values:
        raise TokenScopeError(f"--values names {', '.join(values)}, which no --method sweeps")
    spec = SweepSpec(
        model=args.model,
        weights=args.weights,
        learned=tuple(args.learned),
        images=args.images,
        limit=args.limit,
        schedules=tuple(args.schedule),
        methods=tuple(methods),
        metrics=tuple(args.metric),
        batch_size=args.batch,
        precision=args.precision,
        device=args.device,
        throughput=args.throughput,
        include_full=not args.no_full,
    )
    spec.check()
    return spec


def _targets(text: str) -> tuple[float, ...]:
    from analysis.sweep import cost_targets

    try:
        if ":" in text:
            low, high, count = text.split(":")
            return cost_targets(float(low), float(high), int(count))
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise TokenScopeError(
            f"--targets {text!r}: write LOW:HIGH:COUNT (35:100:8) or a list (40,60,80)"
        ) from None


def _values(text: str) -> tuple[str, tuple[float, ...]]:
    name, _, listed = text.partition("=")
    try:
        numbers = tuple(float(item) for item in listed.split(",") if item.strip())
    except ValueError:
        numbers = ()
    if not name.strip() or not numbers:
        raise TokenScopeError(f"--values {text!r}: write METHOD=V1,V2,... (tome=4,8,16)")
    return name.strip().lower(), numbers


def sweep_main(argv: list[str]) -> int:
    """Run the sweep; exit 0 on success, 2 on a wrong input (with one line on stderr)."""
    args = build_parser().parse_args(argv)
    comm = _init_distributed(args.device)
    try:
        spec = spec_from_args(args)
        document = execute(spec, comm, cache=not args.no_cache, quiet=args.quiet)
    finally:
        _finish_distributed()
    if comm.rank != 0:
        return 0
    text = json.dumps(document, indent=2)
    if args.out:
        from analysis.sweep_cache import atomic_write

        atomic_write(Path(args.out), text.encode())
        print(f"wrote {len(document['points'])} points to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def execute(spec: Any, comm: Any, *, cache: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Load, plan and run a sweep; the results document (rank 0's is complete)."""
    from analysis.imagesets import open_image_set
    from analysis.models import load_model
    from analysis.sweep import (
        check_metrics,
        measure_throughput,
        plan_sweep,
        results_document,
        run_sweep,
    )
    from analysis.sweep_cache import SweepCache

    device = _device(spec.device, comm)
    model = load_model(spec.model, weights=spec.weights, device=device, learned=spec.learned)
    images = open_image_set(
        spec.images, limit=spec.limit, model_classes=model.facts.num_classes or None
    )
    metrics = check_metrics(model, images, spec.metrics)
    plan = plan_sweep(
        model, schedules=spec.schedules, methods=spec.methods, include_full=spec.include_full
    )
    progress = _Progress(len(plan.points), len(images), sys.stderr, quiet or comm.rank != 0)
    for note in plan.skipped:
        progress.note(f"skipped {note}")
    points = []
    for point in run_sweep(
        model,
        images,
        plan,
        metrics,
        batch_size=spec.batch_size,
        precision=spec.precision,
        cache=SweepCache() if cache else None,
        comm=comm,
        on_images=progress.advance,
        keep_preprocessed_bytes=CLI_PREPROCESSED_BYTES,
        on_notice=progress.note,
    ):
        points.append(point)
        progress.point_done(point, metrics[0])
    if spec.throughput and comm.rank == 0:
        from dataclasses import replace

        speeds = measure_throughput(
            model,
            images,
            [p.schedule for p in points],
            batch_size=spec.batch_size,
            precision=spec.precision,
        )
        points = [replace(p, images_per_second=speeds[p.schedule]) for p in points]
    progress.close()
    return results_document(spec, model, images, plan, metrics, points)


class _Progress:
    """A one-line progress bar on a terminal; one line per point otherwise."""

    def __init__(self, points: int, images: int, stream: TextIO, quiet: bool) -> None:
        self.points, self.images, self.stream, self.quiet = points, images, stream, quiet
        self.done_points = 0
        self.done_images = 0
        self.live = not quiet and stream.isatty()

    def advance(self, count: int) -> None:
        self.done_images += count
        if self.live:
            self._draw(f"{self.done_images}/{self.images} images")

    def point_done(self, point: Any, metric: str) -> None:
        self.done_points += 1
        self.done_images = 0
        estimate = point.metrics[metric]
        line = (
            f"{point.method} {point.setting}: {point.gmacs:.3f} GMACs, {metric} "
            f"{estimate.mean:.4f} [{estimate.low:.4f}, {estimate.high:.4f}]"
            + (" (cached)" if point.cached else f" ({point.seconds:.1f} s)")
            + (" [extrapolated]" if point.extrapolated else "")
        )
        self.note(line)

    def note(self, text: str) -> None:
        if self.quiet:
            return
        prefix = f"[{self.done_points}/{self.points}] "
        end = "\n"
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(prefix + text + end)
        self.stream.flush()

    def _draw(self, text: str) -> None:
        width = 24
        filled = int(width * self.done_points / max(1, self.points))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r\033[K[{bar}] {self.done_points}/{self.points} points, {text}")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _init_distributed(device: str) -> Any:
    """Join the torchrun group when launched by torchrun (WORLD_SIZE > 1)."""
    from analysis.sweep import Comm, TorchComm

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Comm()
    import torch
    import torch.distributed as dist

    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return TorchComm()


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _device(name: str, comm: Any) -> str:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TokenScopeError("--device cuda was asked for, but no CUDA GPU is available")
        if comm.world > 1:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


__all__ = ["build_parser", "execute", "spec_from_args", "sweep_main"]
