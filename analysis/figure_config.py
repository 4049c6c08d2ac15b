"""Print figures: their JSON configuration and the readable labels they show.

A :class:`FigureConfig` says everything a figure needs: the model and the hashes of its
weights (learned reducer files included), the images with their hashes, the schedules,
the view and layers, and the print settings. ``analysis.figure_data`` gathers what it
shows, ``viz.figures`` draws it, and ``python -m analysis figure --config fig.json --out
fig.pdf`` does both without the app.

Four kinds of figure:

* ``panel``: pictures on a grid. ``rows="methods"``: one image, a row per schedule and a
  column per layer. ``rows="images"``: a row per image, a column per schedule at one layer.
* ``tradeoff``: a metric against cost from a sweep's results (embedded in the
  configuration, so the figure rebuilds without running the sweep again).
* ``tokens`` and ``gmacs``: tokens and GMACs per layer of each schedule, against the full
  model (analytic, no image is run).

Every wrong field is one :class:`TokenScopeError` that names it ("'print.dpi' must be
from 72 to 1200, got 5").
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.errors import TokenScopeError

if TYPE_CHECKING:
    from PIL import Image

    from analysis.models import LoadedModel
    from analysis.schedule import Schedule

FORMAT = "tokenscope.figure"
VERSION = 1
KINDS = ("panel", "tradeoff", "tokens", "gmacs")
VIEWS: dict[str, str] = {
    "segments": "Segments",
    "pruned": "Pruned patches",
    "depth": "Token depth",
    "heatmap": "Importance",
}
ROWS = ("methods", "images")
SEGMENT_MODES = ("mean", "tint")
LEGENDS = ("bottom", "right", "top", "inside", "none")
X_AXES = ("gmacs", "percent", "images_per_second")
# Column widths of common two-column paper templates (IEEE, ACM, CVPR), in inches.
WIDTH_PRESETS: dict[str, float] = {"one column": 3.3, "two columns": 6.9}
WIDTH_RANGE = (1.0, 20.0)
ASPECT_RANGE = (0.1, 3.0)
FONT_SIZE_RANGE = (8.0, 10.0)
DPI_RANGE = (72, 1200)
# Fonts bundled with matplotlib, so that a figure rebuilds the same on any machine.
# Another installed TrueType family also works where it is installed (viz.figures checks).
FONT_FAMILIES = ("DejaVu Sans", "DejaVu Serif", "STIXGeneral")
# Colour-blind-safe palettes, in the order methods take them. Okabe & Ito (2008), with
# yellow moved last (weak on white); Paul Tol's "bright" and "muted" schemes.
PALETTES: dict[str, tuple[str, ...]] = {
    "okabe-ito": (
        "#0072B2",
        "#D55E00",
        "#009E73",
        "#CC79A7",
        "#E69F00",
        "#56B4E9",
        "#000000",
        "#F0E442",
    ),
    "tol-bright": ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377"),
    "tol-muted": (
        "#332288",
        "#88CCEE",
        "#44AA99",
        "#117733",
        "#999933",
        "#DDCC77",
        "#CC6677",
        "#882255",
        "#AA4499",
    ),
    "greys": ("#000000", "#555555", "#888888", "#333333", "#aaaaaa", "#222222"),
}
FULL_MODEL_COLOR = "#7f7f7f"
DEFAULT_ASPECT = 0.75  # plots; panels take the height their grid needs (aspect None)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PrintSettings:
    """How the figure is printed.

    ``aspect`` is height / width; None lets a panel take the height its grid needs (plots
    then use :data:`DEFAULT_ASPECT`). ``dpi`` sets the raster parts (the image panels) and
    the pixel size of a PNG: ``round(width_in * dpi)`` pixels wide.
    """

    width_in: float = WIDTH_PRESETS["two columns"]
    aspect: float | None = None
    font_family: str = "DejaVu Sans"
    font_size: float = 8.0
    palette: str = "okabe-ito"
    legend: str = "bottom"
    dpi: int = 300
    caption: bool = True
    title: str = ""


@dataclass(frozen=True)
class LearnedFile:
    """The weights one learned method ran with.

    ``path`` is empty for a file that comes with the model (the default model's
    ``assets/``); otherwise the file to load. ``sha256`` is the digest of its tensors
    (16 hex digits, as the sweep cache keys them).
    """

    method: str
    source: str = ""  # the file's name, as the weights' metadata tells it
    path: str = ""
    sha256: str = ""
    provenance: str = ""  # analysis.learned.provenance, for the caption


@dataclass(frozen=True)
class ModelSpec:
    """The model: ``name`` ("default" or a timm name), ``weights`` ("default", "hub",
    "random" or a checkpoint path) and the digest of the backbone's tensors."""

    name: str = "default"
    weights: str | None = None
    weights_sha256: str = ""
    img_size: int | None = None
    learned: tuple[LearnedFile, ...] = ()


