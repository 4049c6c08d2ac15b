"""The data a print figure draws, gathered from its :class:`FigureConfig`.

:func:`build_figure_data` loads (or takes) the model and the images, checks them against
the hashes the configuration records, and runs the schedules (panels) or counts their
cost (tokens and GMACs per layer); a trade-off figure reads the sweep's results it
embeds. A changed image or weights file is refused with a message that says which.
Empty hashes are filled in (``FigureData.config``), so a hand-written configuration
becomes a complete one. ``viz.figures`` draws the result; no model runs there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.errors import TokenScopeError
from analysis.figure_config import (
    FigureConfig,
    ImageSpec,
    ModelSpec,
    field_error,
    field_schedule,
    method_label,
    model_spec,
    model_title,
    result_metrics,
    schedule_label,
    series_method,
)

if TYPE_CHECKING:
    from PIL import Image

    from analysis.curves import Point
    from analysis.flops import CostReport
    from analysis.images import CropInfo
    from analysis.models import LoadedModel
    from analysis.schedule import Schedule
    from analysis.trace import Trace


@dataclass(frozen=True)
class PanelImage:
    """An image of a panel: the original, and how the model's input was cut from it."""

    label: str
    original: Image.Image = field(repr=False)
    crop: CropInfo


@dataclass(frozen=True)
class Series:
    """One schedule as drawn: its readable label, style key, cost and (panels) trace."""

    label: str
    schedule: str
    method: str
    cost: CostReport = field(repr=False)
    trace: Trace | None = field(default=None, repr=False)  # image i of the panel at index i


@dataclass(frozen=True)
class FigureData:
    """What ``viz.figures`` draws: no model runs there."""

    config: FigureConfig  # with every hash filled in
    caption: str
    depth: int = 0
    grid: tuple[int, int] = (0, 0)
    images: tuple[PanelImage, ...] = ()
    series: tuple[Series, ...] = ()
    full: Series | None = None
    points: tuple[Point, ...] = ()
    method_labels: dict[str, str] = field(default_factory=dict)
    metric: str = ""
    metric_label: str = ""
    higher_is_better: bool = True


def load_figure_model(spec: ModelSpec, device: str = "cpu", base: Path | None = None):
    """The model a configuration names, with its extra learned files attached."""
    from analysis.models import load_model

    paths = [_resolve(f.path, base) for f in spec.learned if f.path]
    for index, path in enumerate(paths):
        if not path.is_file():
            raise field_error(f"model.learned[{index}].path", f"names a missing file: {path}")
    weights = spec.weights
    if weights not in (None, "default", "hub", "random"):
        weights = str(_resolve(weights, base))
    try:
        return load_model(
            spec.name, weights=weights, device=device, img_size=spec.img_size, learned=paths
        )
    except TokenScopeError as error:
        raise field_error("model", f"could not be loaded: {error}") from None


def check_model(spec: ModelSpec, model: LoadedModel) -> ModelSpec:
    """Refuse a model whose weights differ from the recorded hashes; returns the spec with
    missing hashes filled in."""
    from analysis.learned import provenance
    from analysis.reducers import reducer_class
    from analysis.sweep_cache import model_fingerprint

    if spec.name != model.name:
        raise field_error("model.name", f"is {spec.name!r} but the model given is {model.name!r}")
    fingerprint = model_fingerprint(model)
    found = fingerprint["backbone"]
    if spec.weights_sha256 and spec.weights_sha256 != found:
        raise field_error(
            "model.weights_sha256",
            f"does not match: the figure was made with backbone weights {spec.weights_sha256}, "
            f"but {model_title(spec.name, spec.weights)} now has {found}. Load the weights it "
            "was made with, or remove the hash to accept these",
        )
    learned = []
    for index, item in enumerate(spec.learned):
        where = f"model.learned[{index}]"
        weights = model.learned.get(item.method)
        label = reducer_class(item.method).label
        if weights is None:
            raise field_error(
                where,
                f"names {label} weights ({item.source or 'a file'}) but none are loaded; give "
                f"the file in {where}.path",
            )
        digest = fingerprint["learned"][item.method]
        source = weights.metadata.get("source", "")
        if item.sha256 and item.sha256 != digest:
            raise field_error(
                f"{where}.sha256",
                f"does not match: the figure was made with {label} weights "
                f"{item.source or ''} ({item.sha256}), but the model runs {source} ({digest}). "
                f"Give the file it was made with in {where}.path",
            )
        learned.append(
            dataclasses.replace(
                item,
                source=item.source or source,
                sha256=digest,
                provenance=item.provenance or provenance(weights),
            )
        )
    return dataclasses.replace(spec, weights_sha256=found, learned=tuple(learned))


