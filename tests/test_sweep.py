"""The sweep core: planning, points against a hand computation, the cache, resume, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import parse_schedule, run
from analysis.curves import bootstrap
from analysis.errors import TokenScopeError
from analysis.imagesets import uploaded_set
from analysis.sweep import (
    MethodSweep,
    SweepSpec,
    cost_targets,
    plan_sweep,
    run_sweep,
)
from analysis.sweep_cache import SweepCache, code_version, make_key

ROOT = Path(__file__).resolve().parents[1]


def png(seed: int, size=(48, 40)) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def images():
    return uploaded_set([(f"img{i}.png", png(i)) for i in range(5)])


def test_cost_targets_are_even_and_checked():
    assert cost_targets(40, 100, 4) == (40.0, 60.0, 80.0, 100.0)
    with pytest.raises(TokenScopeError):
        cost_targets(0, 100, 3)


def test_plan_has_full_model_then_each_target(test_vit):
    plan = plan_sweep(test_vit, methods=[MethodSweep("tome:r=2", targets=(60.0, 100.0))])
    assert plan.points[0].schedule == "none" and plan.points[0].percent == pytest.approx(100)
    tome = [p for p in plan.points if p.method == "tome"]
    assert tome, plan
    # The solved strengths land near their targets, cheapest first.
    assert tome[0].percent < tome[-1].percent
    assert abs(tome[0].percent - 60) < 10


def test_plan_values_and_bad_values(test_vit):
    plan = plan_sweep(
        test_vit, methods=[MethodSweep("tome:r=1", values=(1, 2, -1))], include_full=False
    )
    assert [p.schedule for p in plan.points] == ["tome:r=1", "tome:r=2"]
    assert any("-1" in note for note in plan.skipped)


def test_points_equal_a_hand_computation(test_vit, images):
    plan = plan_sweep(test_vit, schedules=["tome:r=3"])
    points = list(run_sweep(test_vit, images, plan, ["feature_cosine"], batch_size=2))
    full, reduced = points
    batch = images.batch(range(len(images)), test_vit.data_config)
    a = run(test_vit, batch, "none").features
    b = run(test_vit, batch, "tome:r=3").features
    expected = torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
    assert reduced.values["feature_cosine"] == pytest.approx(expected, abs=1e-5)
    assert reduced.metrics["feature_cosine"] == bootstrap(reduced.values["feature_cosine"])
    assert full.metrics["feature_cosine"].mean == pytest.approx(1.0, abs=1e-6)
    assert reduced.gmacs < full.gmacs and reduced.num_images == 5
    assert not reduced.cached


def test_cache_hit_then_miss_when_images_change(test_vit, images, tmp_path):
    cache = SweepCache(tmp_path)
    plan = plan_sweep(test_vit, schedules=["tome:r=3", "tome:r=5"])
    first = list(run_sweep(test_vit, images, plan, batch_size=2, cache=cache))
    again = list(run_sweep(test_vit, images, plan, batch_size=2, cache=cache))
    assert not any(p.cached for p in first) and all(p.cached for p in again)
    assert [p.metrics for p in again] == [p.metrics for p in first]
    changed = uploaded_set([(f"img{i}.png", png(i + (i == 4))) for i in range(5)])
    assert changed.fingerprint != images.fingerprint
    third = list(run_sweep(test_vit, changed, plan, batch_size=2, cache=cache))
    assert not any(p.cached for p in third)
    # Four of five images are unchanged, the fifth differs: so do the values.
    assert third[1].values != first[1].values


def test_cache_key_follows_the_code(monkeypatch, tmp_path):
    import shutil

    import analysis.sweep_cache as sweep_cache

    copy = tmp_path / "analysis"
    shutil.copytree(sweep_cache.ANALYSIS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sweep_cache, "ANALYSIS_DIR", copy)
    code_version.cache_clear()
    before = make_key(schedule="tome:r=3")
    (copy / "reducers" / "tome.py").write_text((copy / "reducers" / "tome.py").read_text() + "\n#")
    code_version.cache_clear()
    after = make_key(schedule="tome:r=3")
    (copy / "cli.py").write_text((copy / "cli.py").read_text() + "\n# not a result source")
    code_version.cache_clear()
    unchanged = make_key(schedule="tome:r=3")
    code_version.cache_clear()
    assert before != after
    assert after == unchanged


def test_cancel_keeps_finished_points_and_resume_computes_the_rest(test_vit, images, tmp_path):
    cache = SweepCache(tmp_path)
    plan = plan_sweep(test_vit, schedules=["tome:r=2", "tome:r=4", "tome:r=6"])
    batches = {"n": 0}

    def stop_in_third_point() -> bool:  # 3 batches per point (5 images, batch 2)
        batches["n"] += 1
        return batches["n"] > 3 * 2 + 1

    interrupted = list(
        run_sweep(
            test_vit, images, plan, batch_size=2, cache=cache, should_stop=stop_in_third_point
        )
    )
    # The full model comes from the reference (no batches), then two points finished.
    assert [p.schedule for p in interrupted] == ["none", "tome:r=2", "tome:r=4"]
    resumed = list(run_sweep(test_vit, images, plan, batch_size=2, cache=cache))
    assert [p.cached for p in resumed] == [True, True, True, False]
    fresh = list(run_sweep(test_vit, images, plan, batch_size=2))
    assert [p.metrics for p in resumed] == [p.metrics for p in fresh]


def test_spec_round_trip_and_clear_errors():
    spec = SweepSpec(images="samples", limit=3, methods=(MethodSweep("tome:r=8", targets=(50.0,)),))
    assert SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(TokenScopeError, match="unknown field 'colour'"):
        SweepSpec.from_dict({"colour": "red"})
    with pytest.raises(TokenScopeError, match="batch_size"):
        SweepSpec.from_dict({"batch_size": 0})
    with pytest.raises(TokenScopeError, match="values"):
        SweepSpec.from_dict({"methods": [{"base": "tome", "values": ["x"]}]})
    with pytest.raises(TokenScopeError, match="metric"):
        SweepSpec.from_dict({"metrics": ["accuracy_of_vibes"]})


def _sweep_command(folder: Path, out: Path) -> list[str]:
    return [
        "-m", "analysis", "sweep", "--model", "test_vit", "--weights", "random",
        "--images", str(folder), "--batch", "2", "--method", "tome:r=2",
        "--targets", "50,100", "--schedule", "evit:keep=0.5@1", "--out", str(out), "--quiet",
    ]  # fmt: skip


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i}.png").write_bytes(png(i))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENSCOPE_CACHE": str(tmp_path / "cache-one"),
        "PYTHONPATH": str(ROOT),
    }
    one = tmp_path / "one.json"
    subprocess.run(
        [sys.executable, *_sweep_command(folder, one)], env=env, cwd=ROOT, check=True,
        timeout=300,
    )  # fmt: skip
    two = tmp_path / "two.json"
    env["TOKENSCOPE_CACHE"] = str(tmp_path / "cache-two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    completed = subprocess.run(
        [*torchrun, *_sweep_command(folder, two)], env=env, cwd=ROOT, timeout=300,
        capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    single, double = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(single["points"]) == len(double["points"]) >= 3
    for a, b in zip(single["points"], double["points"], strict=True):
        assert a["schedule"] == b["schedule"]
        assert a["metrics"] == b["metrics"]
        assert a["num_images"] == b["num_images"] == 7


def test_sweep_plans_only_settings_the_learned_weights_accept(default_model):
    """Every learned method, at targets well outside what it was trained for: each planned
    schedule binds to the shipped weights, and outside the trained range it says so."""
    from analysis.engine import attach_weights
    from analysis.sweep import DEFAULT_BASES
    from analysis.trained_settings import extrapolation

    methods = [
        MethodSweep(DEFAULT_BASES[name], targets=(20.0, 35.0, 60.0, 85.0, 100.0))
        for name in ("dtem", "patchmerger", "cropr", "ltm", "mstm")
    ]
    plan = plan_sweep(default_model, methods=methods, include_full=False)
    assert {p.method for p in plan.points} == {"dtem", "patchmerger", "cropr", "ltm", "mstm"}
    for point in plan.points:
        schedule = parse_schedule(point.schedule)
        attach_weights(schedule.resolve(default_model.facts), default_model)  # never raises
        assert point.extrapolated == extrapolation(default_model, schedule)
    merger = [p for p in plan.points if p.method == "patchmerger"]
    assert len(merger) >= 2 and all("tokens=8@" in p.schedule for p in merger)
    cropr = {p.schedule: p.extrapolated for p in plan.points if p.method == "cropr"}
    assert any(reason for reason in cropr.values()) and any(not r for r in cropr.values())


def test_throughput_is_measured_for_every_schedule(test_vit, images):
    from analysis.sweep import measure_throughput

    speeds = measure_throughput(
        test_vit, images, ["none", "tome:r=5"], batch_size=2, rounds=2, warmup=1
    )
    assert set(speeds) == {"none", "tome:r=5"}
    assert all(speed > 0 for speed in speeds.values())
