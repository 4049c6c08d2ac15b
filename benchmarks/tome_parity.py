"""Our ToMe against the official implementation (facebookresearch/ToMe), side by side.

The official code is not a dependency: point ``--tome-repo`` at a clone of it. It patches
a *copy* of the model in place (its way); ours runs the untouched model. For each model and
r we print the max abs difference of the logits, whether the top-1 agrees, and whether the
merge groups (official ``source`` maps vs our trace) are identical.

    python benchmarks/tome_parity.py --tome-repo /path/to/ToMe
"""

from __future__ import annotations

import argparse
import copy
import sys

import timm
import torch

from analysis import run
from analysis.models import from_module


def official_groups(source: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Patch -> token index from ToMe's source matrix [B, T, N_in]."""
    return source[:, :, num_prefix:].argmax(dim=1)


def compare(name: str, r: int, tome_module, images: torch.Tensor) -> dict:
    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False).eval()
    ours = run(from_module(module, name), images, f"tome:r={r}")
    patched = copy.deepcopy(module)
    tome_module.patch.timm(patched, trace_source=True, prop_attn=True)
    patched.r = r
    with torch.inference_mode():
        reference = patched(images)
    source = patched._tome_info["source"]
    groups = official_groups(source, module.num_prefix_tokens)
    same_groups = torch.equal(groups, ours.trace.layers[-1].owner.long())
    return {
        "model": name,
        "r": r,
        "max_abs_logit_diff": (ours.logits - reference).abs().max().item(),
        "top1_agree": bool((ours.logits.argmax(-1) == reference.argmax(-1)).all()),
        "identical_merge_groups": same_groups,
        "tokens_out": ours.tokens[-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tome-repo", required=True, help="a clone of facebookresearch/ToMe")
    parser.add_argument(
        "--models",
        nargs="+",
        default=[
            "deit_small_patch16_224",
            "deit_tiny_distilled_patch16_224",
            "vit_base_patch16_224",
        ],
    )
    parser.add_argument("--r", type=int, nargs="+", default=[8, 13, 16])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    sys.path.insert(0, args.tome_repo)
    import tome  # the official package, from the clone

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, 224, 224, generator=generator)
    print("| model | r | max abs logit diff | top-1 agrees | identical merge groups |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for name in args.models:
        for r in args.r:
            row = compare(name, r, tome, images)
            worst = max(worst, row["max_abs_logit_diff"])
            print(
                f"| {name} | {r} | {row['max_abs_logit_diff']:.2e} | {row['top1_agree']} | "
                f"{row['identical_merge_groups']} |"
            )
    print(f"\nworst max abs logit difference: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
