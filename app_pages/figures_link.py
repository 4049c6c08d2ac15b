"""How a page sends what it shows to the Figures page ("Send to Figures").

A page builds a :class:`~analysis.figure_config.FigureConfig` with the builders of
``analysis.figure_config`` (``panel_config``, ``cost_config``, ``tradeoff_config``) and
calls :func:`send_to_figures`. The model and any uploaded images travel with it in the
session, so the Figures page draws exactly what the page ran.
"""

from __future__ import annotations

from collections.abc import Mapping

import streamlit as st
from PIL import Image

from analysis import LoadedModel
from analysis.figure_config import FigureConfig, ImageSpec, image_spec

FIGURES_PAGE = "app_pages/figures.py"
CONFIG_KEY = "figure_config"  # the pending FigureConfig
MODEL_KEY = "figure_model"  # the LoadedModel it was made with (uploaded weights included)
IMAGES_KEY = "figure_images"  # {source: PIL image} for images that are not on disk


def figure_image(key: str, label: str, image: Image.Image) -> ImageSpec:
    """The figure record of an app image (``ImageChoice.key``/``label``/``image``):
    samples keep their ``sample:`` key, uploads become ``upload:FILE NAME``."""
    source = key if key.startswith("sample:") else f"upload:{label}"
    return image_spec(source, image, label)


def send_to_figures(
    config: FigureConfig,
    *,
    model: LoadedModel | None = None,
    images: Mapping[str, Image.Image] | None = None,
) -> None:
    """Open the Figures page on ``config``.

    Args:
        config: the figure, from ``analysis.figure_config``'s builders.
        model: the model the page ran (needed when it carries uploaded reducer weights;
            otherwise the Figures page loads the configuration's model on the CPU).
        images: images by their ``source`` in ``config.images`` that are not on disk
            (uploads); samples need none.
    """
    st.session_state[CONFIG_KEY] = config
    st.session_state[MODEL_KEY] = model
    st.session_state[IMAGES_KEY] = dict(images or {})
    st.switch_page(FIGURES_PAGE)