def load_figure_image(
    spec: ImageSpec,
    index: int,
    provided: Mapping[str, Image.Image] | None = None,
    base: Path | None = None,
) -> tuple[Image.Image, ImageSpec]:
    """An image of the configuration, checked against its hash (filled in when missing)."""
    from analysis.errors import ImageError
    from analysis.images import load_image
    from analysis.imagesets import pixel_digest, sample_image

    where = f"images[{index}]"
    source = spec.source
    if provided and source in provided:
        image = load_image(provided[source])
    elif source.startswith("sample:"):
        try:
            image = sample_image(source.removeprefix("sample:"))
        except TokenScopeError as error:
            raise field_error(f"{where}.source", str(error)) from None
    elif source.startswith("upload:"):
        raise field_error(
            f"{where}.source",
            f"{source!r} was uploaded in the app and is not stored with the figure; save the "
            "image and give its path instead (the hash stays valid)",
        )
    else:
        path = _resolve(source, base)
        if not path.is_file():
            raise field_error(f"{where}.source", f"names a missing file: {path}")
        try:
            image = load_image(path)
        except ImageError as error:
            raise field_error(f"{where}.source", f"could not be read: {error}") from None
    digest = pixel_digest(image)
    if spec.sha256 and spec.sha256 != digest:
        raise field_error(
            f"{where}.sha256",
            f"does not match: {source} has changed since the figure was made (recorded "
            f"{spec.sha256[:12]}…, found {digest[:12]}…)",
        )
    return image, dataclasses.replace(spec, sha256=digest)


def build_figure_data(
    config: FigureConfig,
    *,
    model: LoadedModel | None = None,
    images: Mapping[str, Image.Image] | None = None,
    device: str = "cpu",
    base: str | Path | None = None,
) -> FigureData:
    """Gather what the figure draws: load (or take) the model and images, check their
    hashes, and run the schedules (panels) or count their cost (tokens, GMACs).

    Args:
        config: the figure's configuration.
        model: a loaded model to use instead of loading ``config.model`` (still checked).
        images: images by ``source``, for sources not on disk (the app's uploads).
        device: where a model loaded here runs.
        base: the folder relative paths in the configuration start from.
    """
    folder = Path(base) if base is not None else None
    if config.kind == "tradeoff":
        return _tradeoff_data(config, device)
    if model is None:
        model = load_figure_model(config.model, device, folder)
    spec = check_model(config.model, model)
    facts = model.facts
    schedules = [_checked_schedule(s.schedule, i, model) for i, s in enumerate(config.schedules)]
    labels = [
        s.label or schedule_label(p) for s, p in zip(config.schedules, schedules, strict=True)
    ]
    spec = _with_used_learned(spec, model, schedules)
    full = _series("Full model", _empty(), model)
    if config.kind in ("tokens", "gmacs"):
        series = tuple(
            _series(label, schedule, model)
            for label, schedule in zip(labels, schedules, strict=True)
        )
        config = dataclasses.replace(config, model=spec)
        return FigureData(
            config=config,
            caption=_caption(config, model, []),
            depth=facts.depth,
            series=series,
            full=full,
        )
    for index, layer in enumerate(config.layers):
        if layer >= facts.depth:
            raise field_error(
                f"layers[{index}]",
                f"is {layer}, beyond the model's {facts.depth} layers (0-{facts.depth - 1})",
            )
    loaded = [load_figure_image(s, i, images, folder) for i, s in enumerate(config.images)]
    pictures = [image for image, _ in loaded]
    series = []
    for index, (label, schedule) in enumerate(zip(labels, schedules, strict=True)):
        result = _run(model, pictures, schedule, f"schedules[{index}]")
        series.append(
            Series(
                label=label,
                schedule=schedule.to_text(),
                method=series_method(schedule),
                cost=result.cost,
                trace=result.trace,
            )
        )
    from analysis.images import fit_to_input

    crops = [fit_to_input(image, model.data_config)[1] for image in pictures]
    config = dataclasses.replace(
        config, model=spec, images=tuple(image_spec for _, image_spec in loaded)
    )
    return FigureData(
        config=config,
        caption=_caption(config, model, [s.shown for s in config.images]),
        depth=facts.depth,
        grid=series[0].trace.grid,
        images=tuple(
            PanelImage(s.shown, image, crop)
            for s, image, crop in zip(config.images, pictures, crops, strict=True)
        ),
        series=tuple(series),
        full=full,
    )


