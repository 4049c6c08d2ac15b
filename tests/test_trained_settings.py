"""Learned methods only where their weights are valid (issue 10): the solver and the sweep's
helpers never hand a learned method a setting its loaded weights refuse, and a setting
outside the trained strength range is marked as extrapolated.

All on the default model with its shipped weights (``assets/*.safetensors``)."""

from __future__ import annotations

import json

import pytest

from analysis.engine import attach_weights
from analysis.flops import count_macs
from analysis.learned import attach
from analysis.reducers.base import LearnedWeights
from analysis.schedule import parse_schedule
from analysis.solver import format_table, match_cost
from analysis.trained_settings import (
    extrapolation,
    layers_text,
    supported_schedules,
    supported_values,
    trained_settings,
)

TARGETS = (35.0, 50.0, 65.0, 80.0, 95.0)
# One base schedule per learned method, as the sweep and the Compare page would give them.
LEARNED_BASES = {
    "patchmerger": "patchmerger:tokens=8@5",
    "cropr": "cropr:rate=16@0-10",
    "dtem": "dtem:r=12",
    "ltm": "ltm:keep=0.9",
    "mstm": "mstm:keep=0.5,ms=1@3,6,9",
}


def binds(model, schedule) -> None:
    """The engine's own check: raises ScheduleError when the weights refuse the schedule."""
    attach_weights(parse_schedule(schedule).resolve(model.facts), model)


def gmacs(model, schedule) -> float:
    return count_macs(
        model.facts, parse_schedule(schedule).resolve(model.facts), model.module
    ).gmacs


def without_schedule(model, method: str):
    """The model with ``method``'s shipped weights, as a file that records no schedule."""
    shipped = model.learned[method]
    metadata = {k: v for k, v in shipped.metadata.items() if k != "schedule"}
    return attach(model, [LearnedWeights(method, shipped.modules, metadata)])


def test_settings_read_from_the_shipped_weights(default_model):
    cropr = trained_settings(default_model, "cropr")
    assert cropr.values == (8, 16, 24) and cropr.range == (8, 24) and cropr.recorded
    assert cropr.layers == tuple(range(11)) and not cropr.fixed
    assert cropr.describe() == "Token Cropr weights trained at rate 8–24 (8, 16, 24) on layers 0–10"

    merger = trained_settings(default_model, "patchmerger")
    assert merger.fixed == {"tokens": 8} and merger.strength_fixed and not merger.checked
    assert merger.layers == (3, 5, 6, 8, 9, 10)
    assert "fix tokens=8" in merger.describe() and "3, 5–6, 8–10" in merger.describe()

    assert trained_settings(default_model, "ltm").range == (0.872, 0.968)
    assert trained_settings(default_model, "mstm").range == (0.35, 0.7)
    assert trained_settings(default_model, "dtem").range == (10, 21)  # r=21, 16, 10
    # Nothing constrains a training-free method, nor MSTM without its learned fusion.
    assert trained_settings(default_model, "tome") is None
    assert trained_settings(default_model, "mstm", "mstm:keep=0.5@3,6,9") is None
    assert supported_values(default_model, "tome", 5) is None
    assert layers_text([0, 1, 2, 5, 7, 8]) == "0–2, 5, 7–8"


@pytest.mark.parametrize("percent", TARGETS)
def test_matched_patchmerger_moves_its_layer_and_keeps_its_tokens(default_model, percent):
    """The issue's bug: matched cost asked PatchMerger for tokens=125, which its weights
    refuse. Now the trained token count stays and the layer is solved instead."""
    covered = trained_settings(default_model, "patchmerger").layers
    for base in ("patchmerger:tokens=8@5", "patchmerger:tokens=125@4"):
        (m,) = match_cost(default_model, [base], target_percent=percent)
        binds(default_model, m.schedule)  # must not raise
        (part,) = m.schedule.parts
        assert part.params["tokens"] == 8 and part.layers == (m.value,)
        assert m.param == "layer" and m.value in covered and not m.extrapolated
        assert m.gmacs == pytest.approx(gmacs(default_model, m.schedule), abs=1e-12)
        # the closest cost over every covered layer wins
        errors = [abs(gmacs(default_model, f"patchmerger@{n}") - m.target_gmacs) for n in covered]
        assert abs(m.error) == pytest.approx(min(errors), abs=1e-12)
        if not m.within_tolerance:  # said plainly: the trained tokens and the closest layer
            assert "tokens=8" in m.message and f"layer {m.value}" in m.message
    assert m.to_dict()["extrapolated"] == ""


