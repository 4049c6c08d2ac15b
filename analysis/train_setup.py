"""Everything built before step 0: the modules, the optimiser, the schedule plans.

:func:`prepare_run` gathers them in a :class:`TrainRun`, which the step loop
(:mod:`analysis.train_loop`) and the checkpoints (:mod:`analysis.train_checkpoint`) share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from analysis.errors import TokenScopeError
from analysis.holdout import BestStep, Validation
from analysis.learned import (
    INIT_KEYS,
    LearnedReducer,
    attach,
    init_weights,
    load_learned,
)
from analysis.models import LoadedModel
from analysis.reducers.base import LearnedWeights
from analysis.train_config import TrainConfig
from analysis.train_data import ImageSet
from analysis.train_losses import IBState, refresh_ib, start_ib


@dataclass
class Optimization:
    """The modules being trained and what updates them."""

    trained: LearnedWeights
    trainable: list[Tensor]  # the trained modules' parameters (clipped together)
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: Any  # LambdaLR: warm-up, then cosine
    autocast: Any  # a reusable autocast context (disabled on the CPU)
    scaler: torch.amp.GradScaler | None  # float16 on the GPU only


@dataclass
class TrainRun:
    """What the step loop, validation and checkpoints share; built once, before step 0."""

    config: TrainConfig
    method: str
    model: LoadedModel  # with ``unfreeze``, its module is the copy being trained
    images: ImageSet
    transform: Callable
    opt: Optimization
    student: LoadedModel  # ``model`` with the trained modules attached
    unreduced: Any  # the teacher's plan: no reduction
    plans: list[Any]  # the schedules trained, resolved; step k trains plans[k % len]
    ib: IBState | None = None  # LTM with labels: the information-bottleneck clusters
    kept: BestStep | None = None  # with held-out images: validation and the best step

    def ib_active(self, step: int) -> bool:
        """Whether ``step`` adds the IB term (it starts ``ib_start`` of the way in)."""
        config = self.config
        return self.ib is not None and step >= int(config.ib_start * config.steps)

    def refresh_ib(self, plan: Any) -> None:
        """Refit the IB output clusters with the reduced model as it now is, under ``plan``."""
        assert self.ib is not None
        config = self.config
        refresh_ib(
            self.ib,
            self.images,
            self.student,
            plan,
            config.batch_size,
            config.ib_clusters,
            config.seed,
        )


def learned_method(model: LoadedModel, schedules: tuple[str, ...]) -> str:
    """The one learned method the schedules train (other, training-free methods may join)."""
    from analysis.schedule import parse_schedule

    methods = set()
    for text in schedules:
        for _, reducer in parse_schedule(text).resolve(model.facts).reducers():
            if isinstance(reducer, LearnedReducer) and reducer.wants_weights():
                methods.add(reducer.name)
    if len(methods) != 1:
        found = ", ".join(sorted(methods)) or "none"
        raise TokenScopeError(
            "the training schedules must run exactly one learned method with trainable parts "
            f"(dtem, patchmerger, cropr, ltm, or mstm with ms=1); found: {found}"
        )
    return methods.pop()


def prepare_run(
    model: LoadedModel,
    config: TrainConfig,
    method: str,
    images: ImageSet,
    transform: Callable,
    held: ImageSet | None,
) -> TrainRun:
    """Modules and optimiser, the resolved plans, LTM's clusters, the held-out views."""
    from analysis.schedule import parse_schedule

    opt = optimization(model, config, method)
    facts = model.facts
    run = TrainRun(
        config=config,
        method=method,
        model=model,
        images=images,
        transform=transform,
        opt=opt,
        student=attach(model, [opt.trained]),
        unreduced=parse_schedule("none").resolve(facts),
        plans=[parse_schedule(text).resolve(facts) for text in config.schedules],
    )
    if method == "ltm" and images.labels is not None and config.ib_weight > 0:
        run.ib = start_ib(images, model, config.ib_clusters, config.seed)
    if held is not None:
        views = config.val_views if config.augment else 1  # eval crops are all the same
        validation = Validation.build(model, held, transform, views, config.seed, config.batch_size)
        run.kept = BestStep(validation, every=config.val_every or max(1, config.steps // 12))
    return run


def optimization(model: LoadedModel, config: TrainConfig, method: str) -> Optimization:
    """The starting modules in training mode, AdamW over them (and the backbone if unfrozen)."""
    from analysis.reducers import reducer_class

    facts = model.facts
    aux_out = facts.num_classes if model.is_classifier else facts.dim
    trained = starting_modules(model, config.schedules, config.init, config.seed, aux_out)
    for item in trained.modules.values():
        item.train().requires_grad_(True)
    trainable = [p for m in trained.modules.values() for p in m.parameters()]
    lr = config.lr if config.lr is not None else reducer_class(method).default_lr
    groups = [{"params": trainable, "lr": lr}]
    if config.unfreeze:
        groups.append({"params": list(model.module.parameters()), "lr": config.backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    factor = warmup_cosine(config.steps, config.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    autocast, scaler = _autocast(model.device, config.amp)
    return Optimization(trained, trainable, lr, optimizer, scheduler, autocast, scaler)


def warmup_cosine(steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """The learning-rate factor of a step: a linear warm-up, then a cosine down to 0.

    A closure, not a callable object: ``LambdaLR`` would save an object's attributes in
    the resume file.
    """
    warmup = max(1, int(warmup_fraction * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return lr_factor


def _autocast(device: torch.device, enabled: bool) -> tuple[Any, torch.amp.GradScaler | None]:
    if device.type != "cuda" or not enabled:
        return torch.autocast(device.type, enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def starting_modules(
    model: LoadedModel,
    schedules: tuple[str, ...] | list[str],
    init: str | Path | None = None,
    seed: int = 0,
    aux_out: int = 0,
) -> LearnedWeights:
    """The modules training starts from: new ones (seeded), the keys, or a weights file."""
    method = learned_method(model, tuple(schedules))
    trained = init_weights(model, schedules, aux_out=aux_out, seed=seed)[method]
    if init is not None and str(init) == INIT_KEYS:
        _start_from_keys(trained, model, method)
    elif init is not None:
        _load_into(trained, load_learned(init, model))
    return trained


def _start_from_keys(target: LearnedWeights, model: LoadedModel, method: str) -> None:
    from analysis.reducers.dtem import metric_from_keys

    if method != "dtem":
        raise TokenScopeError(
            f"--init {INIT_KEYS} starts DTEM's metric layers from the attention keys; "
            f"{method} has no such layers. Use a weights file or leave --init out."
        )
    for layer, module in target.modules.items():
        start = metric_from_keys(model.module.blocks[layer].attn)
        if start.proj.weight.shape != module.proj.weight.shape:
            raise TokenScopeError(
                f"--init {INIT_KEYS}: block {layer}'s keys are {start.proj.out_features} wide "
                f"per head, but the metric layer has {module.proj.out_features} outputs"
            )
        module.load_state_dict(start.state_dict())


def _load_into(target: LearnedWeights, source: LearnedWeights) -> None:
    for layer, module in target.modules.items():
        if layer in source.modules:
            module.load_state_dict(source.modules[layer].state_dict(), strict=False)


__all__ = [
    "Optimization",
    "TrainRun",
    "learned_method",
    "optimization",
    "prepare_run",
    "starting_modules",
    "warmup_cosine",
]