@dataclass(frozen=True)
class ImageSpec:
    """One image: ``source`` is ``sample:NAME`` (scikit-image), a file path (relative to
    the configuration's folder) or ``upload:NAME`` (the app's uploads, this session
    only). ``sha256`` hashes the decoded RGB pixels (:func:`analysis.imagesets.pixel_digest`)."""

    source: str
    sha256: str = ""
    label: str = ""

    @property
    def shown(self) -> str:
        """The label drawn in the figure."""
        if self.label:
            return self.label
        if self.source.startswith(("sample:", "upload:")):
            return self.source.split(":", 1)[1]
        return Path(self.source).stem


@dataclass(frozen=True)
class SeriesSpec:
    """One schedule of the figure; ``label`` overrides its readable name."""

    schedule: str
    label: str = ""


@dataclass(frozen=True)
class TradeoffSpec:
    """A trade-off plot: the sweep's results document (``python -m analysis sweep
    --out``), or a sweep configuration to run (cached) when there are no results."""

    results: dict[str, Any] | None = None
    sweep: dict[str, Any] | None = None
    metric: str = ""  # empty: the results' first metric
    x: str = "gmacs"
    methods: tuple[str, ...] = ()  # registry names to draw; empty: every method


@dataclass(frozen=True)
class FigureConfig:
    """Everything a figure needs to be drawn again, as JSON (:meth:`to_json`)."""

    kind: str
    model: ModelSpec = field(default_factory=ModelSpec)
    images: tuple[ImageSpec, ...] = ()
    schedules: tuple[SeriesSpec, ...] = ()
    view: str = "segments"
    layers: tuple[int, ...] = ()
    rows: str = "methods"
    segment_mode: str = "mean"
    input_column: bool = True  # rows="images": the input image as the first column
    tradeoff: TradeoffSpec | None = None
    print: PrintSettings = field(default_factory=PrintSettings)
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["schedules"] = [
            s.schedule if not s.label else {"schedule": s.schedule, "label": s.label}
            for s in self.schedules
        ]
        if self.tradeoff is not None:
            data["tradeoff"]["methods"] = list(self.tradeoff.methods)
        for name in ("images", "layers"):
            data[name] = list(data[name])
        data["model"]["learned"] = list(data["model"]["learned"])
        order = ["format", "version", "kind", "model", "images", "schedules", "view", "layers"]
        order += ["rows", "segment_mode", "input_column", "tradeoff", "print"]
        return {key: data[key] for key in order}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> FigureConfig:
        """Read a configuration; malformed JSON or a wrong field is one clear error."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise TokenScopeError(
                f"figure configuration is not valid JSON: {error.msg} at line {error.lineno}, "
                f"column {error.colno}"
            ) from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> FigureConfig:
        """Read and check a configuration; the error names the field that is wrong."""
        return _read_config(data)

    def with_print(self, **changes: Any) -> FigureConfig:
        """The same figure with other print settings (checked)."""
        merged = {**dataclasses.asdict(self.print), **changes}
        return dataclasses.replace(self, print=_read_print(merged, "print"))

    @property
    def data_key(self) -> str:
        """What decides the figure's data (not its print settings): a cache key."""
        data = self.to_dict()
        data.pop("print")
        return json.dumps(data, sort_keys=True)


# --------------------------------------------------------------------------- reading


def field_error(where: str, message: str) -> TokenScopeError:
    """The one error a wrong field gives: it names the field."""
    return TokenScopeError(f"figure configuration: '{where}' {message}")


