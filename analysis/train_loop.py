"""The step loop: each step's losses, the optimiser step, validation and checkpoints."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.errors import TokenScopeError
from analysis.learned import TrainContext
from analysis.train_batches import step_batches
from analysis.train_checkpoint import Progress, checkpoint_due, resume_path, save_resume
from analysis.train_losses import distill_loss
from analysis.train_setup import Optimization, TrainRun


def run_steps(run: TrainRun, progress: Progress) -> None:
    """Steps ``progress.start`` to the end (or ``stop_after``), validating and saving as due."""
    from tqdm.auto import tqdm

    config, start = run.config, progress.start
    bar = tqdm(
        total=config.steps, initial=start, disable=not config.progress, desc=f"train {run.method}"
    )
    refresh_every = max(1, len(run.images) // config.batch_size)  # LTM's IB clusters
    ema = progress.losses[-1] if progress.losses else None
    batches = step_batches(run.images, run.transform, config, start)
    if run.kept is not None and start == 0:
        validate(run, 0, bar)
    for step, (batch, labels) in zip(range(start, config.steps), batches, strict=False):
        refresh = (step - start) % refresh_every == 0
        value = train_step(run, progress.balance, step, batch, labels, refresh)
        progress.losses.append(value)
        ema = value if ema is None else 0.9 * ema + 0.1 * value  # shown on the bar
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}")
        done = step + 1
        if run.kept is not None and run.kept.due(done, config.steps):
            validate(run, done, bar)
        stopping = config.stop_after is not None and done - start >= config.stop_after
        if stopping or checkpoint_due(config, done):
            save_resume(resume_path(config.out), run, progress, done)
        if stopping:
            break
    bar.close()


def train_step(
    run: TrainRun,
    balance: list[float | None],
    step: int,
    batch: Tensor,
    labels: Tensor | None,
    refresh_ib: bool,
) -> float:
    """One optimiser step on the batch of ``step``; returns its loss (before balancing)."""
    plan = run.plans[step % len(run.plans)]
    terms = step_losses(run, plan, step, batch, labels, refresh_ib)
    total = sum(term for term in terms if term.requires_grad)
    if not isinstance(total, Tensor):
        raise TokenScopeError(f"{run.method}: no loss term reaches a trainable parameter")
    if run.config.balance and len(run.plans) > 1:  # every schedule (strength) counts equally
        total = balanced(total, balance, step % len(run.plans))
    apply_gradients(run.opt, total, run.config.clip_grad)
    value = float(sum(float(term.detach()) for term in terms))
    if not math.isfinite(value):
        raise TokenScopeError(f"the loss became {value} at step {step}; lower --lr")
    return value


def step_losses(
    run: TrainRun,
    plan: Any,
    step: int,
    batch: Tensor,
    labels: Tensor | None,
    refresh_ib: bool,
) -> list[Tensor]:
    """The loss terms of a step: the main one, each method's own, LTM's IB bound."""
    from analysis.engine import attach_weights, forward

    model, config, autocast = run.model, run.config, run.opt.autocast
    attach_weights(plan, run.student)
    batch = batch.to(model.device)
    labels = None if labels is None else labels.to(model.device)
    with torch.no_grad(), autocast:
        teacher_logits, teacher_features, _ = forward(model.module, batch, run.unreduced)
    teacher = teacher_logits if model.is_classifier else teacher_features

    def aux_loss(prediction: Tensor, labels: Tensor | None = labels) -> Tensor:
        if labels is not None and model.is_classifier:
            return F.cross_entropy(prediction.float(), labels)
        return distill_loss(model, prediction, teacher)

    ctx = TrainContext(aux_loss=aux_loss)
    with autocast:
        logits, features, _ = forward(model.module, batch, plan, train=ctx)
    if labels is not None and model.is_classifier:
        main = F.cross_entropy(logits.float(), labels)
    else:
        main = distill_loss(model, logits if model.is_classifier else features, teacher)
    terms = [main, *ctx.losses.values()]
    if run.ib is not None and run.ib_active(step):
        if run.ib.q is None or refresh_ib:
            run.refresh_ib(plan)
        terms.append(config.ib_weight * run.ib.bound(batch, features, labels))
    return terms


def balanced(total: Tensor, balance: list[float | None], which: int) -> Tensor:
    """``total`` scaled so that each schedule's running loss weighs the same."""
    now = float(total.detach())
    previous = balance[which]
    balance[which] = now if previous is None else 0.9 * previous + 0.1 * now
    known = [value for value in balance if value is not None]
    return total * (sum(known) / len(known)) / max(balance[which], 1e-12)


def apply_gradients(opt: Optimization, total: Tensor, clip_grad: float) -> None:
    """Backward, clip, optimiser and scheduler step (through the scaler with float16)."""
    optimizer, scaler = opt.optimizer, opt.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if clip_grad:
        nn.utils.clip_grad_norm_(opt.trainable, clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    opt.scheduler.step()


def validate(run: TrainRun, step: int, bar: Any) -> None:
    """Score the held-out images after ``step`` steps with the inference path."""
    from analysis.engine import attach_weights

    assert run.kept is not None
    for plan in run.plans:
        attach_weights(plan, run.student)
    validation = run.kept.validation
    losses = validation.losses(run.student, run.model.module, run.plans, run.config.batch_size)
    bar.write(run.kept.record(step, losses, run.opt.trained.modules))


__all__ = ["apply_gradients", "balanced", "run_steps", "step_losses", "train_step", "validate"]
