"""``python -m analysis flops`` counts from the model's structure alone: the same numbers
as a loaded model running the engine, while no weight is read (issue 14)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from analysis.cli import main
from analysis.engine import run
from analysis.learned import attach, init_weights
from analysis.models import from_module
from analysis.structure import load_structure

TINY_SCHEDULES = [
    "none",
    "tome:r=8",
    "evit:keep=0.7@1,3",
    "topk:keep=0.5@2",
    "dtem:r=8",  # learned: counted from the schedule, no weights needed
    "patchmerger:tokens=8@2",
    "cropr",
    "ltm:keep=0.7@3",
    "mstm:ms=1@1,3",
]
DEFAULT_SCHEDULES = [
    "tome:r=8",
    "evit:keep=0.7@3,6,9",
    "dtem:r=8",  # learned: the shipped weights are bound when the engine runs
    "patchmerger@3",
    "cropr",
    "mstm:ms=1",
]


def flops(capsys, *argv: str) -> dict:
    code = main(["flops", *argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def engine_numbers(model, schedule: str, image: Image.Image) -> dict:
    """What a run of the loaded model reports: its cost, counted with its weights bound."""
    reduced, full = run(model, [image], schedule), run(model, [image], "none")
    return {
        "gmacs": reduced.gmacs,
        "gmacs_full": full.gmacs,
        "tokens": reduced.tokens,
        "gmacs_per_layer": reduced.cost.gmacs_per_layer(),
    }


def picked(report: dict) -> dict:
    return {key: report[key] for key in ("gmacs", "gmacs_full", "tokens", "gmacs_per_layer")}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.new("RGB", (200, 160), (90, 140, 200))


@pytest.fixture(scope="module")
def tiny_with_learned():
    """``test_vit`` with untrained modules for every learned method, so the engine runs."""
    torch.manual_seed(0)
    model = from_module(timm.create_model("test_vit", pretrained=False), "test_vit", "random")
    return attach(model, init_weights(model, TINY_SCHEDULES).values())


@pytest.mark.parametrize("schedule", TINY_SCHEDULES)
def test_tiny_model_flops_equal_a_loaded_run(capsys, tiny_with_learned, image, schedule):
    report = flops(capsys, "--model", "test_vit", "--weights", "random", "--schedule", schedule)
    assert picked(report) == engine_numbers(tiny_with_learned, schedule, image)


@pytest.mark.parametrize("schedule", DEFAULT_SCHEDULES)
def test_default_model_flops_equal_a_loaded_run(capsys, default_model, image, schedule):
    report = flops(capsys, "--schedule", schedule)
    assert report["model"] == "default" and report["img_size"] == 224
    assert picked(report) == engine_numbers(default_model, schedule, image)


def test_flops_builds_on_the_meta_device(default_model):
    """Every parameter and buffer, the shipped learned modules' too, has a size but no data."""
    for name, weights in (("default", None), ("test_vit", "random")):
        model = load_structure(name, weights)
        tensors = list(model.module.state_dict().values())
        assert tensors and all(t.is_meta for t in tensors)
    learned = load_structure("default").learned
    assert {"dtem", "cropr", "patchmerger", "ltm", "mstm"} <= set(learned)
    for weights in learned.values():
        for module in weights.modules.values():
            assert all(t.is_meta for t in module.state_dict().values())
    real = dict(default_model.learned["dtem"].modules[0].config)
    assert learned["dtem"].modules[0].config == real  # the metric width DTEM's cost reads


def test_flops_calls_no_weight_loader(capsys, monkeypatch, default_model):
    """The loaders the loaded model goes through are never reached (the default model's
    conversion cache, the shipped reducers' files, timm's hub and torch files)."""
    import safetensors.torch

    import analysis.default_model
    import analysis.learned

    expected = picked(flops(capsys, "--schedule", "dtem:r=8"))

    def refuse(*args, **kwargs):
        raise AssertionError("flops read weights")

    for module, name in (
        (safetensors.torch, "load_file"),
        (analysis.default_model, "build_default_model"),
        (analysis.default_model, "convert"),
        (analysis.learned, "load_learned"),
        (torch, "load"),
        (timm.models._builder, "load_pretrained"),
    ):
        monkeypatch.setattr(module, name, refuse)
    assert picked(flops(capsys, "--schedule", "dtem:r=8")) == expected
    report = flops(capsys, "--model", "test_vit", "--schedule", "tome:r=8")  # hub weights
    assert report["tokens"][0] == 101 - 8


def test_default_flops_before_the_first_conversion(capsys, monkeypatch, tmp_path, default_model):
    """With no converted cache yet, the pinned graph's input size gives the same count."""
    from analysis.default_model import CACHE_FILE_NAME, cache_dir

    assert (cache_dir() / CACHE_FILE_NAME).is_file()
    expected = flops(capsys, "--schedule", "tome:r=8")
    monkeypatch.setenv("TOKENSCOPE_CACHE", str(tmp_path))
    assert flops(capsys, "--schedule", "tome:r=8") == expected
    assert not (tmp_path / CACHE_FILE_NAME).exists()  # nothing was converted


def test_checkpoints_are_checked_from_their_shapes(capsys, tmp_path, tiny_with_learned):
    state = {k: v.contiguous() for k, v in tiny_with_learned.module.state_dict().items()}
    safetensors_file, torch_file = tmp_path / "tiny.safetensors", tmp_path / "tiny.pth"
    save_file(state, str(safetensors_file))
    torch.save(state, torch_file)
    random = flops(capsys, "--model", "test_vit", "--weights", "random", "--schedule", "tome:r=8")
    for path in (safetensors_file, torch_file):
        report = flops(
            capsys, "--model", "test_vit", "--weights", str(path), "--schedule", "tome:r=8"
        )
        assert report == random
    wrong = tmp_path / "wrong.safetensors"
    save_file({**state, "head.weight": torch.zeros(3, 3)}, str(wrong))
    code = main(["flops", "--model", "test_vit", "--weights", str(wrong)])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit test_vit" in err and "head.weight" in err
    code = main(["flops", "--model", "test_vit", "--weights", str(tmp_path / "missing.pt")])
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err


def test_learned_sizes_fixed_by_weights_are_counted(tiny_with_learned, image):
    """A DTEM metric narrower than the default width costs less; the structure's modules
    carry that width to the count, as the engine's bound weights do."""
    from analysis.flops import count_macs
    from analysis.reducers.base import LearnedWeights
    from analysis.reducers.dtem import DTEMMetric
    from analysis.schedule import parse_schedule
    from analysis.structure import bind_structures

    dim, layers = tiny_with_learned.facts.dim, range(tiny_with_learned.facts.depth)

    def narrow(device: str) -> LearnedWeights:
        with torch.device(device):
            return LearnedWeights("dtem", {layer: DTEMMetric(dim, 16) for layer in layers})

    loaded = attach(tiny_with_learned, [narrow("cpu")])
    structure = attach(load_structure("test_vit", "random"), [narrow("meta")])
    resolved = parse_schedule("dtem:r=8").resolve(structure.facts)
    bind_structures(resolved, structure)
    counted = count_macs(structure.facts, resolved, structure.module)
    assert counted.macs == run(loaded, [image], "dtem:r=8").cost.macs
    assert counted.macs < run(tiny_with_learned, [image], "dtem:r=8").cost.macs