def _object(data: Any, where: str, cls: type) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise field_error(where, f"must be a JSON object, got {_shown(data)}")
    known = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in known:
            path = f"{where}.{name}" if where != "configuration" else name
            raise TokenScopeError(
                f"figure configuration: unknown field '{path}' (known: {', '.join(known)})"
            )
    return data


def _text(data: dict[str, Any], name: str, where: str, default: str = "") -> str:
    value = data.get(name, default)
    if not isinstance(value, str):
        raise field_error(_join(where, name), f"must be text, got {_shown(value)}")
    return value


def _choice(data: dict[str, Any], name: str, where: str, options: Sequence[str], default: str):
    value = _text(data, name, where, default)
    if value not in options:
        raise field_error(
            _join(where, name), f"must be one of {', '.join(options)}, got {_shown(value)}"
        )
    return value


def _number(
    data: dict[str, Any], name: str, where: str, default: float, low: float, high: float
) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise field_error(_join(where, name), f"must be a number, got {_shown(value)}")
    if not low <= value <= high:
        raise field_error(_join(where, name), f"must be from {low:g} to {high:g}, got {value:g}")
    return float(value)


def _integer(data: dict[str, Any], name: str, where: str, default: int, low: int, high: int):
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise field_error(_join(where, name), f"must be a whole number, got {_shown(value)}")
    if not low <= value <= high:
        raise field_error(_join(where, name), f"must be from {low} to {high}, got {value}")
    return value


