"""Produce the numeric fixtures of ``tests/test_official_fixtures.py`` from the official code.

Usage::

    git clone https://github.com/movinghoon/DTEM /tmp/DTEM
    git clone https://github.com/benbergner/cropr /tmp/cropr
    python scripts/make_official_fixtures.py --dtem /tmp/DTEM --cropr /tmp/cropr \
        --out tests/fixtures/official/

The official modules are imported from the clones, unmodified and without stubs: DTEM's
``dtem`` package (``dtem/dtem.py``, ``dtem/utils.py``) and Cropr's ``cls/cropr.py`` and
``cls/vision_transformer.py`` need only torch and timm. They run on small seeded inputs
(random tensors and tiny random-weight timm ViTs), and the inputs, the weights, the outputs
and the gradients are saved as plain tensors (``torch.save`` of dicts; loadable with
``weights_only=True``). Only numbers are kept, never the official code.

Fixtures (each records the repository commit it came from):

* ``dtem_merge.pt``: DTEM's merge on its own, ``DTEMBlock._merge_eval`` (ToMe's matching
  on the metric) and ``DTEMBlock._merge_train`` (the soft relaxation), with the metric from
  the block's own ``DTEMLinear``; training cases with other k2 and temperatures (τ1 ≠ τ2),
  an inactive tail, r above its cap, non-unit sizes, and the gradients of a fixed linear
  function of the outputs with respect to the metric layer, the tokens and the sizes.
* ``dtem_model.pt``: a tiny ViT patched by ``dtem.patch`` (r = 3 per block, the official
  k2 = 3, τ1 = τ2 = 0.1): logits at inference, and in training the logits, the
  cross-entropy and the gradients of every block's metric layer. ``zero_sizes`` counts
  the tokens whose soft size became exactly 0 in that forward (the case the engine's
  ``log(size + eps)`` exists for).
* ``cropr_module.pt``: one ``Cropr`` module (one query, one head, MLP, auxiliary head):
  the scores, the kept and pruned tokens, the auxiliary prediction and the gradients of a
  cross-entropy on it.
* ``cropr_model.pt``: a tiny Cropr ``VisionTransformer`` at inference, with and without
  last-layer fusion: its logits, per-module schedule and weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DIM = 8  # token width of the module-level cases
BATCH = 2


def commit_of(path: Path) -> str:
    """The clone's commit, or 'unknown' when it is not a git checkout."""
    try:
        found = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return found.stdout.strip()


def load_file(name: str, path: Path) -> ModuleType:
    """Import one source file as a module of the given name."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def plain(values: dict[str, Any]) -> dict[str, Any]:
    """Detached, contiguous CPU copies of every tensor (nested dicts and lists kept)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Tensor):
            out[key] = value.detach().cpu().contiguous().clone()
        elif isinstance(value, dict):
            out[key] = plain(value)
        elif isinstance(value, list):
            out[key] = [plain({"_": v})["_"] for v in value]
        else:
            out[key] = value
    return out


def random_sizes(batch: int, tokens: int, generator: torch.Generator) -> Tensor:
    """Distinct non-integer sizes (CLS at 1), so that every merge weight matters."""
    size = 0.5 + 3.0 * torch.rand(batch, tokens, generator=generator)
    size[:, 0] = 1.0
    return size


# ----------------------------------------------------------------------------------- DTEM


def dtem_block(official: ModuleType, dim: int, heads: int, k2: int, tau1: float, tau2: float):
    """A timm Block patched into the official ``DTEMBlock`` (metric layer included)."""
    from timm.models.vision_transformer import Block

    block = Block(dim=dim, num_heads=heads, qkv_bias=True)
    block.__class__ = official.DTEMBlock
    block.patch(k2, tau1, tau2)
    return block


