"""Trade-off sweeps: many schedules over an image set, one point per schedule.

A sweep is a model (with its learned weights), an image set, a list of schedules and the
metrics. The flow is the same for the app, the command line and ``torchrun``:

1. **Plan** (:func:`plan_sweep`): explicit schedules, or per method either strength values
   or cost targets solved with :mod:`analysis.solver`. Nothing runs, so the planned x
   positions are known at once. A learned method only gets settings its weights accept;
   a setting outside what they were trained at is marked ``extrapolated``.
2. **Reference**: the unreduced model runs once on the image set (and on the k-NN bank
   when a metric needs one); every point reuses it.
3. **Points** (:func:`run_sweep`, a generator): each schedule runs in batches, per-image
   metric values are computed against the reference, stored in the cache, summarised
   with a fixed-seed bootstrap and yielded. Cancelling means asking for no more points.

Under ``torchrun`` every rank takes whole batches ``rank::world`` (the same batches a
single process would run, so the numbers are identical), and rank 0 gathers the
per-image values, orders them by image index, caches and yields the points.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from analysis.curves import Point, bootstrap
from analysis.engine import attach_weights, cpu_replica, run
from analysis.errors import DeviceMemoryError, ScheduleError, TokenScopeError
from analysis.flops import count_macs
from analysis.imagesets import ImageSet
from analysis.metrics import (
    METRICS,
    KnnBank,
    Outputs,
    available_metrics,
    build_bank,
    per_image_values,
)
from analysis.models import LoadedModel
from analysis.presets import default_bases
from analysis.schedule import Schedule, parse_schedule
from analysis.solver import full_gmacs, match_cost, strength_param, with_strength
from analysis.sweep_cache import SweepCache, make_key, model_fingerprint

FULL_SCHEDULE = "none"
PRECISIONS = ("fp32", "bf16")
MAX_POINTS = 400  # a plan larger than this is refused: it would run for hours
# Preprocessed batches kept between points (about 850 images at 224 px); past this the
# images are decoded again for each point, so memory stays bounded on a shared server.
PREPROCESSED_BUDGET_BYTES = 512 * 2**20

# One base schedule per method: where it runs and its other parameters, from the reducer
# classes' own declarations (`analysis.presets.base_schedule`: the first paper setting
# with explicit parameters, else the default placement). The sweep varies only the
# strength (or, for PatchMerger, the layer its weights cover). Written for 12 layers:
# "evit:keep=0.7@3,6,9"; those without `@` follow the model's depth.
DEFAULT_BASES: dict[str, str] = default_bases()


def cost_targets(low: float = 35.0, high: float = 100.0, count: int = 8) -> tuple[float, ...]:
    """``count`` cost targets evenly spread from ``low`` to ``high`` % of the full GMACs."""
    if count < 1 or not 0 < low <= high <= 100:
        raise TokenScopeError(
            f"cost targets need 0 < low <= high <= 100 and a count of 1 or more, got "
            f"{low}-{high} % with {count}"
        )
    if count == 1:
        return (round(high, 3),)
    step = (high - low) / (count - 1)
    return tuple(round(low + i * step, 3) for i in range(count))


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class MethodSweep:
    """One method's family of schedules: its base, and the strength values or cost targets."""

    base: str
    values: tuple[float, ...] = ()
    targets: tuple[float, ...] = ()  # % of the full model's GMACs

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "values": list(self.values), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: Any) -> MethodSweep:
        if isinstance(data, str):
            return cls(base=data)
        _check_fields(cls, data, "methods[]")
        if not isinstance(data.get("base"), str):
            raise TokenScopeError(
                "sweep configuration: each 'methods' entry needs a 'base' schedule (text), "
                'e.g. {"base": "tome:r=8"}'
            )
        return cls(
            base=data["base"],
            values=tuple(_numbers(data.get("values", ()), "methods[].values")),
            targets=tuple(_numbers(data.get("targets", ()), "methods[].targets")),
        )