def _flag(data: dict[str, Any], name: str, where: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise field_error(_join(where, name), f"must be true or false, got {_shown(value)}")
    return value


def _list(data: dict[str, Any], name: str, where: str) -> list[Any]:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise field_error(_join(where, name), f"must be a list, got {_shown(value)}")
    return value


def _join(where: str, name: str) -> str:
    return name if where in ("", "configuration") else f"{where}.{name}"


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_print(data: Any, where: str) -> PrintSettings:
    data = _object(data, where, PrintSettings)
    aspect = data.get("aspect")
    if aspect is not None:
        aspect = _number(data, "aspect", where, 0.0, *ASPECT_RANGE)
    family = _text(data, "font_family", where, "DejaVu Sans").strip()
    if not family:
        raise field_error(_join(where, "font_family"), "must name a font family")
    return PrintSettings(
        width_in=_number(data, "width_in", where, WIDTH_PRESETS["two columns"], *WIDTH_RANGE),
        aspect=aspect,
        font_family=family,
        font_size=_number(data, "font_size", where, 8.0, *FONT_SIZE_RANGE),
        palette=_choice(data, "palette", where, list(PALETTES), "okabe-ito"),
        legend=_choice(data, "legend", where, LEGENDS, "bottom"),
        dpi=_integer(data, "dpi", where, 300, *DPI_RANGE),
        caption=_flag(data, "caption", where, True),
        title=_text(data, "title", where),
    )


def _read_model(data: Any) -> ModelSpec:
    data = _object(data, "model", ModelSpec)
    weights = data.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise field_error("model.weights", f"must be text or null, got {_shown(weights)}")
    img_size = data.get("img_size")
    if img_size is not None:
        img_size = _integer(data, "img_size", "model", 0, 16, 4096)
    learned = []
    for index, item in enumerate(_list(data, "learned", "model")):
        where = f"model.learned[{index}]"
        item = _object(item, where, LearnedFile)
        method = _text(item, "method", where)
        if not method:
            raise field_error(f"{where}.method", "must name the learned method")
        learned.append(
            LearnedFile(
                method=method,
                source=_text(item, "source", where),
                path=_text(item, "path", where),
                sha256=_text(item, "sha256", where),
                provenance=_text(item, "provenance", where),
            )
        )
    name = _text(data, "name", "model", "default")
    if not name:
        raise field_error("model.name", "must name a model ('default' or a timm ViT name)")
    return ModelSpec(
        name=name,
        weights=weights,
        weights_sha256=_text(data, "weights_sha256", "model"),
        img_size=img_size,
        learned=tuple(learned),
    )


def _read_tradeoff(data: Any) -> TradeoffSpec:
    data = _object(data, "tradeoff", TradeoffSpec)
    results, sweep = data.get("results"), data.get("sweep")
    if results is None and sweep is None:
        raise field_error("tradeoff", "needs 'results' (a sweep's results JSON) or 'sweep'")
    if results is not None:
        if not isinstance(results, dict):
            raise field_error("tradeoff.results", f"must be a JSON object, got {_shown(results)}")
        points = results.get("points")
        if not isinstance(points, list) or not points:
            raise field_error("tradeoff.results.points", "must be a non-empty list of sweep points")
        from analysis.curves import Point

        for index, point in enumerate(points):
            try:
                Point.from_dict(point)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise field_error(
                    f"tradeoff.results.points[{index}]", f"is not a sweep point ({error!r})"
                ) from None
        metrics = results.get("metrics", {})
        if not isinstance(metrics, dict):
            raise field_error("tradeoff.results.metrics", "must be a JSON object")
    if sweep is not None and not isinstance(sweep, dict):
        raise field_error("tradeoff.sweep", f"must be a JSON object, got {_shown(sweep)}")
    methods = _list(data, "methods", "tradeoff")
    if not all(isinstance(m, str) for m in methods):
        raise field_error("tradeoff.methods", "must be a list of method names")
    spec = TradeoffSpec(
        results=results,
        sweep=sweep,
        metric=_text(data, "metric", "tradeoff"),
        x=_choice(data, "x", "tradeoff", X_AXES, "gmacs"),
        methods=tuple(methods),
    )
    if results is not None:
        known = result_metrics(results)
        if spec.metric and spec.metric not in known:
            raise field_error(
                "tradeoff.metric",
                f"{spec.metric!r} is not in the results (they hold: {', '.join(known)})",
            )
    return spec


def result_metrics(results: dict[str, Any]) -> list[str]:
    """The metrics a results document holds, in its order."""
    names = list(results.get("metrics", {}))
    for point in results["points"]:
        names += [m for m in point.get("metrics", {}) if m not in names]
    return names


def _read_config(data: Any) -> FigureConfig:
    data = _object(data, "configuration", FigureConfig)
    if data.get("format", FORMAT) != FORMAT:
        raise field_error("format", f"must be {FORMAT!r}, got {_shown(data.get('format'))}")
    version = data.get("version", VERSION)
    if version != VERSION:
        raise field_error("version", f"must be {VERSION}, got {_shown(version)}")
    if "kind" not in data:
        raise field_error("kind", f"is missing (one of {', '.join(KINDS)})")
    kind = _choice(data, "kind", "", KINDS, "panel")
    images = []
    for index, item in enumerate(_list(data, "images", "")):
        where = f"images[{index}]"
        if isinstance(item, str):
            item = {"source": item}
        item = _object(item, where, ImageSpec)
        source = _text(item, "source", where).strip()
        if not source:
            raise field_error(f"{where}.source", "must be 'sample:NAME' or an image file's path")
        images.append(ImageSpec(source, _text(item, "sha256", where), _text(item, "label", where)))
    schedules = []
    for index, item in enumerate(_list(data, "schedules", "")):
        where = f"schedules[{index}]"
        if isinstance(item, str):
            item = {"schedule": item}
        item = _object(item, where, SeriesSpec)
        schedules.append(SeriesSpec(_text(item, "schedule", where), _text(item, "label", where)))
    layers = _list(data, "layers", "")
    for index, layer in enumerate(layers):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise field_error(
                f"layers[{index}]", f"must be a 0-based layer number, got {_shown(layer)}"
            )
    config = FigureConfig(
        kind=kind,
        model=_read_model(data.get("model", {})),
        images=tuple(images),
        schedules=tuple(schedules),
        view=_choice(data, "view", "", list(VIEWS), "segments"),
        layers=tuple(layers),
        rows=_choice(data, "rows", "", ROWS, "methods"),
        segment_mode=_choice(data, "segment_mode", "", SEGMENT_MODES, "mean"),
        input_column=_flag(data, "input_column", "", True),
        tradeoff=None if data.get("tradeoff") is None else _read_tradeoff(data["tradeoff"]),
        print=_read_print(data.get("print", {}), "print"),
    )
    _check_kind(config)
    return config


def _check_kind(config: FigureConfig) -> None:
    """The fields each kind of figure needs."""
    if config.kind == "tradeoff":
        if config.tradeoff is None:
            raise field_error("tradeoff", "is needed for a trade-off figure (the sweep's results)")
        return
    if not config.schedules:
        raise field_error("schedules", "must list at least one schedule")
    for index, series in enumerate(config.schedules):
        field_schedule(series.schedule, f"schedules[{index}]")
    if config.kind != "panel":
        return
    if not config.images:
        raise field_error("images", "must list at least one image for a panel")
    if config.view != "depth" and not config.layers:
        raise field_error("layers", "must list the layers to show (0-based)")
    if config.rows == "methods" and len(config.images) != 1:
        raise field_error(
            "images",
            f"must hold one image for a methods × layers panel (rows 'methods'), got "
            f"{len(config.images)}; use rows 'images' for several",
        )
    if config.rows == "images" and config.view != "depth" and len(config.layers) != 1:
        raise field_error(
            "layers",
            f"must hold one layer for an images × methods panel (rows 'images'), got "
            f"{len(config.layers)}",
        )


def field_schedule(text: str, where: str) -> Schedule:
    """A schedule of the configuration, parsed; a bad one names its field."""
    from analysis.errors import ScheduleError
    from analysis.schedule import parse_schedule

    try:
        return parse_schedule(text)
    except ScheduleError as error:
        raise field_error(where, f"is not a valid schedule: {error}") from None


# --------------------------------------------------------------------------- labels


def _format_number(value: float) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}"


