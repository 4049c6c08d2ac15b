"""What a training run is asked for (:class:`TrainConfig`) and what it gives back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import TokenScopeError
from analysis.holdout import AUTO
from analysis.train_data import OFFLINE


@dataclass
class TrainConfig:
    """How to train; the defaults are the CPU recipe used for the shipped weights."""

    schedules: tuple[str, ...]
    out: Path
    data: str = OFFLINE
    labels: str = "auto"  # auto | on | off
    steps: int = 300
    batch_size: int = 8
    lr: float | None = None  # None: the method's default_lr
    weight_decay: float = 1e-4
    warmup: float = 0.05  # fraction of the steps
    clip_grad: float = 5.0
    unfreeze: bool = False
    backbone_lr: float = 1e-5
    augment: bool = True
    seed: int = 0
    amp: bool = True
    ib_weight: float = 0.1
    ib_start: float = 0.3  # fraction of the steps before the IB term starts (LTM, labels)
    ib_clusters: int = 1000
    checkpoint_every: int = 50
    workers: int = 0  # batch-preparing processes (0: in this process)
    balance: bool = True  # several schedules: divide each one's loss by its running mean
    val: int = AUTO  # images held out for validation (AUTO: a quarter, none below 8 images)
    val_views: int = 4  # views per held-out image: the eval crop and seeded random ones
    val_every: int = 0  # steps between validations (0: about twelve per run)
    mix: float | None = None  # CutMix/Mixup probability (None: 0.5 distilling, 0 with labels)
    resume: bool = False
    init: str | Path | None = None  # a weights file, or INIT_KEYS (DTEM: start as ToMe)
    stop_after: int | None = None  # stop (resumably) after this many steps in this call
    progress: bool = True
    command: str = ""


@dataclass
class TrainResult:
    path: Path
    method: str
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    backbone_path: Path | None = None
    kept_step: int | None = None  # with validation: the step whose modules were saved

    @property
    def first_loss(self) -> float:
        head = self.losses[: max(1, len(self.losses) // 10)]
        return float(np.mean(head))

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return float(np.mean(tail))


def mix_probability(config: TrainConfig, labelled: bool) -> float:
    """CutMix/Mixup per batch: 0.5 when distilling unless set; labels refuse any."""
    if config.mix is None:
        return 0.0 if labelled else 0.5
    if config.mix > 0 and labelled:
        raise TokenScopeError("--mix needs distillation (no labels): use --labels off")
    return config.mix


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


__all__ = ["TrainConfig", "TrainResult", "config_dict", "mix_probability"]