@dataclass(frozen=True)
class SweepSpec:
    """A sweep's configuration: what the CLI's ``--config`` reads and the app downloads."""

    model: str = "default"
    weights: str | None = None
    learned: tuple[str, ...] = ()  # extra weights files for learned reducers
    images: str = "samples"  # "samples", "fashion-mnist" or a folder
    limit: int | None = None
    schedules: tuple[str, ...] = ()
    methods: tuple[MethodSweep, ...] = ()
    metrics: tuple[str, ...] = ()  # empty: what the model and image set allow
    batch_size: int = 8
    precision: str = "fp32"
    device: str = "auto"
    throughput: bool = False
    include_full: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["learned"] = list(self.learned)
        data["schedules"] = list(self.schedules)
        data["methods"] = [method.to_dict() for method in self.methods]
        data["metrics"] = list(self.metrics)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> SweepSpec:
        """Read a configuration, naming the field that is wrong."""
        _check_fields(cls, data, "configuration")
        values = dict(data)
        for name in ("learned", "schedules", "metrics"):
            if name in values:
                if not isinstance(values[name], list) or not all(
                    isinstance(item, str) for item in values[name]
                ):
                    raise TokenScopeError(f"sweep configuration: '{name}' must be a list of text")
                values[name] = tuple(values[name])
        if "methods" in values:
            if not isinstance(values["methods"], list):
                raise TokenScopeError("sweep configuration: 'methods' must be a list")
            values["methods"] = tuple(MethodSweep.from_dict(item) for item in values["methods"])
        spec = cls(**values)
        spec.check()
        return spec

    def check(self) -> None:
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 1024:
            raise TokenScopeError("sweep configuration: 'batch_size' must be 1 to 1024")
        if self.precision not in PRECISIONS:
            raise TokenScopeError(
                f"sweep configuration: 'precision' must be one of {', '.join(PRECISIONS)}"
            )
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise TokenScopeError("sweep configuration: 'limit' must be a positive integer")
        unknown = [name for name in self.metrics if name not in METRICS]
        if unknown:
            raise TokenScopeError(
                f"sweep configuration: unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})"
            )


@dataclass(frozen=True)
class PlannedPoint:
    """A schedule chosen for the sweep, with its analytic cost; nothing has run yet."""

    schedule: str
    method: str  # "none" for the full model
    setting: str
    gmacs: float
    percent: float
    extrapolated: str = ""


@dataclass(frozen=True)
class SweepPlan:
    points: tuple[PlannedPoint, ...]
    full_gmacs: float
    skipped: tuple[str, ...] = ()  # why a requested setting was left out

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [asdict(point) for point in self.points],
            "full_gmacs": self.full_gmacs,
            "skipped": list(self.skipped),
        }


# --------------------------------------------------------------------------- planning


def plan_sweep(
    model: LoadedModel,
    *,
    schedules: Sequence[str] = (),
    methods: Sequence[MethodSweep] = (),
    include_full: bool = True,
) -> SweepPlan:
    """Expand explicit schedules and method families into planned points (no model runs).

    Raises ScheduleError for a schedule that does not fit the model, and TokenScopeError
    for a plan with nothing in it or more than :data:`MAX_POINTS` points.
    """
    from analysis.trained_settings import extrapolation

    facts = model.facts
    full = full_gmacs(facts, model.module)
    candidates: list[tuple[Schedule, str]] = []
    skipped: list[str] = []
    if include_full:
        candidates.append((Schedule(), ""))
    for text in schedules:
        candidates.append((parse_schedule(text, depth=facts.depth), ""))
    for method in methods:
        found, notes = _expand(model, method)
        candidates += [(schedule, "") for schedule in found]
        skipped += notes
    points: list[PlannedPoint] = []
    seen: set[str] = set()
    for schedule, _ in candidates:
        text = schedule.to_text()
        if text in seen:
            continue
        try:
            resolved = schedule.resolve(facts)
            attach_weights(resolved, model)
        except ScheduleError as error:
            skipped.append(f"{text}: {error}")
            continue
        seen.add(text)
        gmacs = count_macs(facts, resolved, model.module).gmacs
        points.append(
            PlannedPoint(
                schedule=text,
                method=_method_of(schedule),
                setting=_setting(schedule),
                gmacs=gmacs,
                percent=100.0 * gmacs / full,
                extrapolated=extrapolation(model, schedule) if not schedule.is_empty else "",
            )
        )
    if not points:
        raise TokenScopeError(
            "nothing to sweep: give schedules or methods" + (f" ({skipped[0]})" if skipped else "")
        )
    if len(points) > MAX_POINTS:
        raise TokenScopeError(
            f"the sweep has {len(points)} points; at most {MAX_POINTS} are allowed in one sweep"
        )
    return SweepPlan(points=tuple(points), full_gmacs=full, skipped=tuple(skipped))


