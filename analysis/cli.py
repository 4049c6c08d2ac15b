"""``python -m analysis``: FLOPs, single-image runs, engine verification and benchmarks."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from analysis.errors import TokenScopeError


def _add_model_args(parser: argparse.ArgumentParser, default_model: str = "default") -> None:
    parser.add_argument(
        "--model", default=default_model, help="'default' or a timm ViT name (default: %(default)s)"
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="'hub' (pretrained, default for timm names), 'random', or a checkpoint path",
    )
    parser.add_argument("--img-size", type=int, default=None, help="input size in pixels")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TokenScopeError("--device cuda was asked for, but no CUDA GPU is available")
    return name


def _load(args: argparse.Namespace):
    from analysis.models import load_model

    return load_model(
        args.model, weights=args.weights, device=_device(args.device), img_size=args.img_size
    )


def _input_size(model, img_size: int | None) -> int:
    return img_size or model.data_config.input_size


def cmd_flops(args: argparse.Namespace) -> dict[str, Any]:
    """Analytic cost of a schedule; no image is run, so no weight is read either (the
    model is built on the meta device) and ``--device`` does not matter."""
    from analysis.flops import count_macs
    from analysis.models import model_facts
    from analysis.schedule import parse_schedule
    from analysis.structure import bind_structures, load_structure

    model = load_structure(args.model, args.weights, img_size=args.img_size)
    size = _input_size(model, args.img_size)
    facts = model_facts(model.module, model.name, size)
    schedule = parse_schedule(args.schedule)
    resolved = schedule.resolve(facts)
    bind_structures(resolved, model)
    cost = count_macs(facts, resolved, model.module)
    full = count_macs(facts, parse_schedule("none").resolve(facts), model.module)
    return {
        "model": model.name,
        "img_size": size,
        "schedule": schedule.to_text(),
        "gmacs": cost.gmacs,
        "gmacs_full": full.gmacs,
        "reduction_percent": 100.0 * (1 - cost.macs / full.macs),
        "tokens": cost.tokens,
        "gmacs_per_layer": cost.gmacs_per_layer(),
    }


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one image; report tokens, cost, and the top-5 or the feature fidelity."""
    import torch

    from analysis.engine import run
    from analysis.images import load_image

    model = _load(args)
    image = load_image(Path(args.image))
    reduced = run(model, [image], args.schedule)
    full = run(model, [image], "none")
    fidelity = torch.nn.functional.cosine_similarity(reduced.features, full.features).item()
    out: dict[str, Any] = {
        "model": model.name,
        "image": str(args.image),
        "schedule": reduced.schedule.to_text(),
        "tokens": reduced.tokens,
        "gmacs": reduced.gmacs,
        "gmacs_full": full.gmacs,
        "reduction_percent": 100.0 * (1 - reduced.cost.macs / full.cost.macs),
        "fidelity_cosine": fidelity,
        "crop": reduced.crops[0].describe() if reduced.crops else None,
    }
    if reduced.logits is not None:
        out["top5"] = _top5(model, reduced.logits[0])
        out["top5_full"] = _top5(model, full.logits[0])
    return out


def _top5(model, logits) -> list[dict[str, Any]]:
    names = model.class_names()
    probs = logits.float().softmax(-1)
    values, indices = probs.topk(min(5, probs.numel()))
    return [
        {"class": int(i), "label": names[int(i)] if names else str(int(i)), "prob": float(p)}
        for p, i in zip(values, indices, strict=True)
    ]


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    """Check that the empty-schedule engine reproduces timm (and, for default, the ONNX)."""
    import torch

    from analysis.engine import run

    model = _load(args)
    size = _input_size(model, args.img_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=generator).to(model.device)
    result = run(model, images, "none")
    with torch.inference_mode():
        tokens = model.module.forward_features(images)
        features = model.module.forward_head(tokens, pre_logits=True)
        logits = model.module.forward_head(tokens) if model.is_classifier else None
    diffs = {"features": (result.features - features).abs().max().item()}
    if logits is not None:
        diffs["logits"] = (result.logits - logits).abs().max().item()
    out: dict[str, Any] = {"model": model.name, "max_abs_diff": diffs, "tolerance": args.tol}
    ok = all(value <= args.tol for value in diffs.values())
    if model.name == "default":
        from analysis.default_model import conversion_error
        from analysis.images import to_tensor

        pixels, _ = to_tensor(_sample_images(), model.data_config)
        onnx_diff = conversion_error(pixels.numpy(), model.module.cpu())
        out["onnx_max_abs_diff"] = onnx_diff
        out["onnx_tolerance"] = 1e-3
        ok = ok and onnx_diff <= 1e-3
    out["ok"] = ok
    if not ok:
        raise VerifyFailed(out)
    return out


