"""Train learned reducers: ``python -m analysis train ...`` or :func:`train` from Python.

Without labels the reduced model is distilled from the unreduced one: KL divergence on the
logits for classifiers, 1 − cosine on the pooled features for backbones. With labels (an
ImageFolder layout) the loss is cross-entropy, plus each method's own loss: Cropr's
auxiliary heads always, LTM's information-bottleneck bound when labels are given. The
backbone is frozen ("modular" training, as in DTEM) unless ``--unfreeze``.

The result is a safetensors file with metadata (method, backbone, schedule, data, steps,
loss, command) that ``load_model(..., learned=[path])`` and the app accept. A resume file
(``OUT.resume.pt``) is written as training goes, and ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from analysis.errors import TokenScopeError
from analysis.holdout import (
    AUTO,
    Validation,
    mix_batch,
    relative,
    snapshot,
    split_images,
    step_rank,
)
from analysis.imagesets import SAMPLE_NAMES
from analysis.learned import (
    INIT_KEYS,
    LearnedReducer,
    TrainContext,
    attach,
    backbone_id,
    init_weights,
    load_learned,
    save_learned,
)
from analysis.models import LoadedModel
from analysis.reducers.base import LearnedWeights

OFFLINE = "offline"
# skimage.data images that load without a download (colour first, then grey).
OFFLINE_IMAGES = SAMPLE_NAMES
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


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


# --------------------------------------------------------------------------- data


@dataclass
class ImageSet:
    """Training images (loaded lazily from folders) with optional integer labels."""

    loaders: list[Callable[[], Image.Image]]
    labels: list[int] | None
    description: str
    num_classes: int = 0

    def __len__(self) -> int:
        return len(self.loaders)


def offline_images() -> list[tuple[str, Image.Image]]:
    """The scikit-image sample images that work offline, as RGB PIL images."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise TokenScopeError(
            "the offline training images come from scikit-image: pip install scikit-image"
        ) from None
    from analysis.images import to_rgb

    found = []
    for name in OFFLINE_IMAGES:
        try:
            array = getattr(skdata, name)()
        except Exception:  # a sample that needs a download
            continue
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        if array.dtype != np.uint8:  # bool (horse), float (moon variants), uint16
            array = array.astype(np.float64)
            array = (255 * (array - array.min()) / max(1e-8, np.ptp(array))).astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 4:
            array = array[..., :3]
        image = to_rgb(Image.fromarray(array))
        image.thumbnail((640, 640), Image.Resampling.LANCZOS)  # cheaper crops, same content
        found.append((name, image))
    return found


def load_images(data: str, labels: str = "auto") -> ImageSet:
    """``offline`` or a folder: flat (no labels) or one subfolder per class (ImageFolder).

    Class subfolders named by integers (``0``, ``1``, ... or ``n01440764_0``) use that
    integer as the class index; otherwise classes are the sorted folder names.
    """
    if data == OFFLINE:
        if labels == "on":
            raise TokenScopeError("the offline images have no labels; use --labels off")
        images = offline_images()
        if not images:
            raise TokenScopeError("no offline scikit-image sample images could be loaded")
        return ImageSet(
            loaders=[(lambda image=image: image) for _, image in images],
            labels=None,
            description=f"offline: {len(images)} scikit-image sample images",
        )
    root = Path(data)
    if not root.is_dir():
        raise TokenScopeError(f"--data must be 'offline' or an image folder; {root} is not one")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and _images_in(p))
    use_labels = labels == "on" or (labels == "auto" and bool(classes))
    if use_labels and not classes:
        raise TokenScopeError(f"--labels on needs one subfolder per class in {root}")
    from analysis.images import load_image

    paths: list[Path] = []
    targets: list[int] = []
    if use_labels:
        numbered = all(p.name.split("_")[0].isdigit() for p in classes)
        for index, folder in enumerate(classes):
            target = int(folder.name.split("_")[0]) if numbered else index
            for path in _images_in(folder):
                paths.append(path)
                targets.append(target)
    else:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise TokenScopeError(f"no images found in {root}")
    labelled = f", {len(classes)} classes" if use_labels else ""
    return ImageSet(
        loaders=[(lambda path=path: load_image(path)) for path in paths],
        labels=targets if use_labels else None,
        description=f"folder {root}: {len(paths)} images{labelled}",
        num_classes=(max(targets) + 1) if use_labels else 0,
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def make_transform(model: LoadedModel, augment: bool) -> Callable[[Image.Image], Tensor]:
    """Random-resized crop, flip and colour jitter (training) or timm's eval crop."""
    config = model.data_config
    if not augment:
        from analysis.images import to_tensor

        return lambda image: to_tensor([image], config)[0][0]
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                config.input_size,
                scale=(0.25, 1.0),
                interpolation=transforms.InterpolationMode.BICUBIC,
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.05),
            transforms.ToTensor(),
            transforms.Normalize(config.mean, config.std),
        ]
    )


