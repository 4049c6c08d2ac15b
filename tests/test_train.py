"""Training learned reducers, saving and loading their weights, official checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import CheckpointMismatchError, TokenScopeError, run
from analysis.learned import attach, load_learned, provenance, read_metadata
from analysis.models import with_learned
from analysis.train import TrainConfig, train, train_main
from tests.conftest import tiny

SCHEDULES = {
    "dtem": "dtem:r=3",
    "patchmerger": "patchmerger:tokens=4@1",
    "cropr": "cropr:rate=2@0-1",
    "ltm": "ltm:keep=0.7",
    "mstm": "mstm:keep=0.5,ms=1@1,2",
}


def write_images(folder: Path, count: int, classes: int = 0) -> Path:
    """Small random-texture images; with ``classes``, one subfolder per class."""
    rng = np.random.default_rng(0)
    for index in range(count):
        target = folder / str(index % classes) if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=(10, 10, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((80, 80), Image.Resampling.BICUBIC)
        image.save(target / f"img{index}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"), 6)


def backbone():
    return tiny("vit_small_patch16_224", num_classes=0)


def config(schedule: str | tuple[str, ...], out: Path, data: Path, **extra) -> TrainConfig:
    settings = {
        "steps": 16,
        "batch_size": 4,
        "lr": 1e-3,
        "augment": False,
        "progress": False,
        "checkpoint_every": 0,
        "val": 0,  # validation and mixing have their own tests below
        "mix": 0.0,
    }
    settings.update(extra)
    schedules = (schedule,) if isinstance(schedule, str) else schedule
    return TrainConfig(schedules=schedules, out=out, data=str(data), **settings)


@pytest.mark.parametrize("method", SCHEDULES)
def test_short_training_lowers_the_loss_and_saves_usable_weights(method, images, tmp_path):
    model = backbone()
    schedule = SCHEDULES[method]
    out = tmp_path / f"{method}.safetensors"
    result = train(model, config(schedule, out, images))
    assert result.method == method
    assert len(result.losses) == 16
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4])
    metadata = read_metadata(out)
    assert metadata["method"] == method
    assert metadata["backbone"] == model.name
    assert metadata["schedule"] == schedule
    assert metadata["steps"] == "16"
    assert float(metadata["loss"]) == pytest.approx(result.final_loss, rel=1e-4)
    assert "6 images" in metadata["data"]
    loaded = with_learned(model, out)
    assert method in loaded.learned and not model.learned  # a new LoadedModel
    result = run(loaded, torch.randn(1, 3, 64, 64), schedule)
    assert torch.isfinite(result.features).all()


# LTM's score head starts at zero: 30 steps need a larger step to move its hard choices.
@pytest.mark.parametrize(
    ("schedule", "lr"), [("patchmerger:tokens=2@0", 1e-3), ("ltm:keep=0.5", 3e-3)]
)
def test_trained_weights_beat_untrained_ones(schedule, lr, images, tmp_path):
    """Fidelity to the full model on the training images rises with training."""
    from analysis.images import load_image, to_tensor
    from analysis.learned import attach, init_weights

    model = backbone()
    out = tmp_path / "weights.safetensors"
    train(model, config(schedule, out, images, steps=30, lr=lr))
    paths = sorted(images.glob("*.png"))
    batch = to_tensor([load_image(p) for p in paths], model.data_config)[0]
    full = run(model, batch).features
    before = attach(model, init_weights(model, [schedule], seed=0).values())
    after = with_learned(model, out)

    def fidelity(m) -> float:
        reduced = run(m, batch, schedule).features
        return torch.nn.functional.cosine_similarity(reduced, full).mean().item()

    assert fidelity(after) > fidelity(before)


def test_cropr_training_leaves_out_the_auxiliary_head(images, tmp_path):
    out = tmp_path / "cropr.safetensors"
    train(backbone(), config(SCHEDULES["cropr"], out, images, steps=4))
    from safetensors.torch import load_file

    keys = set(load_file(str(out)))
    assert keys == {"layers.0.query", "layers.1.query"}


def test_a_file_for_another_backbone_is_refused(images, tmp_path):
    out = tmp_path / "dtem.safetensors"
    train(backbone(), config("dtem:r=3", out, images, steps=2))
    other = tiny("deit_tiny_patch16_224", num_classes=0)
    with pytest.raises(CheckpointMismatchError, match="trained on 'vit_small_patch16_224'"):
        with_learned(other, out)
    torch.manual_seed(1)
    same_arch = tiny("vit_small_patch16_224", num_classes=0)
    with torch.no_grad():
        same_arch.module.patch_embed.proj.weight.add_(0.1)
    with pytest.raises(CheckpointMismatchError, match="same architecture with other weights"):
        with_learned(same_arch, out)


def test_resume_continues_exactly(images, tmp_path):
    two = ("ltm:keep=0.7", "ltm:keep=0.5")  # the per-schedule loss balance is resumed too
    straight = train(backbone(), config(two, tmp_path / "a.safetensors", images, steps=8))
    out = tmp_path / "b.safetensors"
    stopped = train(backbone(), config(two, out, images, steps=8, stop_after=5))
    assert stopped.steps == 5 and read_metadata(out)["planned_steps"] == "8"
    assert out.with_name(out.name + ".resume.pt").exists()
    resumed = train(backbone(), config(two, out, images, steps=8, resume=True))
    assert resumed.losses == straight.losses
    other = config("dtem:r=2", out, images, steps=8, resume=True)
    with pytest.raises(TokenScopeError, match="written for the schedules"):
        train(backbone(), other)


def test_labels_use_cross_entropy_and_ltm_information_bottleneck(tmp_path):
    folder = write_images(tmp_path / "labelled", 8, classes=2)
    model = tiny("vit_small_patch16_224", num_classes=2)
    for method in ("ltm", "cropr"):
        out = tmp_path / f"{method}.safetensors"
        cfg = config(SCHEDULES[method], out, folder, steps=6, ib_clusters=4)
        result = train(model, cfg)
        assert all(np.isfinite(result.losses))
        assert read_metadata(out)["labels"] == "yes"
        assert "2 classes" in read_metadata(out)["data"]


def test_unfreeze_saves_the_tuned_backbone(images, tmp_path):
    model = backbone()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    out = tmp_path / "pm.safetensors"
    result = train(model, config(SCHEDULES["patchmerger"], out, images, steps=3, unfreeze=True))
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    assert result.backbone_path is not None and result.backbone_path.exists()
    assert read_metadata(out)["backbone_frozen"] == "no"


def test_command_line(images, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    assert "--schedule" in capsys.readouterr().out
    status = train_main(
        [
            "--schedule",
            "tome:r=2",
            "--model",
            "vit_tiny_patch16_224",
            "--weights",
            "random",
            "--data",
            str(images),
            "--quiet",
        ]
    )
    assert status == 2
    assert "exactly one learned method" in capsys.readouterr().err
    out = tmp_path / "cli.safetensors"
    argv = [
        "--schedule",
        "patchmerger:tokens=8@5",
        "--model",
        "vit_tiny_patch16_224",
        "--weights",
        "random",
        "--data",
        str(images),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--no-augment",
        "--quiet",
        "--out",
        str(out),
    ]
    assert train_main(argv) == 0
    metadata = read_metadata(out)
    assert metadata["command"].startswith("python -m analysis train --schedule")
    assert json.loads(metadata["layers"]) == [5]


def test_official_dtem_checkpoint_is_converted(tmp_path):
    model = tiny("deit_small_patch16_224")
    torch.manual_seed(3)
    state = {}
    for i, block in enumerate(model.module.blocks):
        qkv = block.attn.qkv
        metric_w, metric_b = torch.randn(64, qkv.in_features), torch.randn(64)
        prefix = f"module.blocks.{i}.attn.qkv."
        state[prefix + "qkv_layer.weight"] = qkv.weight.detach().clone()
        state[prefix + "qkv_layer.bias"] = qkv.bias.detach().clone()
        state[prefix + "metric_layer.weight"] = metric_w
        state[prefix + "metric_layer.bias"] = metric_b
        state[prefix + "weight"] = torch.cat([qkv.weight.detach(), metric_w])
        state[prefix + "bias"] = torch.cat([qkv.bias.detach(), metric_b])
    path = tmp_path / "dtem_deit_small.pth.tar"
    torch.save({"epoch": 30, "best_acc": 79.8, "state_dict": state}, path)
    weights = load_learned(path, model)
    assert sorted(weights.modules) == [0, 1, 2, 3]
    assert torch.equal(
        weights.modules[2].proj.weight, state["module.blocks.2.attn.qkv.metric_layer.weight"]
    )
    result = run(with_learned(model, path), torch.randn(1, 3, 64, 64), "dtem:r=2")
    assert result.tokens == [15, 13, 11, 9]
    torch.manual_seed(7)
    other = tiny("deit_small_patch16_224")
    with torch.no_grad():
        other.module.blocks[0].attn.qkv.weight.add_(1.0)
    with pytest.raises(CheckpointMismatchError, match="trained on another backbone"):
        load_learned(path, other)


def test_worker_processes_prepare_the_same_batches(images, tmp_path):
    inline = train(backbone(), config("dtem:r=2", tmp_path / "a.safetensors", images, steps=3))
    workers = train(
        backbone(), config("dtem:r=2", tmp_path / "b.safetensors", images, steps=3, workers=2)
    )
    assert inline.losses == workers.losses


def test_held_out_images_are_spread_evenly_and_never_trained_on():
    from analysis.holdout import split_images
    from analysis.train import ImageSet

    images = ImageSet(loaders=[(lambda i=i: i) for i in range(21)], labels=None, description="x")
    kept, held = split_images(images, -1)  # auto: a quarter
    assert held is not None and len(held) == 5 and len(kept) == 16
    held_ids = [load() for load in held.loaders]
    assert held_ids == [0, 5, 10, 15, 20]
    assert not set(held_ids) & {load() for load in kept.loaders}
    assert split_images(ImageSet(images.loaders[:7], None, "few"), -1)[1] is None
    with pytest.raises(TokenScopeError, match="hold out all"):
        split_images(images, 21)


def test_the_kept_step_is_worse_nowhere_then_best_on_average():
    from analysis.holdout import step_rank

    untrained = [0.10, 0.20, 0.40]
    start = step_rank(untrained, untrained)
    trades = step_rank([0.05, 0.10, 0.41], untrained)  # halves two losses, one rises 2.5 %
    assert start < trades
    # Cropr's validation ratios at steps 64 and 144 of a 200-step run: the later step is
    # 8 % worse at the strongest rate, and far better at the other two
    early = step_rank([0.031, 0.112, 0.288], untrained)
    late = step_rank([0.0135, 0.073, 0.312], untrained)
    assert late < early < start
    assert step_rank([0.09, 0.21, 0.50], untrained) < step_rank([0.09, 0.21, 0.60], untrained)


def test_mixing_is_deterministic_and_needs_distillation(images, tmp_path):
    from analysis.train import load_images, make_transform, sample_batch

    model = backbone()
    data = load_images(str(images))
    transform = make_transform(model, augment=False)
    plain = sample_batch(data, transform, 3, 4, 0)[0]
    mixed = [sample_batch(data, transform, step, 4, 0, mix=1.0)[0] for step in (3, 3)]
    assert torch.equal(mixed[0], mixed[1])
    assert not torch.equal(plain, mixed[0])
    low, high = torch.minimum(plain, plain.roll(1, 0)), torch.maximum(plain, plain.roll(1, 0))
    assert (mixed[0] >= low - 1e-6).all() and (mixed[0] <= high + 1e-6).all()
    labelled = write_images(tmp_path / "labelled", 4, classes=2)
    with pytest.raises(TokenScopeError, match="--mix needs distillation"):
        train(backbone(), config("ltm:keep=0.7", tmp_path / "m.safetensors", labelled, mix=0.5))


def test_validation_keeps_the_best_step_and_reports_it(tmp_path):
    """The saved file is the validated step with the lowest loss; its loss is recomputed here
    from the held-out images with the inference path, independently of the trainer."""
    from analysis.images import load_image, to_tensor

    folder = write_images(tmp_path / "ten", 10)
    schedules = ("ltm:keep=0.7", "ltm:keep=0.5")
    settings = {"steps": 12, "val": 2, "val_views": 1, "val_every": 3, "lr": 3e-3}
    out = tmp_path / "v.safetensors"
    result = train(backbone(), config(schedules, out, folder, **settings))
    metadata = read_metadata(out)
    assert result.kept_step == int(metadata["kept_step"])
    assert metadata["val_images"] == "2" and metadata["val_views"] == "1"
    kept_step = int(metadata["kept_step"])
    assert kept_step in {0, 3, 6, 9, 12}
    untrained = [float(v) for v in metadata["val_loss_untrained"].split(" | ")]
    kept = [float(v) for v in metadata["val_loss_kept"].split(" | ")]
    assert max(np.divide(kept, untrained)) <= 1.0  # no strength worse than at step 0

    model = backbone()
    paths = sorted(folder.glob("*.png"))
    held = [paths[0], paths[9]]  # evenly spread: the first and the last
    batch = to_tensor([load_image(p) for p in held], model.data_config)[0]
    full = run(model, batch).features
    loaded = with_learned(model, out)
    for schedule, expected in zip(schedules, kept, strict=True):
        reduced = run(loaded, batch, schedule).features
        loss = 1 - torch.nn.functional.cosine_similarity(reduced, full).mean().item()
        assert loss == pytest.approx(expected, rel=1e-3, abs=1e-6)

    resumed_out = tmp_path / "r.safetensors"
    train(backbone(), config(schedules, resumed_out, folder, stop_after=7, **settings))
    train(backbone(), config(schedules, resumed_out, folder, resume=True, **settings))
    again = read_metadata(resumed_out)
    for key in ("kept_step", "val_loss_untrained", "val_loss_kept", "val_loss_last"):
        assert again[key] == metadata[key]


def test_dtem_can_start_from_the_keys_and_then_equals_tome(images, tmp_path):
    model = backbone()
    out = tmp_path / "keys.safetensors"
    train(model, config("dtem:r=4", out, images, steps=1, lr=0.0, weight_decay=0.0, init="keys"))
    assert read_metadata(out)["init"] == "keys"
    weights = load_learned(out, model)
    assert "started from the attention keys" in provenance(weights)
    assert provenance(weights).startswith("keys.safetensors; trained under dtem:r=4; 1 step;")
    started = attach(model, [weights])
    batch = torch.randn(2, 3, 64, 64)
    dtem = run(started, batch, "dtem:r=4")
    tome = run(model, batch, "tome:r=4")
    pairs = zip(dtem.trace.layers, tome.trace.layers, strict=True)
    assert all(torch.equal(ours.owner, theirs.owner) for ours, theirs in pairs)
    assert torch.allclose(dtem.features, tome.features, atol=1e-5)
    with pytest.raises(TokenScopeError, match="ltm has no such layers"):
        train(model, config("ltm:keep=0.5", tmp_path / "l.safetensors", images, init="keys"))


# --------------------------------------------------------------------------- the named steps


def test_the_data_step_refuses_before_any_model_work(tmp_path):
    from analysis.train_batches import training_images

    labelled = write_images(tmp_path / "three", 6, classes=3)
    two_classes = tiny("vit_small_patch16_224", num_classes=2)
    with pytest.raises(TokenScopeError, match="class index 2, but"):
        training_images(two_classes, config("ltm:keep=0.7", tmp_path / "x", labelled))
    with pytest.raises(TokenScopeError, match="--mix needs distillation"):
        training_images(backbone(), config("ltm:keep=0.7", tmp_path / "x", labelled, mix=0.5))
    images, held = training_images(backbone(), config("ltm:keep=0.7", tmp_path / "x", labelled))
    assert held is None and len(images) == 6 and images.num_classes == 3


def test_step_batches_are_the_batches_of_their_steps(images, tmp_path):
    from analysis.train_batches import sample_batch, step_batches
    from analysis.train_data import load_images, make_transform

    model = backbone()
    data = load_images(str(images))
    transform = make_transform(model, augment=True)
    cfg = config("dtem:r=2", tmp_path / "x", images, steps=5, mix=1.0)
    made = list(step_batches(data, transform, cfg, start=2))
    assert len(made) == 3
    for step, (batch, labels) in zip(range(2, 5), made, strict=True):
        assert labels is None
        assert torch.equal(batch, sample_batch(data, transform, step, 4, 0, mix=1.0)[0])


def test_the_learning_rate_warms_up_then_falls_to_zero():
    from analysis.train_setup import warmup_cosine

    factor = warmup_cosine(steps=100, warmup_fraction=0.1)
    assert [factor(step) for step in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0, abs=1e-12)


def test_the_checkpoint_step_round_trips_and_writes_atomically(images, tmp_path):
    """A resume file written by one run restores another to the same modules and losses."""
    from analysis.train_checkpoint import (
        Progress,
        checkpoint_due,
        restore,
        resume_path,
        save_resume,
    )
    from analysis.train_data import load_images, make_transform
    from analysis.train_setup import prepare_run

    model = backbone()
    data = load_images(str(images))
    transform = make_transform(model, augment=False)
    cfg = config("dtem:r=2", tmp_path / "w.safetensors", images, checkpoint_every=5, steps=12)
    due = [done for done in range(1, 13) if checkpoint_due(cfg, done)]
    assert due == [5, 10, 12]  # every 5 steps, and after the last
    first = prepare_run(model, cfg, "dtem", data, transform, None)
    for module in first.opt.trained.modules.values():
        torch.nn.init.normal_(module.proj.weight)
    path = resume_path(cfg.out)
    save_resume(path, first, Progress(start=0, losses=[0.5, 0.25], balance=[0.3]), step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no .tmp left behind
    second = prepare_run(backbone(), cfg, "dtem", data, transform, None)
    progress = restore(path, second)
    assert (progress.start, progress.losses, progress.balance) == (2, [0.5, 0.25], [0.3])
    for layer, module in first.opt.trained.modules.items():
        restored = second.opt.trained.modules[layer]
        assert torch.equal(module.proj.weight, restored.proj.weight)
    other = prepare_run(model, replace(cfg, schedules=("dtem:r=3",)), "dtem", data, transform, None)
    with pytest.raises(TokenScopeError, match="written for the schedules"):
        restore(path, other)


def test_validation_keeps_the_best_step_across_a_resume():
    from analysis.holdout import BestStep, Validation

    def kept_step() -> BestStep:
        views = torch.zeros(6, 3, 2, 2)  # 2 images, 3 views each
        validation = Validation(views=views, labels=None, teacher=views, num_images=2)
        return BestStep(validation, every=3)

    modules = {0: torch.nn.Linear(2, 2)}
    tracker = kept_step()
    assert [tracker.due(done, 10) for done in (2, 3, 9, 10)] == [False, True, True, True]
    assert "best step 0" in tracker.record(0, [0.4, 0.2], modules)
    with torch.no_grad():
        modules[0].weight.fill_(1.0)
    assert "best step 3" in tracker.record(3, [0.3, 0.1], modules)
    with torch.no_grad():
        modules[0].weight.fill_(2.0)
    assert "best step 3" in tracker.record(6, [0.2, 0.3], modules)  # worse at one: not kept
    resumed = kept_step()
    resumed.resume(tracker.state())
    assert resumed.validation.history == tracker.validation.history
    metadata = resumed.keep_best(modules, steps=10)
    assert torch.equal(modules[0].weight, torch.ones(2, 2))
    assert metadata["kept_step"] == "3" and metadata["val_views"] == "3"
    assert metadata["val_loss_last"] == ""  # step 10 was never validated
    assert kept_step().keep_best(modules, steps=10) == {}


def test_an_ltm_run_with_labels_resumes_after_its_information_bottleneck_began(tmp_path):
    """The resumed run refits LTM's output clusters before its first step."""
    folder = write_images(tmp_path / "labelled", 4, classes=2)
    model = tiny("vit_small_patch16_224", num_classes=2)
    out = tmp_path / "ltm.safetensors"
    settings = {"steps": 4, "batch_size": 2, "ib_clusters": 2, "ib_start": 0.25}
    stopped = train(model, config("ltm:keep=0.7", out, folder, stop_after=2, **settings))
    resumed = train(model, config("ltm:keep=0.7", out, folder, resume=True, **settings))
    assert resumed.losses[:2] == stopped.losses and len(resumed.losses) == 4
    assert all(np.isfinite(resumed.losses))
