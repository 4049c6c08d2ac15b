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


def placed(text: str, facts: ModelFacts = FACTS) -> list[int]:
    """The layers at which a one-method schedule runs."""
    return [layer for layer, _ in parse_schedule(text).resolve(facts).reducers()]


SHALLOW = ModelFacts("tiny", 4, 192, 3, 1, True, 16, 768)


@pytest.mark.parametrize(
    ("text", "deep", "shallow"),
    [
        # the paper placements, followed by the depth (12 layers; 4 layers)
        ("patchmerger:tokens=8", [5], [1]),  # once, after block L/2
        ("cropr:rate=8", list(range(11)), [0, 1, 2]),  # every block but the last
        ("cropr:rate=8,llf=1", list(range(10)), [0, 1]),  # but the last two with LLF
        ("mstm:keep=0.7", [3, 6, 9], [1, 2, 3]),  # EViT's stages
        # every layer: ToMe's placement, and the old meaning kept for these methods
        ("tome:r=8", list(range(12)), list(range(4))),
        ("evit:keep=0.7", list(range(12)), list(range(4))),
        ("dtem:r=8", list(range(12)), list(range(4))),
        ("ltm", list(range(12)), list(range(4))),
    ],
)
def test_a_part_without_layers_runs_at_the_default_placement(text, deep, shallow):
    assert placed(text) == deep
    assert placed(text, SHALLOW) == shallow
    assert parse_schedule(text).parts[0].layers_for(12) == tuple(deep)
    assert parse_schedule(text).to_text() == text  # the text keeps saying "default"
    explicit = f"{text}@{','.join(str(layer) for layer in deep)}"
    assert placed(explicit) == deep  # an explicit `@` is never moved


def test_cropr_defaults_mark_the_first_module():
    resolved = parse_schedule("cropr").resolve(FACTS)
    firsts = [reducer.values["first"] for _, reducer in resolved.reducers()]
    assert firsts == [True] + [False] * 10


def test_huge_ranges_are_refused_before_they_are_expanded():
    import time

    start = time.perf_counter()
    with pytest.raises(ScheduleError, match="layer 99999999 is beyond any model"):
        parse_schedule("tome@0-99999999")
    with pytest.raises(ScheduleError, match=r"beyond the model's depth \(12 layers"):
        parse_schedule("tome@0-99999999", depth=12)
    with pytest.raises(ScheduleError, match="beyond any model"):
        parse_schedule('{"parts": [{"method": "tome", "layers": "0-99999999"}]}')
    assert time.perf_counter() - start < 0.5


def test_long_schedules_are_refused_and_not_echoed():
    text = "tome:r=8@0;" * 100_000
    with pytest.raises(ScheduleError, match="1,100,000 characters long; the limit is 10,000") as e:
        parse_schedule(text)
    assert len(str(e.value)) < 300
    with pytest.raises(ScheduleError) as e:
        parse_schedule("x" * 9_000)
    assert len(str(e.value)) < 300


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"parts": [{"method": "tome", "params": {"r": [[8]]}}]}, "flat list of numbers"),
        ({"parts": [{"method": "tome", "params": [8]}]}, "'params' must be an object"),
        ({"parts": [{"method": "tome", "layers": 5}]}, "'layers' must be a list"),
        ({"parts": [{"method": "tome", "layers": [True]}]}, "'layers' must be a list"),
        ({"parts": [{"method": "tome", "layers": [1, 1]}]}, "listed twice"),
        ({"parts": [{"method": 8}]}, "each part is an object with a 'method'"),
        ({"parts": [{"method": "tome", "r": 8}]}, "unknown keys 'r'"),
        ({"parts": [{"method": "evit", "params": {"fuse": 2}}]}, "'fuse' must be bool"),
        ({"parts": [{"method": "tome", "params": {"r": 10**400}}]}, "'r' must be int"),
        ({"parts": [], "proportional_attention": "no way"}, "must be true or false"),
        ({"parts": [], "proportional_attention": 2}, "must be true or false"),
        ("[" * 5000, "nested too deeply"),
    ],
)
def test_json_of_the_wrong_shape_is_refused_at_parse_time(value, message):
    import json

    text = value if isinstance(value, str) else json.dumps(value)
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(text).resolve(FACTS)


@pytest.mark.parametrize(
    ("given", "expected"), [("no", False), ("off", False), (0, False), (True, True), ("1", True)]
)
def test_proportional_attention_is_read_strictly_and_kept_in_text(given, expected):
    import json

    schedule = parse_schedule(
        json.dumps({"parts": [{"method": "tome"}], "proportional_attention": given})
    )
    assert schedule.proportional_attention is expected
    assert schedule.resolve(FACTS).proportional_attention is expected
    text = schedule.to_text()
    assert text == f"tome;proportional_attention={int(expected)}"
    assert parse_schedule(text) == schedule
    assert parse_schedule(schedule.to_json()) == schedule


def test_text_keeps_every_digit_of_a_value():
    schedule = parse_schedule("evit:keep=0.8444218515250481@3;tome:r=8")
    assert schedule.to_text() == "evit:keep=0.8444218515250481@3;tome:r=8"
    assert parse_schedule(schedule.to_text()) == schedule
    assert parse_schedule("evit:keep=0.7@3").to_text() == "evit:keep=0.7@3"
