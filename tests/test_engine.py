"""The engine reproduces timm, never mutates the model, and handles other input sizes."""

from __future__ import annotations

import threading

import pytest
import timm
import torch

from analysis import TokenScopeError, UnsupportedModelError, run
from analysis.models import from_module
from tests.conftest import tiny

FAMILIES = {
    "plain CLS": ("vit_small_patch16_224", {}),
    "DeiT distilled": ("deit_tiny_distilled_patch16_224", {}),
    "DeiT-3 LayerScale": ("deit3_small_patch16_224", {}),
    "DINOv2 registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 56}),
    "CLIP pre-norm": ("vit_base_patch16_clip_224", {"embed_dim": 192, "num_heads": 3}),
    "global average pool": ("vit_medium_patch16_gap_256", {"embed_dim": 192, "num_heads": 3}),
    "map attention pool": (
        "vit_base_patch16_siglip_224",
        {"embed_dim": 192, "num_heads": 3, "num_classes": 10},
    ),
}


@pytest.mark.parametrize("family", FAMILIES, ids=list(FAMILIES))
def test_empty_schedule_reproduces_timm(family):
    name, overrides = FAMILIES[family]
    model = tiny(name, **overrides)
    size = model.data_config.input_size
    images = torch.randn(2, 3, size, size)
    result = run(model, images, "none")
    with torch.no_grad():
        tokens = model.module.forward_features(images)
        features = model.module.forward_head(tokens, pre_logits=True)
        logits = model.module.forward_head(tokens)
    assert torch.allclose(result.features, features, atol=1e-5, rtol=0)
    if model.is_classifier:
        assert torch.allclose(result.logits, logits, atol=1e-5, rtol=0)
    else:
        assert result.logits is None
    assert result.tokens == [tokens.shape[1]] * len(model.module.blocks)


@pytest.mark.parametrize("family", FAMILIES, ids=list(FAMILIES))
def test_tome_runs_on_every_family_and_keeps_prefix(family):
    name, overrides = FAMILIES[family]
    model = tiny(name, **overrides)
    size = model.data_config.input_size
    result = run(model, torch.randn(2, 3, size, size), "tome:r=3")
    prefix = model.module.num_prefix_tokens
    start = prefix + model.facts.num_patches
    assert result.tokens == [start - 3 * (i + 1) for i in range(len(model.module.blocks))]
    for record in result.trace.layers:
        assert torch.all(record.sizes[:, :prefix] == 1)  # prefix tokens never merged
        assert torch.all(record.owner >= prefix)  # no patch ever lands on a prefix token


def test_unsupported_blocks_are_refused_by_name():
    module = timm.create_model("eva02_tiny_patch14_224", pretrained=False)
    with pytest.raises(UnsupportedModelError, match="eva02_tiny_patch14_224"):
        from_module(module, "eva02_tiny_patch14_224")
    parallel = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, depth=2)
    with pytest.raises(UnsupportedModelError, match="vit_small_patch16_18x2_224"):
        from_module(parallel, "vit_small_patch16_18x2_224")


def test_other_input_sizes_resample_like_timm():
    model = tiny("vit_small_patch16_224")
    dynamic = timm.create_model(
        "vit_small_patch16_224", pretrained=False, depth=4, img_size=64, dynamic_img_size=True
    ).eval()
    dynamic.load_state_dict(model.module.state_dict())
    images = torch.randn(1, 3, 128, 128)
    result = run(model, images)
    with torch.no_grad():
        expected = dynamic(images)
    assert torch.allclose(result.logits, expected, atol=1e-5, rtol=0)
    assert result.trace.grid == (8, 8)
    assert result.tokens[0] == 65


def test_bad_input_shapes_are_clear():
    model = tiny("vit_small_patch16_224")
    with pytest.raises(TokenScopeError, match="multiple of the patch size"):
        run(model, torch.randn(1, 3, 70, 70))
    with pytest.raises(TokenScopeError, match=r"\[B, 3, H, W\]"):
        run(model, torch.randn(3, 64, 64))


def test_model_is_never_mutated_and_runs_concurrently():
    model = tiny("deit_tiny_distilled_patch16_224")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    attrs_before = dict(vars(model.module))
    images = torch.randn(2, 3, 64, 64)
    schedules = ["tome:r=3", "evit:keep=0.5@1,2", "topk:keep=0.6@0", "random:keep=0.5@1", "none"]
    expected = {s: run(model, images, s).features for s in schedules}
    outputs: dict[str, list[torch.Tensor]] = {s: [] for s in schedules}

    def worker(schedule: str) -> None:
        for _ in range(3):
            outputs[schedule].append(run(model, images, schedule).features)

    threads = [threading.Thread(target=worker, args=(s,)) for s in schedules]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for schedule in schedules:
        for features in outputs[schedule]:
            assert torch.allclose(features, expected[schedule], atol=1e-6)
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(vars(model.module)) == set(attrs_before)
    assert not model.module.training


def test_pil_images_are_preprocessed_and_cropped():
    from PIL import Image

    model = tiny("vit_small_patch16_224")
    image = Image.new("RGB", (200, 100), (10, 200, 30))
    result = run(model, [image, image], "tome:r=2")
    assert result.features.shape[0] == 2
    # crop_pct 0.9: short side to int(64 / 0.9) = 71, then a centred 64 px square
    assert result.crops[0].resized_size == (142, 71)
    assert result.crops[0].crop_box == (39, 4, 103, 68)  # torchvision rounds 3.5 to 4
