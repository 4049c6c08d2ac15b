"""Train learned reducers: ``python -m analysis train ...`` or :func:`train` from Python.

Without labels the reduced model is distilled from the unreduced one: KL divergence on the
logits for classifiers, 1 − cosine on the pooled features for backbones. With labels (an
ImageFolder layout) the loss is cross-entropy, plus each method's own loss: Cropr's
auxiliary heads always, LTM's information-bottleneck bound when labels are given. The
backbone is frozen ("modular" training, as in DTEM) unless ``--unfreeze``.

The result is a safetensors file with metadata (method, backbone, schedule, data, steps,
loss, command) that ``load_model(..., learned=[path])`` and the app accept. A resume file
(``OUT.resume.pt``) is written as training goes, and ``--resume`` continues from it.

:func:`train` runs the steps in order, each in its own module: the data
(:mod:`analysis.train_data`, :mod:`analysis.train_batches`), the modules, optimiser and
schedule plans (:mod:`analysis.train_setup`), the step loop (:mod:`analysis.train_loop`),
validation on held-out images (:mod:`analysis.holdout`) and checkpointing
(:mod:`analysis.train_checkpoint`). This module keeps the public names and the command line.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from analysis.errors import TokenScopeError
from analysis.holdout import AUTO
from analysis.learned import INIT_KEYS
from analysis.models import LoadedModel
from analysis.train_batches import sample_batch, training_images
from analysis.train_checkpoint import resume_or_start, resume_path, save_backbone, save_weights
from analysis.train_config import TrainConfig, TrainResult, config_dict, mix_probability
from analysis.train_data import (
    IMAGE_SUFFIXES,
    OFFLINE,
    OFFLINE_IMAGES,
    ImageSet,
    load_images,
    make_transform,
    offline_images,
)
from analysis.train_loop import run_steps
from analysis.train_losses import distill_loss
from analysis.train_setup import learned_method, prepare_run, starting_modules


def train(model: LoadedModel, config: TrainConfig) -> TrainResult:
    """Train the learned reducer that ``config.schedules`` run on ``model``; save it.

    ``model`` is never modified: with ``unfreeze`` a copy of its module is trained (and
    saved next to the weights as ``OUT.backbone.safetensors``).
    """
    if not config.schedules:
        raise TokenScopeError("give at least one --schedule to train")
    started = time.perf_counter()
    method = learned_method(model, config.schedules)
    images, held = training_images(model, config)
    transform = make_transform(model, config.augment)
    if config.unfreeze:
        model = replace(model, module=copy.deepcopy(model.module).train().requires_grad_(True))
    run = prepare_run(model, config, method, images, transform, held)
    progress = resume_or_start(run)
    run_steps(run, progress)
    kept = run.kept  # with held-out images: load the best step's modules
    validated = {} if kept is None else kept.keep_best(run.opt.trained.modules, config.steps)
    result = TrainResult(
        path=config.out,
        method=method,
        steps=len(progress.losses),
        losses=progress.losses,
        seconds=time.perf_counter() - started,
        kept_step=kept.best["step"] if kept is not None and validated else None,
    )
    if config.unfreeze:
        result.backbone_path = save_backbone(run)
    save_weights(run, result, validated)
    return result


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis train",
        description=(
            "Train a learned reducer (dtem, patchmerger, cropr, ltm, or mstm with ms=1) on a "
            "backbone. Without labels: distillation from the unreduced model. The backbone "
            "is frozen unless --unfreeze. Writes OUT (safetensors with metadata) and "
            "OUT.resume.pt."
        ),
        epilog=(
            "example: python -m analysis train --schedule 'dtem:r=16' --steps 300 "
            "--out assets/dtem-default.safetensors"
        ),
    )
    parser.add_argument(
        "--schedule",
        action="append",
        required=True,
        help="a schedule to train under (repeat it to alternate between several per step)",
    )
    parser.add_argument("--model", default="default", help="'default' or a timm ViT name")
    parser.add_argument(
        "--weights", default=None, help="backbone weights: 'hub', 'random' or a checkpoint path"
    )
    parser.add_argument("--img-size", type=int, default=None, help="input size in pixels")
    parser.add_argument(
        "--data",
        default=OFFLINE,
        help="'offline' (scikit-image samples) or an image folder; one subfolder per class "
        "gives labels (default: %(default)s)",
    )
    parser.add_argument("--labels", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--out", type=Path, default=None, help="output .safetensors path")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--lr", type=float, default=None, help="AdamW learning rate (default: the method's own)"
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of steps")
    parser.add_argument("--unfreeze", action="store_true", help="train the backbone too")
    parser.add_argument("--backbone-lr", type=float, default=1e-5)
    parser.add_argument("--no-augment", action="store_true", help="eval crops, no augmentation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on the GPU")
    parser.add_argument(
        "--init",
        default=None,
        help=f"start from a weights file, or '{INIT_KEYS}' (DTEM: from the attention keys, "
        "i.e. from ToMe's metric)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT.resume.pt")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop after N steps (continue: --resume)"
    )
    parser.add_argument("--ib-weight", type=float, default=0.1, help="LTM's IB term weight")
    parser.add_argument("--ib-clusters", type=int, default=1000)
    parser.add_argument(
        "--workers", type=int, default=0, help="processes preparing batches (0: none)"
    )
    parser.add_argument(
        "--no-balance",
        action="store_true",
        help="with several schedules, do not divide each one's loss by its running mean",
    )
    parser.add_argument(
        "--val",
        type=int,
        default=AUTO,
        help="images held out of training. The step saved (step 0 included) is worse than "
        "untrained at no schedule on them, or the least so, then best on average (default: "
        "a quarter of the images, at most 256, none below 8)",
    )
    parser.add_argument(
        "--val-views", type=int, default=4, help="views per held-out image (1 with --no-augment)"
    )
    parser.add_argument(
        "--val-every", type=int, default=0, help="steps between validations (0: steps/12)"
    )
    parser.add_argument(
        "--mix",
        type=float,
        default=None,
        help="probability of CutMix/Mixup per batch (default: 0.5 without labels, 0 with)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def train_main(argv: list[str]) -> int:
    """``python -m analysis train ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _train_from_args(args, argv)
    except TokenScopeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _train_from_args(args: argparse.Namespace, argv: list[str]) -> int:
    from analysis.models import load_model

    if args.steps < 1 or args.batch_size < 1:
        raise TokenScopeError("--steps and --batch-size must be at least 1")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise TokenScopeError("--device cuda was asked for, but no CUDA GPU is available")
    model = load_model(args.model, weights=args.weights, device=device, img_size=args.img_size)
    model = replace(model, learned={})  # train from scratch, not from the shipped files
    method = learned_method(model, tuple(args.schedule))
    out = args.out or Path("runs") / f"{method}-{model.name}.safetensors"
    same_names = (
        "data", "labels", "steps", "batch_size", "lr", "weight_decay", "warmup", "unfreeze",
        "backbone_lr", "seed", "ib_weight", "ib_clusters", "checkpoint_every", "resume",
        "init", "stop_after", "workers", "val", "val_views", "val_every", "mix",
    )  # fmt: skip
    config = TrainConfig(
        schedules=tuple(args.schedule),
        out=out,
        augment=not args.no_augment,
        amp=not args.no_amp,
        balance=not args.no_balance,
        progress=not args.quiet,
        command="python -m analysis train " + shlex.join(argv),
        **{name: getattr(args, name) for name in same_names},
    )
    result = train(model, config)
    kept = ""
    if result.kept_step is not None:
        kept = f" (modules of step {result.kept_step}, the best on the held-out images)"
    print(
        f"{method}: {result.steps} steps in {result.seconds:.0f} s, loss "
        f"{result.first_loss:.4f} -> {result.final_loss:.4f}; saved {result.path}{kept}"
    )
    if result.backbone_path is not None:
        print(f"tuned backbone saved to {result.backbone_path}")
    return 0


__all__ = [
    "AUTO",
    "IMAGE_SUFFIXES",
    "INIT_KEYS",
    "OFFLINE",
    "OFFLINE_IMAGES",
    "ImageSet",
    "TrainConfig",
    "TrainResult",
    "build_parser",
    "config_dict",
    "distill_loss",
    "learned_method",
    "load_images",
    "make_transform",
    "mix_probability",
    "offline_images",
    "resume_path",
    "sample_batch",
    "starting_modules",
    "train",
    "train_main",
]
