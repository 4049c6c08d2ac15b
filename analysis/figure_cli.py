"""``python -m analysis figure``: rebuild a print figure from its configuration, without the app.

::

    python -m analysis figure --config fig.json --out fig.pdf     # or .svg / .png
    python -m analysis figure --config mine.json --out fig.png --save-config full.json

The same configuration with the same weights and images gives the same pixels and the
same vector content. A wrong field, a changed image or changed weights stop it with one
line that says which (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.errors import TokenScopeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis figure",
        description=(
            "Draw a print figure (PDF, SVG or PNG) from its JSON configuration, as the "
            "app's Figures page downloads it. Paths in the configuration are relative to "
            "its folder."
        ),
    )
    parser.add_argument("--config", required=True, help="the figure's configuration (JSON)")
    parser.add_argument("--out", required=True, help="the file to write: .pdf, .svg or .png")
    parser.add_argument(
        "--format", choices=("pdf", "svg", "png"), help="the format (default: from --out)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument(
        "--save-config",
        help="also write the configuration with every hash filled in (a complete record)",
    )
    return parser


def figure_main(argv: list[str] | None = None) -> int:
    """Entry point; errors users can cause come back as TokenScopeError (exit status 2)."""
    args = build_parser().parse_args(argv)
    from analysis.figure_config import FigureConfig
    from analysis.figure_data import build_figure_data

    # The CLI is the one place the core reaches for the drawing code: it writes files.
    from viz.figures import FORMATS, draw_figure, export

    config_path = Path(args.config).expanduser()
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as error:
        raise TokenScopeError(f"cannot read {config_path}: {error.strerror}") from None
    out = Path(args.out).expanduser()
    fmt = args.format or out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise TokenScopeError(
            f"--out {out.name}: give a .pdf, .svg or .png file (or --format), not {fmt!r}"
        )
    config = FigureConfig.from_json(text)
    from analysis.cli import _device

    data = build_figure_data(config, device=_device(args.device), base=config_path.resolve().parent)
    figure = draw_figure(data)
    payload = export(figure, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    from analysis.sweep_cache import atomic_write  # a killed export leaves no half file

    atomic_write(out, payload)
    if args.save_config:
        atomic_write(Path(args.save_config).expanduser(), data.config.to_json().encode("utf-8"))
    width, height = figure.get_size_inches()
    print(
        f"wrote {out} ({fmt.upper()}, {width:.2f} × {height:.2f} in, "
        f"{data.config.print.dpi} dpi for rasters, {len(payload) / 1024:.0f} KiB)"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(figure_main())