def dtem_merge_cases(official: ModuleType) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(11)
    heads = 2  # head_dim 4: the metric has 4 features
    eval_cases, train_cases = [], []

    # inference: the block's fused DTEMLinear gives the metric, _merge_eval merges
    for tokens, r in ((17, 5), (16, 7), (12, 20)):
        torch.manual_seed(100 + tokens)
        block = dtem_block(official, DIM, heads, 3, 0.1, 0.1).eval()
        x = torch.randn(BATCH, tokens, DIM, generator=generator)
        size = random_sizes(BATCH, tokens, generator)
        block_input = torch.randn(BATCH, tokens, DIM, generator=generator)
        with torch.no_grad():
            _, metric = block.attn.qkv(block_input)
            out_x, out_size, _, _ = block._merge_eval(x, size, r, {"metric": metric})
        layer = block.attn.qkv.metric_layer
        eval_cases.append(
            {
                "r": r,
                "x": x,
                "size": size,
                "block_input": block_input,
                "metric_weight": layer.weight,
                "metric_bias": layer.bias,
                "out_x": out_x,
                "out_size": out_size,
            }
        )

    # training: the soft relaxation, with gradients
    settings = [
        # (tokens, active n, r, k2, tau1, tau2)
        (17, 17, 4, 3, 0.1, 0.1),  # the official defaults
        (17, 13, 3, 2, 0.05, 0.3),  # τ1 ≠ τ2, other k2, an inactive tail
        (16, 12, 7, 3, 0.2, 0.07),  # r above its cap (n - 1) // 2 = 5
        (15, 15, 2, 4, 0.5, 1.5),  # warm temperatures: a spread-out assignment
    ]
    for tokens, active, r, k2, tau1, tau2 in settings:
        torch.manual_seed(200 + tokens + r)
        block = dtem_block(official, DIM, heads, k2, tau1, tau2).train()
        x = torch.randn(BATCH, tokens, DIM, generator=generator).requires_grad_(True)
        size = random_sizes(BATCH, tokens, generator).requires_grad_(True)
        block_input = torch.randn(BATCH, tokens, DIM, generator=generator)
        _, metric = block.attn.qkv(block_input)  # training: metric_layer(input.detach())
        out_x, out_size, out_n, _ = block._merge_train(x, size, r, active, {"metric": metric})
        weight_x = torch.randn(out_x.shape, generator=generator)
        weight_size = torch.randn(out_size.shape, generator=generator)
        loss = (out_x * weight_x).sum() + (out_size * weight_size).sum()
        loss.backward()
        layer = block.attn.qkv.metric_layer
        train_cases.append(
            {
                "active": active,
                "r": r,
                "k2": k2,
                "tau1": tau1,
                "tau2": tau2,
                "x": x,
                "size": size,
                "block_input": block_input,
                "metric_weight": layer.weight,
                "metric_bias": layer.bias,
                "out_x": out_x,
                "out_size": out_size,
                "out_active": out_n,
                "weight_x": weight_x,
                "weight_size": weight_size,
                "grad_metric_weight": layer.weight.grad,
                "grad_metric_bias": layer.bias.grad,
                "grad_x": x.grad,
                "grad_size": size.grad,
            }
        )
    return {"eval": eval_cases, "train": train_cases}


TINY_DTEM = {
    "model_name": "vit_tiny_patch16_224",
    "embed_dim": 16,
    "num_heads": 2,
    "depth": 3,
    "mlp_ratio": 2.0,
    "patch_size": 4,
    "img_size": 16,
    "num_classes": 5,
}


def tiny_vit(config: dict[str, Any]):
    import timm

    kwargs = {k: v for k, v in config.items() if k != "model_name"}
    return timm.create_model(config["model_name"], pretrained=False, **kwargs)


def dtem_model_case(official: ModuleType) -> dict[str, Any]:
    torch.manual_seed(7)
    model = tiny_vit(TINY_DTEM)
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    model = official.patch(model, k2=3, tau1=0.1, tau2=0.1)
    r = 3
    model.update_r(r)
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(BATCH, 3, 16, 16, generator=generator)
    labels = torch.tensor([1, 4])

    zero_sizes = [0]
    merge_train = official.DTEMBlock._merge_train

    def counting(self, x, size, r, n, out_dict):  # counts exact zeros; changes nothing
        result = merge_train(self, x, size, r, n, out_dict)
        zero_sizes[0] += int((result[1] == 0).sum())
        return result

    official.DTEMBlock._merge_train = counting
    try:
        model.train()
        logits_train = model(images)
        loss = F.cross_entropy(logits_train, labels)
        loss.backward()
    finally:
        official.DTEMBlock._merge_train = merge_train
    model.eval()
    with torch.no_grad():
        logits_eval = model(images)
    metric = [block.attn.qkv.metric_layer for block in model.blocks]
    return {
        "config": dict(TINY_DTEM),
        "r": r,
        "backbone": backbone,
        "metric_weight": [m.weight for m in metric],
        "metric_bias": [m.bias for m in metric],
        "images": images,
        "labels": labels,
        "logits_eval": logits_eval,
        "logits_train": logits_train,
        "loss_train": loss,
        "grad_metric_weight": [m.weight.grad for m in metric],
        "grad_metric_bias": [m.bias.grad for m in metric],
        "zero_sizes": zero_sizes[0],
    }


# ---------------------------------------------------------------------------------- Cropr