class VerifyFailed(TokenScopeError):
    def __init__(self, report: dict[str, Any]):
        super().__init__(
            f"engine does not reproduce {report['model']}: max abs diff {report['max_abs_diff']}"
            + (
                f", ONNX diff {report.get('onnx_max_abs_diff')}"
                if "onnx_max_abs_diff" in report
                else ""
            )
        )
        self.report = report


def _sample_images():
    from PIL import Image
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())]


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from analysis.bench import bench_main_args

    return bench_main_args(args)


def _print_human(command: str, result: dict[str, Any]) -> None:
    if command == "flops":
        print(f"{result['model']} @ {result['img_size']} px, schedule {result['schedule']}")
        print(
            f"GMACs: {result['gmacs']:.3f} of {result['gmacs_full']:.3f} "
            f"({result['reduction_percent']:.1f}% fewer)"
        )
        print("tokens per layer:", " ".join(str(t) for t in result["tokens"]))
    elif command == "run":
        print(f"{result['model']} on {result['image']}, schedule {result['schedule']}")
        if result.get("crop"):
            print(f"input: {result['crop']}")
        print(
            f"GMACs: {result['gmacs']:.3f} of {result['gmacs_full']:.3f} "
            f"({result['reduction_percent']:.1f}% fewer)"
        )
        print("tokens per layer:", " ".join(str(t) for t in result["tokens"]))
        print(f"feature cosine to the full model: {result['fidelity_cosine']:.5f}")
        for title, key in (("reduced", "top5"), ("full", "top5_full")):
            if key in result:
                print(f"top-5 ({title}):")
                for row in result[key]:
                    print(f"  {row['prob']:.3f}  {row['label']}")
    elif command == "verify":
        print(
            f"{result['model']}: engine vs timm max abs diff {result['max_abs_diff']} "
            f"(tolerance {result['tolerance']})"
        )
        if "onnx_max_abs_diff" in result:
            print(
                f"converted default vs ONNX original: max abs diff "
                f"{result['onnx_max_abs_diff']:.2e} (tolerance 1e-3)"
            )
        print("OK" if result["ok"] else "FAILED")
    elif command == "bench":
        from analysis.bench import format_markdown

        print(format_markdown(result))
    else:
        print(json.dumps(result, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="TokenScope's analysis core: token reduction in timm Vision Transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    flops = sub.add_parser("flops", help="analytic GMACs and token counts of a schedule")
    _add_model_args(flops)
    flops.add_argument(
        "--schedule", default="none", help="e.g. 'tome:r=13' or 'evit:keep=0.7@3,6,9'"
    )
    flops.add_argument("--json", action="store_true", help="print JSON")

    run = sub.add_parser("run", help="run one image with a schedule")
    _add_model_args(run)
    run.add_argument("--image", required=True, help="image file (jpg, png, webp, ...)")
    run.add_argument("--schedule", default="none")
    run.add_argument("--json", action="store_true", help="print JSON")

    verify = sub.add_parser("verify", help="check the engine reproduces timm on a model")
    _add_model_args(verify)
    verify.add_argument("--tol", type=float, default=1e-5, help="max abs diff allowed")
    verify.add_argument("--json", action="store_true", help="print JSON")

    from analysis.bench import add_bench_args

    bench = sub.add_parser("bench", help="engine overhead and ToMe speed-ups, side by side")
    add_bench_args(bench)

    sub.add_parser("train", help="train a learned reducer (see: train --help)", add_help=False)
    sub.add_parser("solve", help="match methods to one cost (see: solve --help)", add_help=False)
    sub.add_parser(
        "sweep", help="trade-off curves over an image set (see: sweep --help)", add_help=False
    )
    sub.add_parser("figure", help="a print figure from JSON (see: figure --help)", add_help=False)
    return parser


_DELEGATED: dict[str, tuple[str, str]] = {
    "train": ("analysis.train", "train_main"),
    "solve": ("analysis.solver", "solve_main"),
    "sweep": ("analysis.sweep_cli", "sweep_main"),
    "figure": ("analysis.figure_cli", "figure_main"),
}
_COMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "flops": cmd_flops,
    "run": cmd_run,
    "verify": cmd_verify,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        import importlib

        module_name, function = _DELEGATED[argv[0]]
        try:
            entry = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError):
            print(f"error: '{argv[0]}' is not available in this version", file=sys.stderr)
            return 2
        return _guarded(lambda: entry(argv[1:]))
    args = build_parser().parse_args(argv)

    def execute() -> int:
        result = _COMMANDS[args.command](args)
        if getattr(args, "json", False):
            print(json.dumps(result, indent=2))
        else:
            _print_human(args.command, result)
        return 0

    return _guarded(execute)


def _guarded(action: Callable[[], int]) -> int:
    """Turn the core's errors into a one-line message and a non-zero exit status."""
    try:
        return action()
    except VerifyFailed as failure:
        print(json.dumps(failure.report, indent=2))
        print(f"error: {failure}", file=sys.stderr)
        return 1
    except TokenScopeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