def _format_param(name: str, value: Any, kind: type) -> str:
    if isinstance(value, tuple):
        values = [float(v) for v in value]
        if len(set(values)) == 1:
            value = value[0]
        else:
            mean = sum(values) / len(values)
            return f"{name}≈{mean:.3g} (per layer)"
    if kind is bool:
        return f"{name} {'on' if value else 'off'}"
    if kind is int:
        return f"{name}={_format_number(int(value))}"
    return f"{name} {_format_number(float(value))}"


def schedule_label(schedule: Schedule | str) -> str:
    """A readable name for a schedule, for legends and row labels.

    Each method's label (``Reducer.label``) with its strength (given, else its default)
    and any other parameter given, then its layers when the schedule names them:
    "ToMe r=8", "EViT keep 0.7 @ 3,6,9", "DTEM r≈10.3 (per layer)", "Full model".
    """
    from analysis.reducers import reducer_class
    from analysis.schedule import _format_layers, parse_schedule

    schedule = parse_schedule(schedule)
    if schedule.is_empty:
        return "Full model"
    pieces = []
    for part in schedule.parts:
        cls = reducer_class(part.method)
        settings = []
        if cls.strength is not None:
            spec = cls.param(cls.strength)
            value = part.params.get(spec.name, spec.default)
            settings.append(_format_param(spec.name, value, spec.kind))
        for name, value in part.params.items():
            if name == cls.strength:
                continue
            spec = cls.param(name)
            if value == spec.default:
                continue
            settings.append(_format_param(name, value, spec.kind))
        text = " ".join([cls.label, ", ".join(settings)]).strip()
        if part.layers is not None:
            text += " @ " + _format_layers(part.layers)
        pieces.append(text)
    return " + ".join(pieces)


def method_label(method: str) -> str:
    """The readable name of a registry method name ("none": "Full model")."""
    from analysis.errors import ScheduleError
    from analysis.reducers import reducer_class

    if method == "none":
        return "Full model"
    try:
        return " + ".join(reducer_class(name).label for name in method.split("+"))
    except ScheduleError:
        return method


def model_title(name: str, weights: str | None = None) -> str:
    """The model as a caption names it."""
    if name == "default":
        title = "DINOv2 ViT-S/14 (the embedded default)"
        if weights not in (None, "default", "hub"):
            title += f", backbone from {Path(str(weights)).name}"
        return title
    if weights in (None, "hub"):
        return f"{name} (timm pretrained)"
    if weights == "random":
        return f"{name} (random weights)"
    return f"{name} ({Path(str(weights)).name})"


def series_method(schedule: Schedule) -> str:
    """The registry name that picks a series' style: its first method, "none" if empty."""
    names = schedule.methods()
    return names[0] if names else "none"


# --------------------------------------------------------------------------- builders