def cropr_module_case(official: ModuleType) -> dict[str, Any]:
    torch.manual_seed(5)
    classes, rate, tokens = 5, 3, 13
    module = official.Cropr(
        pruning_rate=rate,
        num_classes=classes,
        embed_dim=DIM,
        num_heads=1,
        mlp=True,
        mlp_ratio=4.0,
        training=True,
    )
    # A trained query is far from its initialisation; make the scores spread out.
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        module.cross_attn.queries.copy_(torch.randn(1, 1, DIM, generator=generator))
    x = torch.randn(BATCH, tokens, DIM, generator=generator)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        scores = module.cross_attn.forward_scorer(x).clone()
        kept_eval, pruned_eval, _ = module(x.clone(), inference=True)
    x_train = x.clone().requires_grad_(True)
    kept_train, _, pred = module(x_train, inference=False)
    loss = F.cross_entropy(pred, labels)
    loss.backward()
    cross = module.cross_attn
    weights = {
        "query": cross.queries[0, 0],
        "mlp_norm.weight": cross.mlp_norm.weight,
        "mlp_norm.bias": cross.mlp_norm.bias,
        "fc1.weight": cross.mlp.fc1.weight,
        "fc1.bias": cross.mlp.fc1.bias,
        "fc2.weight": cross.mlp.fc2.weight,
        "fc2.bias": cross.mlp.fc2.bias,
        "head_norm.weight": module.head.norm.weight,
        "head_norm.bias": module.head.norm.bias,
        "head.weight": module.head.head.weight,
        "head.bias": module.head.head.bias,
    }
    grads = {
        "query": cross.queries.grad[0, 0],
        "fc1.weight": cross.mlp.fc1.weight.grad,
        "fc2.weight": cross.mlp.fc2.weight.grad,
        "head.weight": module.head.head.weight.grad,
        "head.bias": module.head.head.bias.grad,
    }
    return {
        "rate": rate,
        "classes": classes,
        "x": x,
        "labels": labels,
        "weights": weights,
        "scores": scores,
        "kept": kept_eval,
        "pruned": pruned_eval,
        "kept_train": kept_train,
        "pred": pred,
        "loss": loss,
        "grads": grads,
        "x_grad_is_none": x_train.grad is None,
    }


TINY_CROPR = {
    "embed_dim": 8,
    "num_heads": 2,
    "depth": 4,
    "patch_size": 4,
    "img_size": 16,
    "num_classes": 5,
    "drop_path_rate": 0.0,
}


def cropr_model_case(vit_module: ModuleType) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(21)
    images = torch.randn(BATCH, 3, 16, 16, generator=generator)
    rate = 3
    cases = {}
    backbone = None
    for llf in (False, True):
        cfg = {
            "use_cropr": True,
            "pruning_rate": rate,
            "llf": llf,
            "num_queries": 1,
            "num_heads": 1,
            "pre_attn_norm": False,
            "q_proj": False,
            "k_proj": False,
            "v_proj": False,
            "mlp": True,
            "mlp_ratio": 4,
            "training": False,
        }
        torch.manual_seed(13)
        model = vit_module.VisionTransformer(cfg, **TINY_CROPR).eval()
        if backbone is None:
            backbone = {k: v.clone() for k, v in model.state_dict().items() if "cropr" not in k}
        else:  # the same backbone for both: only the Cropr modules differ
            missing = model.load_state_dict(backbone, strict=False).missing_keys
            if any(not key.startswith("cropr.") for key in missing):
                raise SystemExit(f"backbone keys missing: {missing}")
        generator_q = torch.Generator().manual_seed(17)
        with torch.no_grad():
            for item in model.cropr:
                item.cross_attn.queries.copy_(
                    torch.randn(1, 1, TINY_CROPR["embed_dim"], generator=generator_q)
                )
            logits = model(images)
        cases["llf" if llf else "plain"] = {
            "llf": llf,
            "schedule": [item.pruning_rate for item in model.cropr],
            "queries": [item.cross_attn.queries[0, 0].clone() for item in model.cropr],
            "logits": logits,
        }
    return {
        "config": dict(TINY_CROPR),
        "rate": rate,
        "backbone": backbone,
        "images": images,
        **cases,
    }


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtem", type=Path, required=True, help="a clone of movinghoon/DTEM")
    parser.add_argument("--cropr", type=Path, required=True, help="a clone of benbergner/cropr")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/official"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # the official code's deprecated autocast calls
    torch.set_num_threads(1)

    sys.path.insert(0, str(args.dtem.resolve()))
    import dtem  # the official package: dtem/__init__.py, dtem/dtem.py, dtem/utils.py

    dtem_official = sys.modules["dtem.dtem"]
    if not hasattr(dtem, "patch") or not hasattr(dtem_official, "DTEMBlock"):
        raise SystemExit(f"{args.dtem} does not look like movinghoon/DTEM")
    cls_dir = (args.cropr / "cls").resolve()
    sys.path.insert(0, str(cls_dir))  # vision_transformer.py does `from cropr import Cropr`
    cropr_official = load_file("cropr", cls_dir / "cropr.py")
    vit_official = load_file("cropr_vision_transformer", cls_dir / "vision_transformer.py")

    sources = {
        "dtem": f"movinghoon/DTEM@{commit_of(args.dtem)}",
        "cropr": f"benbergner/cropr@{commit_of(args.cropr)}",
    }
    made = {
        "dtem_merge.pt": {"source": sources["dtem"], **dtem_merge_cases(dtem_official)},
        "dtem_model.pt": {"source": sources["dtem"], **dtem_model_case(dtem_official)},
        "cropr_module.pt": {"source": sources["cropr"], **cropr_module_case(cropr_official)},
        "cropr_model.pt": {"source": sources["cropr"], **cropr_model_case(vit_official)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, content in made.items():
        path = args.out / name
        torch.save(plain(content), path)
        total += path.stat().st_size
        print(f"{path}: {path.stat().st_size / 1024:.1f} KiB")
    zero = made["dtem_model.pt"]["zero_sizes"]
    print(f"total {total / 1024:.1f} KiB; DTEM training forward: {zero} sizes exactly 0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
