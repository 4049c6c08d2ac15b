"""Analytic GMACs: the papers' DeiT columns, and agreement with torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from analysis import parse_schedule, run
from analysis.flops import count_macs
from analysis.models import load_model
from tests.conftest import tiny


def gmacs(model, text: str) -> float:
    facts = model.facts
    return count_macs(facts, parse_schedule(text).resolve(facts), model.module).gmacs


@pytest.fixture(scope="module")
def deit_tiny():
    return load_model("deit_tiny_patch16_224", weights="random")


def test_deit_small_full_is_4_6(deit_small):
    assert round(gmacs(deit_small, "none"), 1) == 4.6


@pytest.mark.parametrize(("r", "paper"), [(8, 3.4), (13, 2.7), (16, 2.3)])
def test_tome_paper_deit_small(deit_small, r, paper):
    assert round(gmacs(deit_small, f"tome:r={r}"), 1) == paper


@pytest.mark.parametrize(("r", "paper"), [(8, 0.9), (12, 0.8), (16, 0.6)])
def test_tome_paper_deit_tiny(deit_tiny, r, paper):
    assert round(gmacs(deit_tiny, f"tome:r={r}"), 1) == paper


@pytest.mark.parametrize(
    ("keep", "paper"), [(0.9, 4.0), (0.8, 3.5), (0.7, 3.0), (0.6, 2.6), (0.5, 2.3)]
)
def test_evit_paper_deit_small(deit_small, keep, paper):
    assert round(gmacs(deit_small, f"evit:keep={keep}@3,6,9"), 1) == paper


def counted_macs(model, images, text: str) -> tuple[int, int]:
    """(analytic MACs, FlopCounterMode FLOPs / 2) for one run of the engine."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result = run(model, images, text)
    return result.cost.macs * images.shape[0], counter.get_total_flops() // 2


CLS_SCHEDULES = [
    "none",
    "tome:r=3",
    "evit:keep=0.6@1,2",
    "topk:keep=0.5@0,2",
    "tome:r=2@0;evit:keep=0.7@2",
]
CROSS_CHECKS = (
    [("vit_small_patch16_224", {}, text) for text in CLS_SCHEDULES]
    + [("deit_tiny_distilled_patch16_224", {}, text) for text in CLS_SCHEDULES]
    + [
        ("vit_base_patch16_siglip_224", {"embed_dim": 192, "num_heads": 3, "num_classes": 10}, text)
        for text in ["none", "tome:r=3", "random:keep=0.5@1"]
    ]
)


@pytest.mark.parametrize(("name", "overrides", "text"), CROSS_CHECKS)
def test_analytic_macs_equal_flop_counter(name, overrides, text):
    model = tiny(name, **overrides)
    analytic, counted = counted_macs(model, torch.randn(2, 3, 64, 64), text)
    assert analytic == counted
