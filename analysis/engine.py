"""Run a timm VisionTransformer block by block, with reducers between its steps.

The engine calls the model's own submodules (patch_embed, blocks' norm/attn/ls/mlp,
norm, head) and keeps all state in local variables, so the model is never mutated and
one cached model can serve many sessions at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from analysis.errors import DeviceMemoryError, ScheduleError, TokenScopeError, shorten
from analysis.flops import count_macs
from analysis.images import to_tensor
from analysis.models import LoadedModel, model_facts
from analysis.records import RunResult
from analysis.reducers.base import Reducer, Signals, Site, TokenState
from analysis.schedule import ResolvedSchedule, Schedule, parse_schedule
from analysis.trace import Trace, TraceBuilder


def run(
    model: LoadedModel,
    images: Tensor | Image.Image | list[Image.Image],
    schedule: Schedule | str | None = None,
    *,
    precision: str = "fp32",
) -> RunResult:
    """Run ``model`` on images with a reduction schedule.

    Args:
        model: from :func:`analysis.load_model`.
        images: a preprocessed [B, 3, H, W] tensor, or PIL image(s) to preprocess.
        schedule: a :class:`Schedule`, its text or JSON form, or None for no reduction.
        precision: ``"fp32"`` or ``"bf16"`` (autocast; GPU use).
    """
    schedule = parse_schedule(schedule)
    crops = None
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, list):
        images, crops = to_tensor(images, model.data_config)
    if images.ndim != 4 or images.shape[1] != 3:
        raise TokenScopeError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    module = model.module
    patch = module.patch_embed.patch_size
    height, width = images.shape[-2:]
    if height % patch[0] or width % patch[1]:
        raise TokenScopeError(
            f"input {height}×{width} px is not a multiple of the patch size {patch[0]}"
        )
    if height != width:
        raise TokenScopeError(f"square inputs only, got {height}×{width} px")
    facts = model_facts(module, model.name, height)
    resolved = schedule.resolve(facts)
    attach_weights(resolved, model)
    cost = count_macs(facts, resolved, module)
    device = model.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    try:
        with torch.inference_mode(), autocast:
            logits, features, trace = forward(module, images.to(device), resolved)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise DeviceMemoryError(
            f"the {device.type.upper()} ran out of memory on a batch of {images.shape[0]} at "
            f"{height} px; use a smaller batch or run on the CPU",
            batch=int(images.shape[0]),
        ) from None
    if trace.tokens != cost.tokens:
        raise AssertionError(f"token counts {trace.tokens} differ from the analytic {cost.tokens}")
    for name, output in (("features", features), ("logits", logits)):
        if output is not None and not bool(torch.isfinite(output).all()):
            raise TokenScopeError(
                f"the model's {name} came out NaN or infinite ({model.name}, "
                f"{shorten(Path(str(model.weights)).name, 60)} weights): its weights overflow, "
                "or a learned reducer's weights are broken. "
                "Check the checkpoint, or run in fp32"
            )
    return RunResult(
        logits=logits, features=features, trace=trace, cost=cost, schedule=schedule, crops=crops
    )


def cpu_replica(model: LoadedModel) -> LoadedModel:
    """A copy of ``model`` on the CPU (learned weights included), for when the GPU is full.

    The shared model is left as it is; its tensors are copied straight to the CPU, so the
    copy costs no GPU memory. One replica per model is kept for the process.
    """
    from dataclasses import replace

    if model.device.type == "cpu":
        return model
    held = _REPLICAS.get(id(model.module))
    if held is not None and held[0] is model.module:
        module = held[1]
    else:
        module = _copy_to_cpu(model.module)
        _REPLICAS.clear()  # one at a time: a replica is as large as its model
        _REPLICAS[id(model.module)] = (model.module, module)
    learned = {
        method: replace(weights, modules={k: _copy_to_cpu(m) for k, m in weights.modules.items()})
        for method, weights in model.learned.items()
    }
    return replace(model, module=module, learned=learned)


_REPLICAS: dict[int, tuple[nn.Module, nn.Module]] = {}


def _copy_to_cpu(module: nn.Module) -> nn.Module:
    import copy

    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        cpu = tensor.detach().to("cpu", copy=True)
        memo[id(tensor)] = (
            nn.Parameter(cpu, requires_grad=False) if isinstance(tensor, nn.Parameter) else cpu
        )
    return copy.deepcopy(module, memo)


def attach_weights(resolved: ResolvedSchedule, model: LoadedModel) -> None:
    """Give learned reducers their weights from the model's loaded checkpoints.

    Raises ScheduleError when a learned method has no trained weights for this model, so
    callers (the app) can check a schedule without running it."""
    for layer, reducer in resolved.reducers():
        bind = getattr(reducer, "bind", None)
        wants = getattr(reducer, "wants_weights", None)
        if bind is None or (wants is not None and not wants()):
            continue
        weights = model.learned.get(reducer.name)
        if weights is None:
            raise ScheduleError(
                f"{reducer.label} needs trained weights for {model.name}; none are loaded"
            )
        bind(weights, layer)


def embed(module: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Patch embedding plus prefix tokens and position embedding, resampled as timm does."""
    from timm.layers import resample_abs_pos_embed

    patch_embed = module.patch_embed
    x = patch_embed.proj(images)
    grid = (x.shape[-2], x.shape[-1])
    x = patch_embed.norm(x.flatten(2).transpose(1, 2))
    prefix = [
        token.expand(x.shape[0], -1, -1)
        for token in (module.cls_token, getattr(module, "dist_token", None), module.reg_token)
        if token is not None
    ]
    pos_embed = module.pos_embed
    if pos_embed is not None and grid != tuple(patch_embed.grid_size):
        pos_embed = resample_abs_pos_embed(
            pos_embed,
            new_size=grid,
            old_size=patch_embed.grid_size,
            num_prefix_tokens=0 if module.no_embed_class else module.num_prefix_tokens,
        )
    if pos_embed is not None and module.no_embed_class:
        x = x + pos_embed
    x = torch.cat([*prefix, x], dim=1)
    if pos_embed is not None and not module.no_embed_class:
        x = x + pos_embed
    x = module.pos_drop(x)
    return module.norm_pre(x), grid