def _expand(model: LoadedModel, method: MethodSweep) -> tuple[list[Schedule], list[str]]:
    """One method's schedules: its strength values, or its solved cost targets."""
    facts = model.facts
    base = parse_schedule(method.base, depth=facts.depth)
    names = base.methods()
    if len(names) != 1:
        raise ScheduleError(
            f"'{method.base}': a method sweep varies one method; give mixed schedules "
            "as explicit schedules instead"
        )
    if method.values and method.targets:
        raise TokenScopeError(
            f"'{method.base}': give strength values or cost targets for a method, not both"
        )
    if method.values:
        from analysis.reducers import reducer_class

        spec = strength_param(reducer_class(names[0]))
        found, notes = [], []
        for value in method.values:
            coerced = int(value) if spec.kind is int and float(value).is_integer() else value
            try:
                spec.coerce(names[0], coerced)
            except ScheduleError as error:
                notes.append(str(error))
                continue
            found.append(with_strength(base, names[0], spec.name, coerced))
        return found, notes
    targets = method.targets or cost_targets()
    found, notes = [], []
    for target in targets:
        (matched,) = match_cost(model, [base], target_percent=target)
        if not matched.reachable:  # the closest setting stands in (duplicates drop out)
            notes.append(f"{matched.label} at {target:g} %: {matched.message}")
        found.append(matched.schedule)
    return found, notes


def _method_of(schedule: Schedule) -> str:
    names = schedule.methods()
    if not names:
        return FULL_SCHEDULE
    return names[0] if len(names) == 1 else "+".join(names)


def _setting(schedule: Schedule) -> str:
    """The schedule without its method names: "r=8", "keep=0.7@3,6,9", "tokens=8@5"."""
    if schedule.is_empty:
        return "full model"
    texts = []
    for part in schedule.parts:
        text = part.to_text()
        texts.append(text.split(":", 1)[1] if ":" in text else text.replace(part.method, "", 1))
    return "; ".join(t.lstrip("@") if t.startswith("@") else t for t in texts) or "defaults"


# --------------------------------------------------------------------------- processes


class Comm:
    """One process: gather and broadcast are the identity. Subclassed for torchrun."""

    rank = 0
    world = 1

    def gather(self, item: Any) -> list[Any]:
        return [item]

    def broadcast(self, item: Any) -> Any:
        return item


class TorchComm(Comm):
    """torch.distributed (gloo or NCCL), as set up by ``torchrun``."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def gather(self, item: Any) -> list[Any]:
        found: list[Any] = [None] * self.world
        self._dist.all_gather_object(found, item)
        return found

    def broadcast(self, item: Any) -> Any:
        holder = [item]
        self._dist.broadcast_object_list(holder, src=0)
        return holder[0]


def current_comm() -> Comm:
    """TorchComm when torch.distributed is initialised, else the one-process Comm."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return TorchComm()
    return Comm()


# --------------------------------------------------------------------------- running


@dataclass
class _Shard:
    """This process's whole batches of an image set, preprocessed once."""

    images: ImageSet
    batch_size: int
    comm: Comm
    config: Any
    budget_bytes: int = PREPROCESSED_BUDGET_BYTES
    batches: list[list[int]] = field(default_factory=list)
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        count = len(self.images)
        every = [
            list(range(start, min(start + self.batch_size, count)))
            for start in range(0, count, self.batch_size)
        ]
        self.batches = every[self.comm.rank :: self.comm.world]

    def tensor(self, batch: int) -> torch.Tensor:
        """The batch, preprocessed; kept for the next point while the budget allows."""
        if batch in self.tensors:
            return self.tensors[batch]
        tensor = self.images.batch(self.batches[batch], self.config)
        held = sum(t.numel() * t.element_size() for t in self.tensors.values())
        if held + tensor.numel() * tensor.element_size() <= self.budget_bytes:
            self.tensors[batch] = tensor
        return tensor

    @property
    def indices(self) -> list[int]:
        return [index for batch in self.batches for index in batch]


