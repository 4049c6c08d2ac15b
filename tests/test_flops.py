"""Analytic GMACs: the papers' DeiT columns, and agreement with torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from analysis import parse_schedule, run
from analysis.flops import count_macs
from analysis.learned import attach, init_weights
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


def mv_flop(matrix_shape, vector_shape, *args, out_shape=None, **kwargs) -> int:
    """A matrix-vector product (Cropr's q·x), which FlopCounterMode leaves out."""
    return 2 * matrix_shape[0] * matrix_shape[1]


def counted_macs(model, images, text: str) -> tuple[int, int]:
    """(analytic MACs, FlopCounterMode FLOPs / 2) for one run of the engine. SDPA runs on
    its math kernel (the CPU flash kernel counts as 0), and `mv` gets a formula."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.mv: mv_flop})
    with sdpa_kernel(SDPBackend.MATH), counter:
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


# The seed methods, with untrained modules, on three families (CLS; CLS + distillation
# token; CLS + four registers at patch 14). Each schedule exercises what its count claims:
# default placements, Cropr's last-layer fusion, LTM's discarded rows, MSTM's coarse grid,
# and no-op settings, for which the engine computes no signals and the count adds nothing.
SEED_SCHEDULES = [
    "dtem:r=3",
    "dtem:r=[4,2]@0,2",
    "patchmerger:tokens=4",
    "patchmerger:tokens=4@2;tome:r=2@0",
    "cropr:rate=2",
    "cropr:rate=2,llf=1",
    "ltm:keep=0.8",
    "ltm:keep=0.8,discard=0.5@1,2",
    "mstm:keep=0.5",
    "mstm:keep=0.5,ms=1@1,2",
    "mstm:keep=1@1;evit:keep=1@2;topk:keep=1@3",
    "tome:r=[3,0,2]",  # a no-op layer inside a list: no keys asked for there
    "tome:r=2@0;cropr:rate=2@1;mstm:keep=0.5@2",
]
SEED_FAMILIES = {
    "plain CLS": ("vit_small_patch16_224", {}, 64),
    "DeiT distilled": ("deit_tiny_distilled_patch16_224", {}, 64),
    "DINOv2 registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 56}, 56),
}


@pytest.mark.parametrize("family", SEED_FAMILIES, ids=list(SEED_FAMILIES))
@pytest.mark.parametrize("text", SEED_SCHEDULES)
def test_seed_methods_analytic_macs_equal_flop_counter(text, family):
    """What the engine runs (matmuls, convolutions, SDPA) is exactly what `count_macs`
    counts: LTM merges with a scatter, MSTM computes only the non-crucial similarity rows,
    Cropr scores only patch tokens, and a reducer that changes nothing asks for no CLS row."""
    name, overrides, size = SEED_FAMILIES[family]
    model = tiny(name, **overrides)
    model = attach(model, init_weights(model, [text]).values())
    analytic, counted = counted_macs(model, torch.randn(2, 3, size, size), text)
    assert analytic == counted


def test_cls_attention_row_is_the_documented_offset_from_evits_accounting(deit_small):
    """EViT's code reads the CLS row off the attention map its block builds; the engine's
    SDPA gives no weights, so the row is recomputed and counted: exactly T·D per reducing
    layer (T tokens entering it) above the paper's accounting, 0.17 MMACs for DeiT-S at
    keep 0.7. The paper's column is reproduced to its printed precision all the same."""
    facts = deit_small.facts
    report = count_macs(facts, parse_schedule("evit:keep=0.7@3,6,9").resolve(facts))
    rows = {i: report.layers[i].tokens_in * facts.dim for i in (3, 6, 9)}
    assert [layer.macs_reducers for layer in report.layers] == [rows.get(i, 0) for i in range(12)]
    assert sum(rows.values()) == (197 + 140 + 100) * 384 == 167_808
    assert round((report.macs - sum(rows.values())) / 1e9, 1) == 3.0  # the paper's 3.0 G


def test_cropr_scores_only_patch_tokens(deit_small):
    """The official scorer also scores CLS (then sets it to +inf): P·D per module more
    than runs here. Ours counts (T − P)·D, what the engine computes."""
    facts = deit_small.facts
    report = count_macs(facts, parse_schedule("cropr:rate=8@0").resolve(facts))
    assert report.layers[0].macs_reducers == 196 * 384