def attend(
    attn: nn.Module, x: Tensor, mask: Tensor | None, reducers: list[Reducer], num_prefix: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """timm Attention with an optional float mask; also the keys and CLS attention if asked."""
    batch, num_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attn.norm(out.transpose(1, 2).reshape(batch, num_tokens, attn.attn_dim))
    out = attn.proj(out)

    keys = k.mean(dim=1) if any(r.needs_keys for r in reducers) else None
    cls_attn = None
    if any(r.needs_cls_attn for r in reducers):
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, H, 1, T]
        if mask is not None:
            logits = logits + mask
        cls_attn = logits.float().softmax(dim=-1).mean(dim=1)[:, 0, num_prefix:]
    return out, keys, cls_attn


def forward(
    module: nn.Module, images: Tensor, resolved: ResolvedSchedule, *, train: Any = None
) -> tuple[Tensor | None, Tensor, Trace | None]:
    """The block-by-block forward pass; returns logits, pooled features and the trace.

    With ``train`` (an :class:`analysis.learned.TrainContext`) this is the differentiable
    training forward: reducers that define ``reduce_train`` use it, and no trace is built.
    A reducer's optional ``enter(state)`` runs as its block starts, before the attention
    (MSTM's multi-scale fusion); it may change the tokens, not their number.
    Reducers with a truthy ``keeps_aside`` (Cropr's last-layer fusion) set their removed
    tokens aside; those come back, as they were, before the final block.
    """
    x, grid = embed(module, images)
    num_prefix = module.num_prefix_tokens
    batch = x.shape[0]
    size = torch.ones(batch, x.shape[1], device=x.device)
    merged_any = False
    tracer = TraceBuilder(batch, grid, num_prefix, x.device) if train is None else None
    aside = _Aside(batch, grid[0] * grid[1], x.device)
    for _, reducer in resolved.reducers():
        prepare = getattr(reducer, "prepare", None)  # per-run inputs from the images
        if prepare is not None:
            prepare(module, images)

    def reduce(
        reducer: Reducer, x: Tensor, size: Tensor, signals: Signals
    ) -> tuple[Tensor, Tensor]:
        state = TokenState(x, size, num_prefix)
        reduce_train = getattr(reducer, "reduce_train", None)
        if train is not None and reduce_train is not None:
            reduction = reduce_train(state, signals, train)
        else:
            reduction = reducer.reduce(state, signals)
        if getattr(reducer, "keeps_aside", False):
            aside.keep(state, reduction, None if tracer is None else tracer.owner)
        if tracer is not None:
            tracer.apply(signals.layer, reducer.name, reduction)
        return reduction.x, reduction.size

    last = len(module.blocks) - 1
    for layer, (block, plan) in enumerate(zip(module.blocks, resolved.layers, strict=True)):
        if layer == last and aside.count:
            x, size = aside.restore(x, size, tracer)
        active = [r for r in (plan.inside, plan.between) if r is not None]
        for reducer in active:  # changes on entering the block (MSTM's multi-scale fusion)
            enter = getattr(reducer, "enter", None)
            if enter is not None:
                x = enter(TokenState(x, size, num_prefix)).x
        mask = None
        if resolved.proportional_attention and merged_any:
            # Zero-size tokens (PatchMerger outputs no patch chose, DTEM's faded tokens in
            # training) get a large negative bias instead of -inf. Adding eps, not clamping,
            # keeps the gradient through a size that reaches 0, as DTEM's official code
            # (which multiplies the attention by the size) does.
            mask = (size + 1e-6).log().to(x.dtype)[:, None, None, :]
        normed = block.norm1(x)
        asking = [r for r in active if r.reduces(x.shape[1], num_prefix)]  # no-ops ask nothing
        attn_out, keys, cls_attn = attend(block.attn, normed, mask, asking, num_prefix)
        x = x + block.ls1(attn_out)
        if plan.inside is not None:
            signals = Signals(layer=layer, keys=keys, cls_attn=cls_attn, block_input=normed)
            x, size = reduce(plan.inside, x, size, signals)
        x = x + block.ls2(block.mlp(block.norm2(x)))
        if plan.between is not None:
            x, size = reduce(plan.between, x, size, Signals(layer=layer))
        merged_any = merged_any or bool(active)  # log(1) = 0: a no-op until tokens merge
        if tracer is not None:
            tracer.end_layer(layer, size)

    x = module.norm(x)
    features = module.forward_head(x, pre_logits=True)
    logits = None
    if getattr(module, "num_classes", 0) > 0:
        # DeiT-distilled averages two heads over two tokens; elsewhere reuse the pooling.
        distilled = getattr(module, "head_dist", None) is not None
        logits = module.forward_head(x) if distilled else module.head(features)
    return logits, features, None if tracer is None else tracer.finish()