def model_spec(model: LoadedModel, schedules: Sequence[str] = ()) -> ModelSpec:
    """The record of a loaded model, with the hash of its backbone and of the learned
    weights that ``schedules`` use (every learned method when none are given)."""
    from analysis.learned import provenance
    from analysis.sweep_cache import model_fingerprint

    fingerprint = model_fingerprint(model)
    used: set[str] | None = None
    if schedules:
        used = set()
        for text in schedules:
            used.update(field_schedule(text, "schedules").methods())
    learned = []
    for method, weights in sorted(model.learned.items()):
        if used is not None and method not in used:
            continue
        learned.append(
            LearnedFile(
                method=method,
                source=weights.metadata.get("source", ""),
                sha256=fingerprint["learned"][method],
                provenance=provenance(weights),
            )
        )
    return ModelSpec(
        name=model.name,
        weights=model.weights,
        weights_sha256=fingerprint["backbone"],
        learned=tuple(learned),
    )


def image_spec(source: str, image: Image.Image, label: str = "") -> ImageSpec:
    """The record of an image already in memory, with its pixel hash."""
    from analysis.imagesets import pixel_digest

    return ImageSpec(source=source, sha256=pixel_digest(image), label=label)


def panel_config(
    model: LoadedModel,
    schedules: Sequence[str | SeriesSpec],
    images: Sequence[ImageSpec],
    *,
    view: str = "segments",
    layers: Sequence[int] = (),
    rows: str = "methods",
    segment_mode: str = "mean",
    print_settings: PrintSettings | None = None,
) -> FigureConfig:
    """A panel figure of what a page shows, with every hash filled in (checked)."""
    series = tuple(s if isinstance(s, SeriesSpec) else SeriesSpec(s) for s in schedules)
    config = FigureConfig(
        kind="panel",
        model=model_spec(model, [s.schedule for s in series]),
        images=tuple(images),
        schedules=series,
        view=view,
        layers=tuple(int(v) for v in layers),
        rows=rows,
        segment_mode=segment_mode,
        print=print_settings or PrintSettings(),
    )
    return FigureConfig.from_dict(config.to_dict())


def cost_config(
    kind: str,
    model: LoadedModel,
    schedules: Sequence[str | SeriesSpec],
    *,
    print_settings: PrintSettings | None = None,
) -> FigureConfig:
    """A tokens-per-layer (``kind="tokens"``) or GMACs-per-layer (``"gmacs"``) figure."""
    series = tuple(s if isinstance(s, SeriesSpec) else SeriesSpec(s) for s in schedules)
    config = FigureConfig(
        kind=kind,
        model=model_spec(model, [s.schedule for s in series]),
        schedules=series,
        print=print_settings or PrintSettings(aspect=DEFAULT_ASPECT),
    )
    return FigureConfig.from_dict(config.to_dict())


def tradeoff_config(
    results: dict[str, Any],
    *,
    metric: str = "",
    x: str = "gmacs",
    model: LoadedModel | None = None,
    print_settings: PrintSettings | None = None,
) -> FigureConfig:
    """A trade-off figure of a sweep's results document (``analysis.sweep.results_document``);
    with ``model``, its weights are recorded for the caption."""
    info = results.get("model", {}) if isinstance(results, dict) else {}
    spec = (
        model_spec(model)
        if model is not None
        else ModelSpec(name=str(info.get("name", "default")), weights=info.get("weights"))
    )
    config = FigureConfig(
        kind="tradeoff",
        model=spec,
        tradeoff=TradeoffSpec(results=json.loads(json.dumps(results)), metric=metric, x=x),
        print=print_settings or PrintSettings(width_in=WIDTH_PRESETS["one column"]),
    )
    return FigureConfig.from_dict(config.to_dict())


__all__ = [
    "FONT_FAMILIES",
    "KINDS",
    "LEGENDS",
    "PALETTES",
    "VIEWS",
    "WIDTH_PRESETS",
    "FigureConfig",
    "ImageSpec",
    "LearnedFile",
    "ModelSpec",
    "PrintSettings",
    "SeriesSpec",
    "TradeoffSpec",
    "cost_config",
    "image_spec",
    "method_label",
    "model_spec",
    "model_title",
    "panel_config",
    "schedule_label",
    "tradeoff_config",
]