@dataclass
class _Runner:
    """Runs batches, and keeps going when the GPU runs out of memory: the batch is split
    in halves (down to one image), then the model moves to a CPU copy. Each step is
    announced once through ``notice``; finished batches are kept."""

    model: LoadedModel
    precision: str
    notice: Callable[[str], None] | None = None
    limit: int | None = None  # the largest batch known to fit, after an out-of-memory

    def outputs(
        self, images: torch.Tensor, schedule: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and logits (on the CPU) of ``images`` under ``schedule``."""
        features, logits = [], []
        start, total = 0, images.shape[0]
        while start < total:
            size = total - start if self.limit is None else min(self.limit, total - start)
            chunk = images[start : start + size]
            try:
                result = run(self.model, chunk, schedule, precision=self.precision)
            except DeviceMemoryError:
                self._shrink(size)
                continue
            features.append(result.features.float().cpu())
            if result.logits is not None:
                logits.append(result.logits.float().cpu())
            start += size
        return torch.cat(features), (torch.cat(logits) if logits else None)

    def _shrink(self, size: int) -> None:
        if size > 1:
            self.limit = size // 2
            self._say(
                f"The GPU ran out of memory on a batch of {size} images; the sweep goes on "
                f"in batches of {self.limit}."
            )
            return
        if self.model.device.type == "cpu":
            raise DeviceMemoryError("out of memory on a single image, even on the CPU", batch=1)
        self.model = cpu_replica(self.model)
        self.limit = None
        self._say(
            "The GPU ran out of memory even on a single image; the sweep goes on on the CPU "
            "(slower; the same results up to rounding)."
        )

    def _say(self, message: str) -> None:
        if self.notice is not None:
            self.notice(message)


def _outputs(
    model: LoadedModel | _Runner,
    shard: _Shard,
    schedule: str,
    precision: str,
    should_stop: Callable[[], bool] | None,
    on_batch: Callable[[int], None] | None,
) -> Outputs | None:
    """The schedule's outputs on the shard's images, in index order (None when stopped)."""
    runner = model if isinstance(model, _Runner) else _Runner(model, precision)
    features, logits = [], []
    for batch in range(len(shard.batches)):
        if should_stop is not None and should_stop():
            return None
        found, found_logits = runner.outputs(shard.tensor(batch), schedule)
        features.append(found)
        if found_logits is not None:
            logits.append(found_logits)
        if on_batch is not None:
            on_batch(len(shard.batches[batch]))
    dim = runner.model.facts.dim
    return Outputs(
        features=torch.cat(features) if features else torch.zeros(0, dim),
        logits=torch.cat(logits) if logits else None,
    )


@dataclass
class SweepContext:
    """What every point of one sweep shares: the model, the images, the reference."""

    model: LoadedModel
    images: ImageSet
    metrics: tuple[str, ...]
    precision: str
    shard: _Shard
    cache: SweepCache | None
    comm: Comm
    reference: Outputs | None = None
    bank: KnnBank | None = None
    bank_key: str = ""
    runner: _Runner | None = None
    notice: Callable[[str], None] | None = None
    cache_noticed: bool = False

    def key(self, schedule: str, metric: str) -> str:
        return make_key(
            kind="point",
            model=model_fingerprint(self.model),
            images=self.images.fingerprint,
            schedule=schedule,
            metric=metric,
            bank=self.bank_key if METRICS[metric].needs_bank else "",
            precision=self.precision,
        )


def default_metrics(model: LoadedModel, images: ImageSet) -> tuple[str, ...]:
    """Every metric the model and image set allow, accuracy first."""
    allowed = available_metrics(
        is_classifier=model.is_classifier,
        has_labels=images.labels is not None,
        labels_are_model_classes=images.label_kind == "model-classes",
        has_bank=images.bank is not None,
    )
    return tuple(sorted(allowed, key=lambda name: not METRICS[name].needs_labels))


def check_metrics(model: LoadedModel, images: ImageSet, metrics: Sequence[str]) -> tuple[str, ...]:
    """The metrics to compute; refuses one the model or image set cannot give."""
    allowed = default_metrics(model, images)
    if not metrics:
        return allowed
    for name in metrics:
        if name not in METRICS:
            raise TokenScopeError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
        if name not in allowed:
            info = METRICS[name]
            raise TokenScopeError(
                f"{info.label} cannot be measured here: "
                + (
                    "it needs a classifier head"
                    if info.needs_classifier and not model.is_classifier
                    else "it needs labels the image set does not have"
                )
                + f". Available: {', '.join(allowed)}"
            )
    return tuple(dict.fromkeys(metrics))


def run_sweep(
    model: LoadedModel,
    images: ImageSet,
    plan: SweepPlan,
    metrics: Sequence[str] = (),
    *,
    batch_size: int = 8,
    precision: str = "fp32",
    cache: SweepCache | None = None,
    comm: Comm | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_images: Callable[[int], None] | None = None,
    keep_preprocessed_bytes: int = PREPROCESSED_BUDGET_BYTES,
    on_notice: Callable[[str], None] | None = None,
) -> Iterator[Point]:
    """Yield one :class:`Point` per planned schedule, in plan order.

    Cached points come back at once (``cached=True``). ``should_stop`` is asked before
    every batch; when it says yes the point in flight is dropped and the generator ends,
    keeping every finished point in the cache. ``on_images(n)`` is called after each
    batch of n images (for progress bars). Preprocessed images are kept between points up
    to ``keep_preprocessed_bytes`` per process. Under torchrun only rank 0 yields.
    ``on_notice(text)`` hears what the user should know: the GPU ran out of memory and the
    sweep went on in smaller batches or on the CPU, or the cache could not be written.
    """
    if precision not in PRECISIONS:
        raise TokenScopeError(f"precision must be one of {', '.join(PRECISIONS)}")
    if len(images) == 0:
        raise TokenScopeError("the image set is empty")
    comm = comm or current_comm()
    context = SweepContext(
        model=model,
        images=images,
        metrics=check_metrics(model, images, metrics),
        precision=precision,
        shard=_Shard(images, batch_size, comm, model.data_config, keep_preprocessed_bytes),
        cache=cache,
        comm=comm,
        runner=_Runner(model, precision, on_notice),
        notice=on_notice,
    )
    for planned in plan.points:
        point = _cached_point(context, planned)
        if comm.broadcast(point is not None):
            if comm.rank == 0:
                yield point
            continue
        point = _compute_point(context, planned, should_stop, on_images)
        if point is None:
            return
        if comm.rank == 0:
            yield point


def _cached_point(context: SweepContext, planned: PlannedPoint) -> Point | None:
    if context.cache is None or context.comm.rank != 0:
        return None
    if any(METRICS[m].needs_bank for m in context.metrics):
        context.bank_key = context.bank_key or _bank_key(context)
    records = []
    for metric in context.metrics:
        record = context.cache.get(context.key(planned.schedule, metric))
        if record is None or len(record.get("values", ())) != len(context.images):
            return None
        records.append(record)
    return _point(
        planned,
        {m: r["values"] for m, r in zip(context.metrics, records, strict=True)},
        seconds=max(r.get("seconds", 0.0) for r in records),
        cached=True,
    )


def _compute_point(
    context: SweepContext,
    planned: PlannedPoint,
    should_stop: Callable[[], bool] | None,
    on_images: Callable[[int], None] | None,
) -> Point | None:
    _prepare(context)
    start = time.perf_counter()
    if planned.schedule == FULL_SCHEDULE:  # the reference itself: no second run
        outputs: Outputs | None = context.reference
    else:
        outputs = _outputs(
            context.runner or context.model,
            context.shard,
            planned.schedule,
            context.precision,
            should_stop,
            on_images,
        )
    stopped = outputs is None
    local: dict[str, list[float]] = {}
    if not stopped:
        assert context.reference is not None
        for metric in context.metrics:
            local[metric] = per_image_values(
                metric, outputs, context.reference, _labels(context), context.bank
            )
    seconds = time.perf_counter() - start
    gathered = context.comm.gather((stopped, context.shard.indices, local, seconds))
    if any(item[0] for item in gathered):
        return None
    values = _merge(gathered, context.metrics, len(context.images))
    seconds = max(item[3] for item in gathered)
    if context.comm.rank == 0 and context.cache is not None:
        for metric in context.metrics:
            context.cache.put(
                context.key(planned.schedule, metric),
                {
                    "schedule": planned.schedule,
                    "metric": metric,
                    "values": values[metric],
                    "seconds": seconds,
                },
            )
        _cache_notice(context)
    return _point(planned, values, seconds=seconds, cached=False)


def _cache_notice(context: SweepContext) -> None:
    """Say once that the cache cannot be written (the sweep itself goes on)."""
    cache = context.cache
    if cache is None or not cache.write_error or context.notice is None:
        return
    if not context.cache_noticed:
        context.notice(cache.write_error)
        context.cache_noticed = True


def _merge(
    gathered: list[tuple[bool, list[int], dict[str, list[float]], float]],
    metrics: Sequence[str],
    count: int,
) -> dict[str, list[float]]:
    """Every rank's per-image values, ordered by image index."""
    merged: dict[str, list[float]] = {m: [math.nan] * count for m in metrics}
    for _, indices, local, _ in gathered:
        for metric in metrics:
            for index, value in zip(indices, local[metric], strict=True):
                merged[metric][index] = value
    return merged


def _point(
    planned: PlannedPoint, values: dict[str, list[float]], *, seconds: float, cached: bool
) -> Point:
    return Point(
        schedule=planned.schedule,
        method=planned.method,
        setting=planned.setting,
        gmacs=planned.gmacs,
        percent=planned.percent,
        metrics={metric: bootstrap(found) for metric, found in values.items()},
        num_images=len(next(iter(values.values()))) if values else 0,
        seconds=seconds,
        cached=cached,
        extrapolated=planned.extrapolated,
        values=values,
    )


def _labels(context: SweepContext) -> torch.Tensor | None:
    labels = context.images.labels
    if labels is None:
        return None
    return torch.tensor([labels[i] for i in context.shard.indices], dtype=torch.long)


def _prepare(context: SweepContext) -> None:
    """The reference outputs on this shard, and the k-NN bank, from the cache or a run."""
    if context.reference is None:
        context.reference = _reference(context)
    if context.bank is None and any(METRICS[m].needs_bank for m in context.metrics):
        context.bank = _bank(context)


def _reference(context: SweepContext) -> Outputs:
    shard = context.shard
    key = make_key(
        kind="reference",
        model=model_fingerprint(context.model),
        images=context.images.fingerprint,
        precision=context.precision,
        batches=shard.batches,
    )
    stored = context.cache.get_tensors(key) if context.cache is not None else None
    if stored is not None:
        return Outputs(features=stored["features"], logits=stored.get("logits"))
    outputs = _outputs(
        context.runner or context.model, shard, FULL_SCHEDULE, context.precision, None, None
    )
    assert outputs is not None
    if context.cache is not None:
        tensors = {"features": outputs.features}
        if outputs.logits is not None:
            tensors["logits"] = outputs.logits
        context.cache.put_tensors(key, tensors)
    return outputs


def _bank_key(context: SweepContext) -> str:
    bank_set = context.images.bank
    if bank_set is None:
        raise TokenScopeError(
            "k-NN accuracy needs a labelled train split for its feature bank; this image "
            "set has none"
        )
    return make_key(
        kind="bank",
        model=model_fingerprint(context.model),
        images=bank_set.fingerprint,
        precision=context.precision,
    )


def _bank(context: SweepContext) -> KnnBank:
    """The full model's features of the labelled train split, on every rank."""
    bank_set = context.images.bank
    context.bank_key = context.bank_key or _bank_key(context)
    assert bank_set is not None and bank_set.labels is not None
    stored = None
    if context.cache is not None and context.comm.rank == 0:
        stored = context.cache.get_tensors(context.bank_key)
    stored = context.comm.broadcast(stored)
    if stored is None:
        shard = _Shard(bank_set, context.shard.batch_size, context.comm, context.model.data_config)
        outputs = _outputs(
            context.runner or context.model, shard, FULL_SCHEDULE, context.precision, None, None
        )
        assert outputs is not None
        pieces = context.comm.gather((shard.indices, outputs.features))
        features = torch.zeros(len(bank_set), context.model.facts.dim)
        for indices, found in pieces:
            features[indices] = found
        stored = {"features": features}
        if context.cache is not None and context.comm.rank == 0:
            context.cache.put_tensors(context.bank_key, stored)
    labels = torch.tensor(bank_set.labels, dtype=torch.long)
    classes = len(bank_set.class_names) if bank_set.class_names else int(labels.max()) + 1
    return build_bank(stored["features"], labels, classes)


def full_point(points: Sequence[Point]) -> Point | None:
    """The full model's point of a sweep, if it has one."""
    return next((point for point in points if point.method == FULL_SCHEDULE), None)


def results_document(
    spec: SweepSpec,
    model: LoadedModel,
    images: ImageSet,
    plan: SweepPlan,
    metrics: Sequence[str],
    points: Sequence[Point],
) -> dict[str, Any]:
    """The results as JSON: the configuration, what was measured, and every point."""
    from analysis.curves import BOOTSTRAP_METHOD

    return {
        "config": spec.to_dict(),
        "model": {"name": model.name, "weights": model.weights, "device": str(model.device)},
        "images": {
            "name": images.name,
            "description": images.description,
            "count": len(images),
            "fingerprint": images.fingerprint,
            "labels": images.label_kind,
        },
        "full_gmacs": plan.full_gmacs,
        "metrics": {
            name: {
                "label": METRICS[name].label,
                "higher_is_better": METRICS[name].higher_is_better,
                "description": METRICS[name].description,
            }
            for name in metrics
        },
        "interval": BOOTSTRAP_METHOD,
        "skipped": list(plan.skipped),
        "points": [point.to_dict() for point in points],
    }


IMAGE_CURVE_METHODS = ("tome", "evit")


def image_curves(
    model: LoadedModel,
    images: ImageSet,
    methods: Sequence[str] = IMAGE_CURVE_METHODS,
    *,
    targets: Sequence[float] = (35.0, 48.0, 61.0, 74.0, 87.0, 100.0),
    metric: str = "feature_cosine",
    cache: SweepCache | None = None,
) -> list[Point]:
    """Small reference curves for a few methods on a few images (Explore's side panel).

    Methods whose default placement does not fit the model are left out.
    """
    families = []
    for name in dict.fromkeys(methods):
        base = DEFAULT_BASES.get(name)
        if base is None:
            continue
        try:
            plan_sweep(model, schedules=[base], include_full=False)
        except (ScheduleError, TokenScopeError):
            continue
        families.append(MethodSweep(base=base, targets=tuple(targets)))
    plan = plan_sweep(model, methods=families)
    return list(run_sweep(model, images, plan, [metric], batch_size=len(images), cache=cache))


def point_of_run(
    schedule: Schedule | str, gmacs: float, full: float, values: Sequence[float], metric: str
) -> Point:
    """A point for a schedule already run elsewhere (Explore's current schedule)."""
    schedule = parse_schedule(schedule)
    return Point(
        schedule=schedule.to_text(),
        method=_method_of(schedule),
        setting=_setting(schedule),
        gmacs=gmacs,
        percent=100.0 * gmacs / full,
        metrics={metric: bootstrap(values)},
        num_images=len(values),
        seconds=0.0,
        values={metric: list(values)},
    )


# --------------------------------------------------------------------------- throughput


def measure_throughput(
    model: LoadedModel,
    images: ImageSet,
    schedules: Sequence[str],
    *,
    batch_size: int = 8,
    precision: str = "fp32",
    rounds: int = 5,
    warmup: int = 2,
) -> dict[str, float]:
    """Images per second of each schedule on the model's device, measured side by side.

    One batch (the set's first images, repeated if it is smaller) runs through every
    schedule once per round, interleaved, and the median per schedule is kept, as
    ``python -m analysis bench`` does. Not cached: it belongs to this machine and moment.
    """
    from analysis.bench import interleaved_medians

    indices = [i % len(images) for i in range(batch_size)]
    batch = images.batch(indices, model.data_config).to(model.device)
    device = model.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    candidates = {
        text: (lambda text=text: run(model, batch, text, precision=precision))
        for text in dict.fromkeys(schedules)
    }
    medians = interleaved_medians(candidates, rounds, warmup, sync)
    return {text: batch_size / seconds for text, seconds in medians.items()}


# --------------------------------------------------------------------------- helpers


def _check_fields(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise TokenScopeError(f"sweep {where} must be a JSON object")
    known = {f.name for f in fields(cls)}
    for name in data:
        if name not in known:
            raise TokenScopeError(
                f"sweep {where}: unknown field {name!r} (known: {', '.join(sorted(known))})"
            )


def _numbers(values: Any, where: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise TokenScopeError(f"sweep configuration: '{where}' must be a list of numbers")
    return list(values)


__all__ = [
    "DEFAULT_BASES",
    "FULL_SCHEDULE",
    "Comm",
    "MethodSweep",
    "PlannedPoint",
    "SweepPlan",
    "SweepSpec",
    "TorchComm",
    "check_metrics",
    "cost_targets",
    "current_comm",
    "default_metrics",
    "full_point",
    "image_curves",
    "measure_throughput",
    "plan_sweep",
    "point_of_run",
    "results_document",
    "run_sweep",
]
