"""DTEM and Token Cropr against numbers produced by their official code.

The fixtures in ``tests/fixtures/official/`` were made once by
``scripts/make_official_fixtures.py`` from clones of movinghoon/DTEM and benbergner/cropr
(each file records the commit). They hold inputs, weights, outputs and gradients only.
Every expected value here comes from the official code, never from ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from analysis import run
from analysis.engine import attach_weights, forward
from analysis.learned import TrainContext, attach
from analysis.models import LoadedModel, from_module
from analysis.reducers.base import LearnedWeights, Signals, TokenState
from analysis.reducers.cropr import Cropr, CroprModule
from analysis.reducers.dtem import DTEM, DTEMMetric
from analysis.schedule import parse_schedule

FIXTURES = Path(__file__).parent / "fixtures" / "official"


def load(name: str) -> dict[str, Any]:
    return torch.load(FIXTURES / name, weights_only=True)


def relative_error(ours: Tensor, theirs: Tensor) -> float:
    """Relative L2 distance ‖ours − theirs‖ / ‖theirs‖."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    return float((ours - theirs).norm() / theirs.norm())


def metric_module(weight: Tensor, bias: Tensor) -> DTEMMetric:
    module = DTEMMetric(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        module.proj.weight.copy_(weight)
        module.proj.bias.copy_(bias)
    return module


def dtem_reducer(module: DTEMMetric, **values: Any) -> DTEM:
    settings = {"r": 0, "inflect": 0.0, "k2": 3, "tau1": 0.1, "tau2": 0.1, **values}
    reducer = DTEM(**settings)
    reducer.bind(LearnedWeights("dtem", {0: module}), 0)
    return reducer


def test_fixtures_are_small_and_say_where_they_came_from():
    files = sorted(FIXTURES.glob("*.pt"))
    assert [f.name for f in files] == [
        "cropr_model.pt",
        "cropr_module.pt",
        "dtem_merge.pt",
        "dtem_model.pt",
    ]
    assert sum(f.stat().st_size for f in files) < 200_000
    assert load("dtem_merge.pt")["source"].startswith("movinghoon/DTEM@")
    assert load("cropr_module.pt")["source"].startswith("benbergner/cropr@")


# ------------------------------------------------------------------------------------ DTEM


@pytest.mark.parametrize("case", range(3))
def test_dtem_inference_merge_matches_official(case):
    data = load("dtem_merge.pt")["eval"][case]
    reducer = dtem_reducer(metric_module(data["metric_weight"], data["metric_bias"]), r=data["r"])
    state = TokenState(data["x"], data["size"], num_prefix=1)
    reduction = reducer.reduce(state, Signals(layer=0, block_input=data["block_input"]))
    assert reduction.x.shape == data["out_x"].shape
    torch.testing.assert_close(reduction.size, data["out_size"])
    torch.testing.assert_close(reduction.x, data["out_x"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", range(4))
def test_dtem_soft_training_merge_and_gradients_match_official(case):
    data = load("dtem_merge.pt")["train"][case]
    module = metric_module(data["metric_weight"], data["metric_bias"])
    reducer = dtem_reducer(module, r=data["r"], k2=data["k2"], tau1=data["tau1"], tau2=data["tau2"])
    x = data["x"].clone().requires_grad_(True)
    size = data["size"].clone().requires_grad_(True)
    ctx = TrainContext()
    ctx.scratch["dtem_active"] = data["active"]
    block_input = data["block_input"].clone().requires_grad_(True)
    reduction = reducer.reduce_train(
        TokenState(x, size, num_prefix=1), Signals(layer=0, block_input=block_input), ctx
    )
    assert ctx.scratch["dtem_active"] == data["out_active"]
    torch.testing.assert_close(reduction.size, data["out_size"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reduction.x, data["out_x"], rtol=1e-5, atol=1e-5)

    loss = (reduction.x * data["weight_x"]).sum() + (reduction.size * data["weight_size"]).sum()
    loss.backward()
    assert block_input.grad is None  # the metric layer sees norm1(x).detach()
    expected = {
        "metric weight": (module.proj.weight.grad, data["grad_metric_weight"]),
        "metric bias": (module.proj.bias.grad, data["grad_metric_bias"]),
        "tokens": (x.grad, data["grad_x"]),
        "sizes": (size.grad, data["grad_size"]),
    }
    for name, (ours, theirs) in expected.items():
        assert relative_error(ours, theirs) < 1e-4, name


def dtem_model() -> tuple[LoadedModel, dict[str, Any]]:
    """The fixture's tiny ViT with its DTEM metric layers, as our engine runs it."""
    data = load("dtem_model.pt")
    config = dict(data["config"])
    name = config.pop("model_name")
    module = timm.create_model(name, pretrained=False, **config)
    module.load_state_dict(data["backbone"])
    layers = {
        index: metric_module(weight, bias).train().requires_grad_(True)
        for index, (weight, bias) in enumerate(
            zip(data["metric_weight"], data["metric_bias"], strict=True)
        )
    }
    model = from_module(module, name, weights="official fixture")
    return attach(model, [LearnedWeights("dtem", layers)]), data


def test_dtem_model_inference_matches_official():
    model, data = dtem_model()
    result = run(model, data["images"], f"dtem:r={data['r']}")
    assert result.tokens == [17 - 3, 17 - 6, 17 - 9]
    torch.testing.assert_close(result.logits, data["logits_eval"], rtol=1e-4, atol=1e-5)


def test_dtem_training_gradients_match_official():
    """The metric layers' gradients through a training forward, as the trainer drives it.

    The fixture's forward drives some soft sizes to exactly 0; the official attention
    multiplies by the size and keeps their gradient. The engine's ``log(size + 1e-6)``
    agrees to under 1e-6 (relative L2); a mask that clamps the size instead,
    ``size.clamp(min=1e-6).log()``, loses that gradient and puts block 1's off by 140 %
    (``benchmarks/mutations.py`` checks that this test catches it).
    """
    model, data = dtem_model()
    assert data["zero_sizes"] > 0  # the fixture exercises the zero-size case
    resolved = parse_schedule(f"dtem:r={data['r']}").resolve(model.facts)
    attach_weights(resolved, model)
    logits, _, _ = forward(model.module, data["images"], resolved, train=TrainContext())
    torch.testing.assert_close(logits, data["logits_train"], rtol=1e-4, atol=1e-5)
    F.cross_entropy(logits, data["labels"]).backward()
    layers = model.learned["dtem"].modules
    for index, expected in enumerate(data["grad_metric_weight"]):
        ours = layers[index].proj.weight.grad
        if float(expected.norm()) == 0.0:  # the last block's merge cannot reach CLS
            assert ours is None or float(ours.norm()) == 0.0
            continue
        assert relative_error(ours, expected) < 1e-4, f"block {index} weight"
        bias = layers[index].proj.bias.grad
        assert relative_error(bias, data["grad_metric_bias"][index]) < 1e-4, f"block {index}"


# ----------------------------------------------------------------------------------- Cropr


def cropr_module(weights: dict[str, Tensor], classes: int) -> CroprModule:
    module = CroprModule(weights["query"].shape[0], aux_out=classes)
    aux = module.aux
    assert aux is not None
    targets = {
        "query": module.query,
        "mlp_norm.weight": aux.mlp_norm.weight,
        "mlp_norm.bias": aux.mlp_norm.bias,
        "fc1.weight": aux.mlp[0].weight,
        "fc1.bias": aux.mlp[0].bias,
        "fc2.weight": aux.mlp[2].weight,
        "fc2.bias": aux.mlp[2].bias,
        "head_norm.weight": aux.head_norm.weight,
        "head_norm.bias": aux.head_norm.bias,
        "head.weight": aux.head.weight,
        "head.bias": aux.head.bias,
    }
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(weights[key])
    return module


def cropr_reducer(module: CroprModule, rate: int, first: bool = False) -> Cropr:
    reducer = Cropr(rate=rate, llf=False, first_extra=1, first=first)
    reducer.bind(LearnedWeights("cropr", {0: module}), 0)
    return reducer


def test_cropr_scores_and_pruning_match_official():
    data = load("cropr_module.pt")
    module = cropr_module(data["weights"], data["classes"])
    # the official module is built with its whole pruning rate; ours adds first_extra to
    # the first module only, so this is a later module
    reducer = cropr_reducer(module, data["rate"])
    reduction = reducer.reduce(TokenState(data["x"], torch.ones(2, 13), 1), Signals(layer=0))
    torch.testing.assert_close(reduction.scores[:, 1:], data["scores"][:, 1:])
    torch.testing.assert_close(reduction.x, data["kept"])  # CLS, then patches best first
    pruned = reduction.token_map < 0
    assert torch.equal(pruned.sum(dim=1), torch.tensor([3, 3]))
    # the same tokens are pruned; the official code returns them best first
    order = data["scores"].masked_fill(~pruned, -torch.inf).argsort(dim=1, descending=True)
    ours = data["x"].gather(1, order[:, :3, None].expand(-1, -1, data["x"].shape[-1]))
    torch.testing.assert_close(ours, data["pruned"])


def test_cropr_auxiliary_head_and_its_gradients_match_official():
    data = load("cropr_module.pt")
    module = cropr_module(data["weights"], data["classes"])
    reducer = cropr_reducer(module, data["rate"])
    x = data["x"].clone().requires_grad_(True)
    ctx = TrainContext(aux_loss=lambda prediction: F.cross_entropy(prediction, data["labels"]))
    reduction = reducer.reduce_train(TokenState(x, torch.ones(2, 13), 1), Signals(layer=0), ctx)
    torch.testing.assert_close(reduction.x, data["kept_train"])
    prediction = module.predict(data["x"])
    torch.testing.assert_close(prediction, data["pred"], rtol=1e-5, atol=1e-6)
    loss = ctx.losses["cropr_aux"]
    torch.testing.assert_close(loss, data["loss"])
    loss.backward()
    assert data["x_grad_is_none"] and x.grad is None  # the module sees x.detach()
    aux = module.aux
    assert aux is not None
    ours = {
        "query": module.query.grad,
        "fc1.weight": aux.mlp[0].weight.grad,
        "fc2.weight": aux.mlp[2].weight.grad,
        "head.weight": aux.head.weight.grad,
        "head.bias": aux.head.bias.grad,
    }
    for key, theirs in data["grads"].items():
        assert relative_error(ours[key], theirs) < 1e-5, key


@pytest.mark.parametrize("variant", ["plain", "llf"])
def test_cropr_model_matches_official(variant):
    """The official ViT prunes after every block but the last (but the last two with LLF),
    the first module by rate + 1; LLF concatenates the pruned tokens before the last block."""
    data = load("cropr_model.pt")
    case = data[variant]
    config = data["config"]
    kwargs = {k: v for k, v in config.items() if k != "drop_path_rate"}
    module = VisionTransformer(**kwargs)  # timm's defaults: the official blocks' settings
    module.load_state_dict(data["backbone"])
    model = from_module(module, "cropr_official_tiny", weights="official fixture")
    queries = {}
    for layer, query in enumerate(case["queries"]):
        queries[layer] = CroprModule(config["embed_dim"])
        with torch.no_grad():
            queries[layer].query.copy_(query)
    model = attach(model, [LearnedWeights("cropr", queries)])
    last = len(case["queries"]) - 1
    schedule = f"cropr:rate={data['rate']},llf={int(case['llf'])}@0-{last}"
    result = run(model, data["images"], schedule)
    rates = [a - b for a, b in zip([17, *result.tokens], result.tokens, strict=False)]
    assert rates[: len(case["schedule"])] == case["schedule"]
    torch.testing.assert_close(result.logits, case["logits"], rtol=1e-4, atol=1e-5)
