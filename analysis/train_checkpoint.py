"""Checkpointing: the resume file written as training goes, and the files a run leaves.

Every file is written beside its place and then renamed over it, so a run killed at any
moment leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from analysis.errors import TokenScopeError
from analysis.learned import backbone_id, save_learned
from analysis.train_config import TrainConfig, TrainResult, mix_probability
from analysis.train_setup import TrainRun


@dataclass
class Progress:
    """Where training stands: the steps done and their losses, as a resume file keeps them."""

    start: int  # the first step this call runs
    losses: list[float] = field(default_factory=list)
    balance: list[float | None] = field(default_factory=list)  # each schedule's running loss


def resume_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume.pt")


def checkpoint_due(config: TrainConfig, done: int) -> bool:
    """Whether to write the resume file after ``done`` steps (always after the last)."""
    every = config.checkpoint_every
    return bool(every and (done % every == 0 or done == config.steps))


def resume_or_start(run: TrainRun) -> Progress:
    """Step 0, or with ``resume`` where the resume file left off (modules, optimiser, ...)."""
    config = run.config
    checkpoint = resume_path(config.out)
    if config.resume and checkpoint.exists():
        progress = restore(checkpoint, run)
        if run.ib_active(progress.start):
            from analysis.engine import attach_weights

            attach_weights(run.plans[0], run.student)  # no step has bound them yet
            run.refresh_ib(run.plans[0])
        return progress
    if config.resume:
        print(f"no resume file at {checkpoint}; starting from step 0", file=sys.stderr)
    return Progress(start=0, balance=[None] * len(run.plans))


def save_resume(path: Path, run: TrainRun, progress: Progress, step: int) -> None:
    """Everything needed to continue after ``step``, written atomically."""
    config, opt = run.config, run.opt
    state = {
        "step": step,
        "losses": progress.losses,
        "balance": progress.balance,
        "validation": {} if run.kept is None else run.kept.state(),
        "schedules": list(config.schedules),
        "modules": {layer: m.state_dict() for layer, m in opt.trained.modules.items()},
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "scaler": None if opt.scaler is None else opt.scaler.state_dict(),
        "backbone": run.model.module.state_dict() if config.unfreeze else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def restore(path: Path, run: TrainRun) -> Progress:
    """Load a resume file into ``run``; refuses one that is unreadable or for other schedules."""
    config, opt = run.config, run.opt
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # cut short by a full disk, or not a resume file at all
        raise TokenScopeError(
            f"the resume file {path.name} cannot be read ({str(error)[:120]}); delete it to "
            "start from step 0, or give another --out"
        ) from None
    if state["schedules"] != list(config.schedules):
        raise TokenScopeError(
            f"{path.name} was written for the schedules {state['schedules']}, not "
            f"{list(config.schedules)}; give the same --schedule options or another --out"
        )
    for layer, module_state in state["modules"].items():
        opt.trained.modules[int(layer)].load_state_dict(module_state)
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    if opt.scaler is not None and state["scaler"] is not None:
        opt.scaler.load_state_dict(state["scaler"])
    if config.unfreeze and state["backbone"] is not None:
        run.model.module.load_state_dict(state["backbone"])
    if run.kept is not None:
        run.kept.resume(state.get("validation") or {})
    balance = list(state.get("balance") or [None] * len(config.schedules))
    return Progress(int(state["step"]), list(state["losses"]), balance)


def save_backbone(run: TrainRun) -> Path:
    """With ``unfreeze``: the tuned backbone, as ``OUT.backbone.safetensors``."""
    from safetensors.torch import save_file

    out = run.config.out
    path = out.with_name(out.stem + ".backbone.safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in run.model.module.state_dict().items()}
    partial = path.with_name(path.name + ".tmp")  # never half a file
    save_file(state, str(partial), metadata={"backbone": run.model.name})
    partial.replace(path)
    return path


def save_weights(run: TrainRun, result: TrainResult, validated: dict[str, str]) -> None:
    """The trained modules with the metadata that says how they were made."""
    config, model = run.config, run.model
    labelled = run.images.labels is not None
    backbone_path = result.backbone_path
    save_learned(
        config.out,
        run.method,
        run.opt.trained.modules,
        backbone_id(model),
        schedule=" | ".join(config.schedules),
        data=run.images.description + ("" if config.augment else " (no augmentation)"),
        labels="yes" if labelled else "no (distillation from the unreduced model)",
        steps=str(result.steps),
        planned_steps=str(config.steps),
        loss=f"{result.final_loss:.6g}",
        first_loss=f"{result.first_loss:.6g}",
        batch_size=str(config.batch_size),
        lr=str(run.opt.lr),
        seed=str(config.seed),
        backbone_frozen="no" if config.unfreeze else "yes",
        balanced="yes" if config.balance and len(config.schedules) > 1 else "no",
        mix=str(mix_probability(config, labelled)),
        init="new modules" if config.init is None else str(config.init),
        **validated,
        backbone_weights=str(backbone_path) if backbone_path else model.weights,
        seconds=f"{result.seconds:.0f}",
        device=str(model.device),
        command=config.command,
    )


__all__ = [
    "Progress",
    "checkpoint_due",
    "restore",
    "resume_or_start",
    "resume_path",
    "save_backbone",
    "save_resume",
    "save_weights",
]
