"""Schedule text/JSON forms and the errors a user sees."""

from __future__ import annotations

import pytest

from analysis import ScheduleError, parse_schedule
from analysis.reducers.base import ModelFacts

FACTS = ModelFacts(
    name="deit_small",
    depth=12,
    dim=384,
    num_heads=6,
    num_prefix=1,
    has_class_token=True,
    num_patches=196,
    mlp_hidden=1536,
)


def test_constant_every_layer():
    resolved = parse_schedule("tome:r=13").resolve(FACTS)
    assert [plan.inside.values["r"] for plan in resolved.layers] == [13] * 12
    assert resolved.proportional_attention


def test_layers_and_default_fusion():
    resolved = parse_schedule("evit:keep=0.7@3,6,9").resolve(FACTS)
    active = [i for i, plan in enumerate(resolved.layers) if plan.inside is not None]
    assert active == [3, 6, 9]
    assert resolved.layers[3].inside.values == {"keep": 0.7, "fuse": True}
    off = parse_schedule("evit:keep=0.7,fuse=0@3").resolve(FACTS)
    assert off.layers[3].inside.values["fuse"] is False
    assert not off.proportional_attention


def test_mixed_methods_and_ranges():
    resolved = parse_schedule("tome:r=8@0-5;topk:keep=0.5@6").resolve(FACTS)
    names = [plan.inside.name if plan.inside else None for plan in resolved.layers]
    assert names == ["tome"] * 6 + ["topk"] + [None] * 5


def test_tome_ramp_and_list_follow_parse_r():
    ramp = parse_schedule("tome:r=8,inflect=-1").resolve(FACTS)
    values = [plan.inside.values["r"] for plan in ramp.layers]
    assert values[0] == 16 and values[-1] == 0 and values == sorted(values, reverse=True)
    explicit = parse_schedule("tome:r=[16,12,8]").resolve(FACTS)
    assert [plan.inside.values["r"] for plan in explicit.layers] == [16, 12, 8] + [0] * 9


@pytest.mark.parametrize(
    "text",
    [
        "none",
        "tome:r=13",
        "evit:keep=0.7@3,6,9",
        "tome:r=8@0-5;topk:keep=0.5@6",
        "tome:r=[16,12,8]@0-2",
        "random:keep=0.5,seed=3@2,4",
    ],
)
def test_text_and_json_round_trip(text):
    schedule = parse_schedule(text)
    assert parse_schedule(schedule.to_text()) == schedule
    assert parse_schedule(schedule.to_json()) == schedule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tomee:r=3", "unknown method 'tomee'"),
        ("tome:q=3", "unknown parameter 'q'"),
        ("tome:r=-1", "below its range"),
        ("evit:keep=1.5", "above its range"),
        ("tome:r=abc", "must be int"),
        ("tome:r=8@12", "beyond the depth"),
        ("tome:r=8@0-3;evit:keep=0.7@3", "both run at the 'inside' site"),
        ("tome:r=8@5-2", "runs backwards"),
        ("tome:r=8@x", "layers must be"),
        ("tome:r", "expected key=value"),
        ("evit:keep=[0.5,0.6]", "does not take a list"),
        ("{bad json", "malformed"),
    ],
)
def test_wrong_schedules_say_what_is_wrong(text, message):
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(text).resolve(FACTS)


def test_parse_checks_depth_when_given():
    with pytest.raises(ScheduleError, match="beyond the model's depth"):
        parse_schedule("topk:keep=0.5@20", depth=12)


def test_class_token_methods_refused_without_cls():
    facts = ModelFacts(**{**FACTS.__dict__, "num_prefix": 0, "has_class_token": False})
    with pytest.raises(ScheduleError, match="no class token"):
        parse_schedule("evit:keep=0.7@3").resolve(facts)
    parse_schedule("tome:r=4").resolve(facts)  # ToMe needs no CLS