def sample_batch(
    images: ImageSet,
    transform: Callable,
    step: int,
    batch_size: int,
    seed: int,
    mix: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """The batch of ``step``: a pure function of (seed, step), so resuming is exact."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    index = torch.randint(len(images), (batch_size,), generator=generator).tolist()
    torch.manual_seed(seed * 1_000_003 + step)  # torchvision's transforms draw from here
    batch = torch.stack([transform(images.loaders[i]()) for i in index])
    batch = mix_batch(batch, np.random.default_rng([seed, step]), mix)
    labels = None
    if images.labels is not None:
        labels = torch.tensor([images.labels[i] for i in index])
    return batch, labels


# --------------------------------------------------------------------------- losses


def distill_loss(model: LoadedModel, student: Tensor, teacher: Tensor) -> Tensor:
    """KL on the logits (classifier) or 1 − cosine on the features (backbone)."""
    if model.is_classifier:
        return F.kl_div(
            student.float().log_softmax(-1),
            teacher.float().log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


def soft_assign(vectors: Tensor, centroids: Tensor) -> Tensor:
    """φ(v, k) = softmax_k(−‖v/‖v‖ − c_k‖²)."""
    unit = F.normalize(vectors.float(), dim=-1)
    return (-torch.cdist(unit, centroids).pow(2)).softmax(dim=-1)


def kmeans(vectors: Tensor, k: int, seed: int, iterations: int = 20) -> Tensor:
    """Plain k-means on L2-normalised vectors; returns k centroids."""
    unit = F.normalize(vectors.float(), dim=-1)
    k = max(1, min(k, unit.shape[0]))
    generator = torch.Generator().manual_seed(seed)
    centroids = unit[torch.randperm(unit.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        nearest = torch.cdist(unit, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, unit)
        counts = torch.bincount(nearest, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def pixel_vectors(images: Tensor) -> Tensor:
    """The input side of the IB term: the image at 16×16, flattened."""
    return F.adaptive_avg_pool2d(images.float(), 16).flatten(1)


@dataclass
class IBState:
    """LTM's information-bottleneck bound: input and output clusters, Q[b, y]."""

    input_centroids: Tensor
    output_centroids: Tensor | None = None
    q: Tensor | None = None  # [clusters_out, classes]

    def bound(self, images: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        assert self.output_centroids is not None and self.q is not None
        phi_x = soft_assign(pixel_vectors(images), self.input_centroids.to(images.device))
        phi_f = soft_assign(features, self.output_centroids.to(features.device))
        # Σ_ab φ(f,b) φ(x,a) log φ(x,a): constant in the model (Σ_b φ(f,b) = 1), kept as given
        first = (phi_f.sum(-1) * (phi_x * phi_x.clamp(min=1e-12).log()).sum(-1)).mean()
        log_q = self.q.to(features.device).clamp(min=1e-12).log()[:, labels].t()  # [B, b]
        second = -(phi_f * log_q).sum(-1).mean()
        return first + second


# --------------------------------------------------------------------------- training


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


def _autocast(device: torch.device, enabled: bool) -> tuple[Any, torch.amp.GradScaler | None]:
    if device.type != "cuda" or not enabled:
        return torch.autocast(device.type, enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def resume_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume.pt")


def train(model: LoadedModel, config: TrainConfig) -> TrainResult:
    """Train the learned reducer that ``config.schedules`` run on ``model``; save it.

    ``model`` is never modified: with ``unfreeze`` a copy of its module is trained (and
    saved next to the weights as ``OUT.backbone.safetensors``).
    """
    from analysis.engine import _attach_weights, forward
    from analysis.reducers import reducer_class
    from analysis.schedule import parse_schedule

    if not config.schedules:
        raise TokenScopeError("give at least one --schedule to train")
    started = time.perf_counter()
    method = learned_method(model, config.schedules)
    facts = model.facts
    device = model.device
    images, held = split_images(load_images(config.data, config.labels), config.val)
    labelled = images.labels is not None
    mix_probability(config, labelled)  # refuse --mix with labels before any work
    if labelled and model.is_classifier and images.num_classes > facts.num_classes:
        raise TokenScopeError(
            f"the data has class index {images.num_classes - 1}, but {model.name} has "
            f"{facts.num_classes} classes; name the class folders by the model's class indices"
        )
    transform = make_transform(model, config.augment)

    module = model.module
    if config.unfreeze:
        module = copy.deepcopy(model.module).train().requires_grad_(True)
        model = replace(model, module=module)
    aux_out = facts.num_classes if model.is_classifier else facts.dim
    trained = starting_modules(model, config.schedules, config.init, config.seed, aux_out)
    for item in trained.modules.values():
        item.train().requires_grad_(True)
    trainable = [p for m in trained.modules.values() for p in m.parameters()]
    lr = config.lr if config.lr is not None else reducer_class(method).default_lr
    groups = [{"params": trainable, "lr": lr}]
    if config.unfreeze:
        groups.append({"params": list(module.parameters()), "lr": config.backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup * config.steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    autocast, scaler = _autocast(device, config.amp)
    student = attach(model, [trained])
    empty = parse_schedule("none").resolve(facts)
    resolved = [parse_schedule(text).resolve(facts) for text in config.schedules]

    ib = None
    if method == "ltm" and labelled and config.ib_weight > 0:
        ib = _init_ib(images, model, config)

    validation = None
    if held is not None:
        views = config.val_views if config.augment else 1  # eval crops are all the same
        validation = Validation.build(model, held, transform, views, config.seed, config.batch_size)
    val_every = config.val_every or max(1, config.steps // 12)
    best: dict[str, Any] = {}  # step, losses and modules of the best validated step

    def validate(step: int) -> None:
        assert validation is not None
        for plan in resolved:
            _attach_weights(plan, student)
        losses_now = validation.losses(student, module, resolved, config.batch_size)
        validation.history.append((step, losses_now))
        untrained = validation.history[0][1]
        if not best or step_rank(losses_now, untrained) < step_rank(best["losses"], untrained):
            best.update(step=step, losses=losses_now, modules=snapshot(trained.modules))
        worst, mean = relative(losses_now, untrained)
        bar.write(
            f"step {step}: validation loss "
            + ", ".join(f"{v:.5f}" for v in losses_now)
            + f" (of untrained: worst {worst:.3f}, mean {mean:.3f}; best step {best['step']})"
        )

    start, losses = 0, []
    balance: list[float | None] = [None] * len(resolved)  # running loss of each schedule
    checkpoint = resume_path(config.out)
    if config.resume and checkpoint.exists():
        start, losses, balance, validated = _restore(
            checkpoint, config, trained, optimizer, scheduler, scaler, module
        )
        if validation is not None and validated:
            validation.history = [(at, list(values)) for at, values in validated["history"]]
            best.update(validated["best"])
        if ib is not None and start >= int(config.ib_start * config.steps):
            _refresh_ib(ib, images, student, resolved[0], config, device)
    elif config.resume:
        print(f"no resume file at {checkpoint}; starting from step 0", file=sys.stderr)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.steps, initial=start, disable=not config.progress, desc=f"train {method}"
    )
    refresh_every = max(1, len(images) // config.batch_size)
    ema = losses[-1] if losses else None
    batches = _batches(images, transform, config, start)
    if validation is not None and start == 0:
        validate(0)
    for step, (batch, labels) in zip(range(start, config.steps), batches, strict=False):
        plan = resolved[step % len(resolved)]
        _attach_weights(plan, student)
        batch = batch.to(device)
        labels = None if labels is None else labels.to(device)
        with torch.no_grad(), autocast:
            teacher_logits, teacher_features, _ = forward(module, batch, empty)
        teacher = teacher_logits if model.is_classifier else teacher_features

        def aux_loss(prediction: Tensor, labels: Tensor | None = labels) -> Tensor:
            if labels is not None and model.is_classifier:
                return F.cross_entropy(prediction.float(), labels)
            return distill_loss(model, prediction, teacher)  # noqa: B023

        ctx = TrainContext(aux_loss=aux_loss)
        with autocast:
            logits, features, _ = forward(module, batch, plan, train=ctx)
        if labels is not None and model.is_classifier:
            main = F.cross_entropy(logits.float(), labels)
        else:
            main = distill_loss(model, logits if model.is_classifier else features, teacher)
        terms = [main, *ctx.losses.values()]
        if ib is not None and step >= int(config.ib_start * config.steps):
            if ib.q is None or (step - start) % refresh_every == 0:
                _refresh_ib(ib, images, student, plan, config, device)
            terms.append(config.ib_weight * ib.bound(batch, features, labels))
        total = sum(term for term in terms if term.requires_grad)
        if not isinstance(total, Tensor):
            raise TokenScopeError(f"{method}: no loss term reaches a trainable parameter")
        if config.balance and len(resolved) > 1:  # every schedule (strength) counts equally
            which = step % len(resolved)
            now = float(total.detach())
            previous = balance[which]
            balance[which] = now if previous is None else 0.9 * previous + 0.1 * now
            known = [value for value in balance if value is not None]
            total = total * (sum(known) / len(known)) / max(balance[which], 1e-12)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        if config.clip_grad:
            nn.utils.clip_grad_norm_(trainable, config.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        value = float(sum(float(term.detach()) for term in terms))
        if not math.isfinite(value):
            raise TokenScopeError(f"the loss became {value} at step {step}; lower --lr")
        losses.append(value)
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}")
        done = step + 1
        if validation is not None and (done % val_every == 0 or done == config.steps):
            validate(done)
        stopping = config.stop_after is not None and done - start >= config.stop_after
        periodic = config.checkpoint_every and done % config.checkpoint_every == 0
        if stopping or periodic or (config.checkpoint_every and done == config.steps):
            _save_resume(
                checkpoint,
                config,
                done,
                (losses, balance, _validation_state(validation, best)),
                trained,
                optimizer,
                scheduler,
                scaler,
                module,
            )
        if stopping:
            break
    bar.close()

    validated: dict[str, str] = {}
    if validation is not None and best:
        for layer, state in best["modules"].items():
            trained.modules[layer].load_state_dict(state)
        finished = len(validation.history) and validation.history[-1][0] == config.steps
        validated = {
            "val_images": str(validation.num_images),
            "val_views": str(validation.views.shape[0] // validation.num_images),
            "val_every": str(val_every),
            "val_loss_untrained": _joined(validation.history[0][1]),
            "val_loss_kept": _joined(best["losses"]),
            "val_loss_last": _joined(validation.history[-1][1]) if finished else "",
            "kept_step": str(best["step"]),
        }
    result = TrainResult(
        path=config.out,
        method=method,
        steps=len(losses),
        losses=losses,
        seconds=time.perf_counter() - started,
        kept_step=best["step"] if validated else None,
    )
    backbone_path = None
    if config.unfreeze:
        from safetensors.torch import save_file

        backbone_path = config.out.with_name(config.out.stem + ".backbone.safetensors")
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        partial = backbone_path.with_name(backbone_path.name + ".tmp")  # never half a file
        save_file(state, str(partial), metadata={"backbone": model.name})
        partial.replace(backbone_path)
        result.backbone_path = backbone_path
    save_learned(
        config.out,
        method,
        trained.modules,
        backbone_id(model),
        schedule=" | ".join(config.schedules),
        data=images.description + ("" if config.augment else " (no augmentation)"),
        labels="yes" if labelled else "no (distillation from the unreduced model)",
        steps=str(result.steps),
        planned_steps=str(config.steps),
        loss=f"{result.final_loss:.6g}",
        first_loss=f"{result.first_loss:.6g}",
        batch_size=str(config.batch_size),
        lr=str(lr),
        seed=str(config.seed),
        backbone_frozen="no" if config.unfreeze else "yes",
        balanced="yes" if config.balance and len(config.schedules) > 1 else "no",
        mix=str(mix_probability(config, labelled)),
        init="new modules" if config.init is None else str(config.init),
        **validated,
        backbone_weights=str(backbone_path) if backbone_path else model.weights,
        seconds=f"{result.seconds:.0f}",
        device=str(device),
        command=config.command,
    )
    return result


class _StepBatches(torch.utils.data.Dataset):
    """Item k is the batch of step ``start + k`` (so workers can prepare them ahead)."""

    def __init__(self, images: ImageSet, transform: Callable, config: TrainConfig, start: int):
        self.images, self.transform, self.config, self.start = images, transform, config, start

    def __len__(self) -> int:
        return max(0, self.config.steps - self.start)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor | None]:
        config = self.config
        step = self.start + index
        mix = mix_probability(config, self.images.labels is not None)
        return sample_batch(self.images, self.transform, step, config.batch_size, config.seed, mix)


def mix_probability(config: TrainConfig, labelled: bool) -> float:
    if config.mix is None:
        return 0.0 if labelled else 0.5
    if config.mix > 0 and labelled:
        raise TokenScopeError("--mix needs distillation (no labels): use --labels off")
    return config.mix


def _batches(images: ImageSet, transform: Callable, config: TrainConfig, start: int):
    dataset = _StepBatches(images, transform, config, start)
    if config.workers <= 0:
        return (dataset[k] for k in range(len(dataset)))
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=config.workers, prefetch_factor=2
    )


def _joined(values: list[float]) -> str:
    return " | ".join(f"{value:.6g}" for value in values)


def _validation_state(validation: Validation | None, best: dict[str, Any]) -> dict[str, Any]:
    if validation is None:
        return {}
    return {"history": validation.history, "best": best}


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


def _save_resume(
    path: Path,
    config: TrainConfig,
    step: int,
    history: tuple[list[float], list[float | None], dict[str, Any]],
    trained: LearnedWeights,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    module: nn.Module,
) -> None:
    state = {
        "step": step,
        "losses": history[0],
        "balance": history[1],
        "validation": history[2],
        "schedules": list(config.schedules),
        "modules": {layer: m.state_dict() for layer, m in trained.modules.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "backbone": module.state_dict() if config.unfreeze else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _restore(
    path: Path,
    config: TrainConfig,
    trained: LearnedWeights,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    module: nn.Module,
) -> tuple[int, list[float], list[float | None], dict[str, Any]]:
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
        trained.modules[int(layer)].load_state_dict(module_state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if config.unfreeze and state["backbone"] is not None:
        module.load_state_dict(state["backbone"])
    balance = list(state.get("balance") or [None] * len(config.schedules))
    return int(state["step"]), list(state["losses"]), balance, state.get("validation") or {}


def _init_ib(images: ImageSet, model: LoadedModel, config: TrainConfig) -> IBState:
    from analysis.images import to_tensor

    count = min(len(images), 2048)
    pixels = torch.cat(
        [
            pixel_vectors(to_tensor([images.loaders[i]()], model.data_config)[0])
            for i in range(count)
        ]
    )
    return IBState(input_centroids=kmeans(pixels, config.ib_clusters, config.seed))


@torch.no_grad()
def _refresh_ib(
    ib: IBState,
    images: ImageSet,
    student: LoadedModel,
    plan: Any,
    config: TrainConfig,
    device: torch.device,
) -> None:
    """Recompute the output clusters and Q[b, y] with the current reduced model."""
    from analysis.engine import forward
    from analysis.images import to_tensor

    assert images.labels is not None
    count = min(len(images), 2048)
    features, labels = [], []
    for begin in range(0, count, config.batch_size):
        index = list(range(begin, min(count, begin + config.batch_size)))
        batch = torch.cat(
            [to_tensor([images.loaders[i]()], student.data_config)[0] for i in index]
        ).to(device)
        features.append(forward(student.module, batch, plan)[1].float().cpu())
        labels.extend(images.labels[i] for i in index)
    stacked = torch.cat(features)
    ib.output_centroids = kmeans(stacked, config.ib_clusters, config.seed + 1)
    phi = soft_assign(stacked, ib.output_centroids)  # [n, b]
    target = torch.tensor(labels)
    classes = max(images.num_classes, int(target.max()) + 1)
    q = torch.zeros(phi.shape[1], classes).index_add_(1, target, phi.t())
    ib.q = q / q.sum(dim=0, keepdim=True).clamp(min=1e-12)


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


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


__all__ = ["TrainConfig", "TrainResult", "load_images", "offline_images", "train", "train_main"]