def test_patchmerger_out_of_reach_says_so(default_model):
    low, high = (match_cost(default_model, ["patchmerger@5"], target_percent=p)[0] for p in (5, 99))
    assert (low.value, high.value) == (3, 10)
    assert "cannot reach" in low.message and "below" in low.message and "layer 3" in low.message
    assert "cannot reach" in high.message and "above" in high.message


def test_matched_cropr_is_marked_outside_its_trained_rates(default_model):
    (far,) = match_cost(default_model, ["cropr:rate=16@0-10"], target_percent=35)
    (near,) = match_cost(default_model, ["cropr:rate=16@0-10"], target_percent=65)
    assert far.value > 24 and far.within_tolerance
    assert f"rate={far.value}" in far.extrapolated and "8–24" in far.extrapolated
    assert far.to_dict()["extrapolated"] == far.extrapolated
    assert "EXTRAPOLATED" in format_table([far, near])
    assert 8 <= near.value <= 24 and near.extrapolated == ""
    for m in (far, near):
        binds(default_model, m.schedule)  # extrapolated is marked, never refused
    # Just past either end of the trained range is outside; the ends themselves are not.
    assert extrapolation(default_model, "cropr:rate=25@0-10")
    assert extrapolation(default_model, "cropr:rate=7@0-10")
    assert not extrapolation(default_model, "cropr:rate=24@0-10")
    assert not extrapolation(default_model, "cropr:rate=8@0-10")
    assert not extrapolation(default_model, "cropr:rate=13@0-10")  # between trained values


def test_extrapolation_checks_every_weighted_layer(default_model):
    ramp = extrapolation(default_model, "dtem:r=8,inflect=-1")  # r runs 16 down to 0
    assert "DTEM r=" in ramp and "at layers" in ramp and "10–21" in ramp
    assert extrapolation(default_model, "mstm:keep=0.2,ms=1@3,6,9").startswith("MSTM keep=0.2")
    assert extrapolation(default_model, "mstm:keep=0.2@3,6,9") == ""  # no learned part
    both = extrapolation(default_model, "ltm:keep=0.5@0-4;tome:r=4@5")
    assert both == "LTM keep=0.5 is outside the trained 0.872–0.968"


@pytest.mark.parametrize("method", sorted(LEARNED_BASES))
def test_supported_schedules_stay_inside_and_bind(default_model, method):
    settings = trained_settings(default_model, method)
    variants = supported_schedules(default_model, LEARNED_BASES[method], 5)
    assert len(variants) >= min(3, len(settings.layers))
    for variant in variants:
        assert extrapolation(default_model, variant) == ""
        binds(default_model, variant)
    if method == "patchmerger":
        assert [v.to_text() for v in variants] == [
            "patchmerger:tokens=8@3",
            "patchmerger:tokens=8@5",
            "patchmerger:tokens=8@8",
            "patchmerger:tokens=8@9",
            "patchmerger:tokens=8@10",
        ]
        assert supported_values(default_model, method, 5) == [8]
    else:
        values = supported_values(default_model, method, 5)
        assert values[0] == settings.low and values[-1] == settings.high
        assert all(settings.low <= v <= settings.high for v in values)
    if method == "cropr":
        assert supported_values(default_model, method, 5) == [8, 12, 16, 20, 24]


def test_weights_without_a_recorded_schedule(default_model):
    bare = without_schedule(default_model, "cropr")
    settings = trained_settings(bare, "cropr")
    assert not settings.recorded and settings.values == () and settings.range is None
    assert "not recorded" in settings.describe()
    assert extrapolation(bare, "cropr:rate=69@0-10") == ""  # unknown, so not flagged
    assert supported_values(bare, "cropr", 5) is None
    assert supported_schedules(bare, "cropr@0-10", 5) is None
    assert match_cost(bare, ["cropr@0-10"], target_percent=35)[0].extrapolated == ""
    # PatchMerger's token count lives in its modules, so it stays fixed all the same.
    merger = without_schedule(default_model, "patchmerger")
    assert not trained_settings(merger, "patchmerger").recorded
    (m,) = match_cost(merger, ["patchmerger@5"], target_percent=50)
    assert m.param == "layer" and m.schedule.parts[0].params["tokens"] == 8
    binds(merger, m.schedule)


def test_facts_only_solving_is_unchanged(default_model):
    """Without the loaded model there are no weights to respect: the strength is solved
    over its declared range, as before (cost studies, other backbones)."""
    (m,) = match_cost(
        default_model.facts, ["patchmerger@5"], target_percent=50, module=default_model.module
    )
    assert m.param == "tokens" and m.extrapolated == ""
    assert json.loads(json.dumps(m.to_dict()))["extrapolated"] == ""