class _Aside:
    """Tokens a reducer removed but keeps for later (Cropr's last-layer fusion).

    They return, unchanged since their removal, at the end of the sequence before the
    final block; in the trace the patches they carry get owners again while their
    ``dropped_at`` keeps the layer at which they were set aside.
    """

    def __init__(self, batch: int, num_patches: int, device: torch.device) -> None:
        self.x: list[Tensor] = []
        self.size: list[Tensor] = []
        self.count = 0
        self.patch_slot = torch.full((batch, num_patches), -1, dtype=torch.long, device=device)

    def keep(self, state: TokenState, reduction: Any, owner: Tensor | None) -> None:
        dropped = reduction.token_map < 0  # [B, T_old]
        counts = dropped.sum(dim=1)
        if int(counts.max()) == 0:
            return
        if int(counts.min()) != int(counts.max()):
            raise AssertionError("tokens set aside must be as many in every image")
        k = int(counts[0])
        order = torch.argsort((~dropped).to(torch.int8), dim=1, stable=True)[:, :k]
        dim = state.x.shape[-1]
        self.x.append(state.x.gather(1, order.unsqueeze(-1).expand(-1, -1, dim)))
        self.size.append(state.size.gather(1, order))
        if owner is not None:
            slot_of_old = torch.full_like(reduction.token_map, -1)
            ranks = torch.arange(k, device=order.device).expand_as(order) + self.count
            slot_of_old.scatter_(1, order, ranks)
            alive = owner >= 0
            slot = torch.where(alive, slot_of_old.gather(1, owner.clamp(min=0)), -1)
            self.patch_slot = torch.where(slot >= 0, slot, self.patch_slot)
        self.count += k

    def restore(
        self, x: Tensor, size: Tensor, tracer: TraceBuilder | None
    ) -> tuple[Tensor, Tensor]:
        if tracer is not None:
            back = self.patch_slot >= 0
            tracer.owner = torch.where(back, self.patch_slot + x.shape[1], tracer.owner)
        x = torch.cat([x, *(t.to(x.dtype) for t in self.x)], dim=1)
        size = torch.cat([size, *self.size], dim=1)
        self.x, self.size, self.count = [], [], 0
        return x, size


_attach_weights = attach_weights  # the older private name

__all__ = ["RunResult", "Site", "attach_weights", "run"]