def _empty() -> Schedule:
    from analysis.schedule import Schedule

    return Schedule()


def _checked_schedule(text: str, index: int, model: LoadedModel) -> Schedule:
    from analysis.engine import attach_weights
    from analysis.errors import ScheduleError
    from analysis.schedule import parse_schedule

    where = f"schedules[{index}]"
    try:
        schedule = parse_schedule(text, depth=model.facts.depth)
        attach_weights(schedule.resolve(model.facts), model)
    except ScheduleError as error:
        raise field_error(where, f"cannot run on this model: {error}") from None
    return schedule


def _with_used_learned(spec: ModelSpec, model: LoadedModel, schedules: list[Schedule]):
    """Record the learned weights the schedules use that the spec does not list yet."""
    listed = {item.method for item in spec.learned}
    used = sorted({m for s in schedules for m in s.methods() if m in model.learned} - listed)
    if not used:
        return spec
    extra = model_spec(model)
    added = tuple(item for item in extra.learned if item.method in used)
    return dataclasses.replace(spec, learned=spec.learned + added)


def _series(label: str, schedule: Schedule, model: LoadedModel) -> Series:
    from analysis.flops import count_macs

    facts = model.facts
    cost = count_macs(facts, schedule.resolve(facts), model.module)
    return Series(label, schedule.to_text(), series_method(schedule), cost)


def _run(model: LoadedModel, pictures: list[Image.Image], schedule: Schedule, where: str):
    from analysis.engine import run

    try:
        return run(model, pictures, schedule)
    except TokenScopeError as error:
        raise field_error(where, f"could not run: {error}") from None


def _resolve(path: str, base: Path | None) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and base is not None:
        candidate = base / candidate
    return candidate


def _caption(config: FigureConfig, model: LoadedModel, image_labels: list[str]) -> str:
    """One line saying what made the figure: model, weights, learned files, images."""
    spec = config.model
    parts = [f"Model: {model_title(spec.name, spec.weights)}, backbone {spec.weights_sha256}"]
    used = {m for s in config.schedules for m in field_schedule(s.schedule, "schedules").methods()}
    parts += _learned_parts(spec, used)
    if image_labels:
        samples = all(s.source.startswith("sample:") for s in config.images)
        where = " (scikit-image samples)" if samples else ""
        parts.append(f"Images: {', '.join(image_labels)}{where}")
    if config.kind in ("tokens", "gmacs"):
        parts.append("GMACs counted analytically (1 multiply-add = 1 MAC)")
    return ". ".join(parts) + "."


