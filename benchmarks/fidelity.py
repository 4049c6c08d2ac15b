"""Feature fidelity of the seed methods on the default model, before and after training.

For each learned method at two or three strengths: the cosine similarity between the
reduced and the full model's features (DINOv2's CLS token after the final norm), averaged
over images, against the analytic GMACs. "untrained" is the mean over ``--seeds``
initialisations of the modules training starts from (the same schedules as recorded in the
shipped file): one random initialisation is not a fair baseline, since on 20 images the
spread between seeds (DTEM at r=16: 0.989 to 0.993) exceeds the effect of training.
A file trained ``--init keys`` (DTEM) has one deterministic start, ToMe's metric.
"trained" uses the file in ``assets/``; "gain" is trained minus untrained, paired per
image, ± its standard error. ToMe and EViT are solved to the same GMACs
(``analysis.solver``).

Images: ``offline`` are the 21 scikit-image samples the shipped weights were trained on
(eval centre crops; training saw random crops of them). ``heldout`` are the 20 ImageNet
images in ``foolbox==3.3.4``'s data folder (``pip install --no-deps foolbox==3.3.4``),
never seen in training; skipped when the package is absent.

    python benchmarks/fidelity.py                # both image sets, markdown tables
    python benchmarks/fidelity.py --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.engine import run  # noqa: E402
from analysis.images import load_image, to_tensor  # noqa: E402
from analysis.learned import ASSETS_DIR, attach, load_learned, read_metadata  # noqa: E402
from analysis.models import LoadedModel, load_model  # noqa: E402
from analysis.solver import match_cost  # noqa: E402
from analysis.train import INIT_KEYS, starting_modules  # noqa: E402

# method -> (asset file, schedules at two or three strengths)
METHODS: dict[str, tuple[str, list[str]]] = {
    "dtem": ("dtem-default.safetensors", ["dtem:r=8", "dtem:r=12", "dtem:r=16"]),
    "patchmerger": (
        "patchmerger-default.safetensors",
        ["patchmerger:tokens=8@10", "patchmerger:tokens=8@8", "patchmerger:tokens=8@5"],
    ),
    "cropr": (
        "cropr-default.safetensors",
        ["cropr:rate=8@0-10", "cropr:rate=16@0-10", "cropr:rate=24@0-10"],
    ),
    "ltm": ("ltm-default.safetensors", ["ltm:keep=0.95", "ltm:keep=0.9", "ltm:keep=0.85"]),
    "mstm": (
        "mstm-default.safetensors",
        [
            "mstm:keep=0.7,ms=1@3,6,9",
            "mstm:keep=0.5,ms=1@3,6,9",
            "mstm:keep=0.35,ms=1@3,6,9",
        ],
    ),
}
BASELINES = ("tome:r=8", "evit:keep=0.7@3,6,9")


@dataclass
class Row:
    method: str
    schedule: str
    gmacs: float
    untrained: float
    untrained_sd: float  # between initialisation seeds
    trained: float
    gain: float  # trained − untrained, per image, averaged
    gain_se: float
    tome: float
    tome_schedule: str
    evit: float
    evit_schedule: str
    median_gain: float = float("nan")  # one image can move the mean: see the median too
    better: int = 0  # images where training raised the cosine (by more than 1e-5)
    worse: int = 0


def image_sets(model: LoadedModel, which: str) -> dict[str, torch.Tensor]:
    sets: dict[str, torch.Tensor] = {}
    if which in {"offline", "both"}:
        from analysis.train import offline_images

        sets["offline"] = to_tensor([image for _, image in offline_images()], model.data_config)[0]
    if which in {"heldout", "both"}:
        spec = importlib.util.find_spec("foolbox")
        if spec is None or spec.origin is None:
            print("heldout: foolbox is not installed; skipping", file=sys.stderr)
        else:
            folder = Path(spec.origin).parent / "data"
            paths = sorted(folder.glob("imagenet_*.jpg"))
            sets["heldout"] = to_tensor([load_image(p) for p in paths], model.data_config)[0]
    return sets


def per_image(model: LoadedModel, images: torch.Tensor, full: torch.Tensor, schedule: str):
    features = []
    for start in range(0, images.shape[0], 8):
        features.append(run(model, images[start : start + 8], schedule).features)
    return F.cosine_similarity(torch.cat(features).float(), full.float(), dim=-1)


def fidelity(model: LoadedModel, images: torch.Tensor, full: torch.Tensor, schedule: str):
    return per_image(model, images, full, schedule).mean().item()


def measure(
    model: LoadedModel,
    images: torch.Tensor,
    methods: list[str],
    assets: dict[str, Path] | None = None,
    strengths: int = 3,
    seeds: int = 5,
) -> list[Row]:
    bare = replace(model, learned={})
    full = torch.cat([run(bare, images[i : i + 8]).features for i in range(0, len(images), 8)])
    rows = []
    for method in methods:
        asset, schedules = METHODS[method]
        schedules = schedules[:strengths]
        path = (assets or {}).get(method, ASSETS_DIR / asset)
        if not path.exists():
            print(f"{method}: {path} is missing; skipping", file=sys.stderr)
            continue
        metadata = read_metadata(path)
        trained_with = metadata["schedule"].split(" | ")
        first_seed = int(metadata["seed"])
        if metadata.get("init") == INIT_KEYS:  # one deterministic start: ToMe's metric
            starts = [starting_modules(bare, trained_with, INIT_KEYS)]
        else:
            starts = [
                starting_modules(bare, trained_with, seed=seed, aux_out=bare.facts.dim)
                for seed in range(first_seed, first_seed + seeds)
            ]
        untrained = [attach(bare, [start]) for start in starts]
        trained = attach(bare, [load_learned(path, bare)])
        for schedule in schedules:
            cost = run(trained, images[:1], schedule).cost
            matched = match_cost(bare, list(BASELINES), target_gmacs=cost.gmacs)
            tome, evit = (m.schedule.to_text() for m in matched)
            before = torch.stack([per_image(m, images, full, schedule) for m in untrained])
            after = per_image(trained, images, full, schedule)
            gain = after - before.mean(dim=0)
            rows.append(
                Row(
                    method=method,
                    schedule=schedule,
                    gmacs=cost.gmacs,
                    untrained=before.mean().item(),
                    untrained_sd=before.mean(dim=1).std().item() if len(starts) > 1 else 0.0,
                    trained=after.mean().item(),
                    gain=gain.mean().item(),
                    gain_se=(gain.std() / len(gain) ** 0.5).item(),
                    tome=fidelity(bare, images, full, tome),
                    tome_schedule=tome,
                    evit=fidelity(bare, images, full, evit),
                    evit_schedule=evit,
                    median_gain=gain.median().item(),
                    better=int((gain > 1e-5).sum()),
                    worse=int((gain < -1e-5).sum()),
                )
            )
            print(f"  {rows[-1]}", file=sys.stderr)
        if method == "mstm":  # the training-free core at the same strengths
            for schedule in schedules:
                core = schedule.replace(",ms=1", "")
                value = fidelity(bare, images, full, core)
                print(f"  mstm core {core}: {value:.4f}", file=sys.stderr)
                rows.append(
                    Row(
                        "mstm (core)",
                        core,
                        run(bare, images[:1], core).gmacs,
                        value,
                        0.0,
                        value,
                        0.0,
                        0.0,
                        float("nan"),
                        "",
                        float("nan"),
                        "",
                    )
                )
    return rows


def table(rows: list[Row], full_gmacs: float) -> str:
    lines = [
        "| method | schedule | GMACs | % of full | untrained (± sd over inits) | trained "
        "| gain (± SE) | median gain | images better / worse | ToMe (same GMACs) "
        "| EViT (same GMACs) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        spread = f" ± {row.untrained_sd:.4f}" if row.untrained_sd >= 5e-5 else ""
        gain = "0" if abs(row.gain) < 5e-5 and row.gain_se < 5e-5 else f"{row.gain:+.4f}"
        lines.append(
            f"| {row.method} | `{row.schedule}` | {row.gmacs:.3f} | "
            f"{100 * row.gmacs / full_gmacs:.0f} | {row.untrained:.4f}{spread} | "
            f"{row.trained:.4f} | "
            + (
                f"{gain} ± {row.gain_se:.4f} | {row.median_gain:+.4f} | "
                f"{row.better} / {row.worse} | {row.tome:.4f} | {row.evit:.4f} |"
                if row.tome == row.tome
                else "– | – | – | – | – |"
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", choices=("offline", "heldout", "both"), default="both")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--asset", action="append", default=[], help="METHOD=PATH: use another weights file"
    )
    parser.add_argument("--strengths", type=int, default=3, help="how many strengths per method")
    parser.add_argument(
        "--seeds", type=int, default=5, help="initialisations averaged for 'untrained'"
    )
    args = parser.parse_args(argv)
    assets = {k: Path(v) for k, _, v in (item.partition("=") for item in args.asset)}
    torch.manual_seed(0)
    started = time.perf_counter()
    model = load_model("default")
    full_gmacs = run(replace(model, learned={}), torch.zeros(1, 3, 224, 224)).gmacs
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "full_gmacs": full_gmacs,
        "sets": {},
    }
    for name, images in image_sets(model, args.images).items():
        print(f"{name}: {images.shape[0]} images", file=sys.stderr)
        rows = measure(model, images, args.methods, assets, args.strengths, args.seeds)
        report["sets"][name] = [row.__dict__ for row in rows]
        print(f"\n### {name} images ({images.shape[0]}), feature cosine to the full model\n")
        print(f"Full model: {full_gmacs:.3f} GMACs.\n")
        print(table(rows, full_gmacs))
        print(
            "\nMatched baselines: "
            + "; ".join(
                f"{r.method}@{r.gmacs:.2f}: {r.tome_schedule} / {r.evit_schedule}"
                for r in rows
                if r.tome_schedule
            )
        )
    report["seconds"] = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"\n({report['seconds']:.0f} s, {report['machine']}, {report['threads']} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