def _learned_parts(spec: ModelSpec, used: set[str]) -> list[str]:
    """Which weights file each learned method in the figure ran with, and its hash (the
    full provenance, how it was trained, stays in the configuration)."""
    parts = []
    for item in spec.learned:
        if item.method not in used:
            continue
        source = item.provenance.split("; ")[0] if item.provenance else item.source
        source = source or Path(item.path).name or "unnamed weights"
        digest = f" ({item.sha256})" if item.sha256 else ""
        parts.append(f"{method_label(item.method)} weights: {source}{digest}")
    return parts


def _tradeoff_data(config: FigureConfig, device: str) -> FigureData:
    from analysis.curves import Point

    spec = config.tradeoff
    assert spec is not None
    results = spec.results
    if results is None:
        results = _run_sweep(spec.sweep or {}, device)
        spec = dataclasses.replace(spec, results=results)
        config = dataclasses.replace(config, tradeoff=spec)
    points = [Point.from_dict(p) for p in results["points"]]
    metrics = result_metrics(results)
    metric = spec.metric or (metrics[0] if metrics else "")
    if metric not in metrics:
        raise field_error("tradeoff.metric", f"{metric!r} is not in the results")
    if spec.methods:
        keep = set(spec.methods) | {"none"}
        points = [p for p in points if p.method in keep]
    points = [p for p in points if metric in p.metrics]
    if not any(p.method != "none" for p in points):
        raise field_error("tradeoff.methods", "leaves no point of a reduced schedule to draw")
    if not any(p.method != "none" and getattr(p, spec.x) is not None for p in points):
        raise field_error(
            "tradeoff.x", f"is {spec.x!r}, which no point measured (sweep with --throughput)"
        )
    info = results.get("metrics", {}).get(metric, {})
    labels = {p.method: method_label(p.method) for p in points}
    return FigureData(
        config=config,
        caption=_tradeoff_caption(config, results, points),
        points=tuple(points),
        method_labels=labels,
        metric=metric,
        metric_label=str(info.get("label", metric)),
        higher_is_better=bool(info.get("higher_is_better", True)),
    )


def _tradeoff_caption(config: FigureConfig, results: dict[str, Any], points: list[Point]) -> str:
    model = results.get("model", {})
    name = str(model.get("name", config.model.name))
    weights = model.get("weights", config.model.weights)
    parts = [f"Model: {model_title(name, weights)}"]
    parts += _learned_parts(config.model, {p.method for p in points})
    images = results.get("images", {})
    if images:
        described = images.get("description") or images.get("name", "")
        fingerprint = str(images.get("fingerprint", ""))[:12]
        parts.append(f"Images: {described}, fingerprint {fingerprint}")
    interval = str(results.get("interval", ""))
    if interval.startswith("bootstrap-95"):
        parts.append("Error bars: 95 % bootstrap intervals over the images")
    elif interval:
        parts.append(f"Error bars: {interval}")
    return ". ".join(parts) + "."


def _run_sweep(data: dict[str, Any], device: str) -> dict[str, Any]:
    """Run a sweep configuration (points come from the cache when it has them)."""
    from analysis.imagesets import open_image_set
    from analysis.models import load_model
    from analysis.sweep import SweepSpec, check_metrics, plan_sweep, results_document, run_sweep
    from analysis.sweep_cache import SweepCache

    try:
        spec = SweepSpec.from_dict(data)
    except TokenScopeError as error:
        raise field_error("tradeoff.sweep", str(error)) from None
    model = load_model(spec.model, weights=spec.weights, device=device, learned=spec.learned)
    images = open_image_set(spec.images, limit=spec.limit, model_classes=model.facts.num_classes)
    plan = plan_sweep(
        model, schedules=spec.schedules, methods=spec.methods, include_full=spec.include_full
    )
    metrics = check_metrics(model, images, spec.metrics)
    points = list(
        run_sweep(model, images, plan, metrics, batch_size=spec.batch_size, cache=SweepCache())
    )
    return results_document(spec, model, images, plan, metrics, points)


__all__ = [
    "FigureData",
    "PanelImage",
    "Series",
    "build_figure_data",
    "check_model",
    "load_figure_image",
    "load_figure_model",
]
