"""Numbers for display: top classes with probabilities, feature fidelity, cost savings,
and the notes a page shows beside them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClassScore:
    index: int
    name: str
    probability: float

    @property
    def short_name(self) -> str:
        """The first of ImageNet's synonyms ("gas pump, gasoline pump, ..." -> "gas pump")."""
        return self.name.split(",")[0].strip()


def top_classes(
    logits: Tensor, names: Sequence[str] | None = None, k: int = 5, *, index: int = 0
) -> list[ClassScore]:
    """The ``k`` most probable classes of one image, best first."""
    probabilities = logits[index].float().softmax(dim=-1)
    values, indices = probabilities.topk(min(k, probabilities.numel()))
    return [
        ClassScore(int(i), _name(names, int(i)), float(p))
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def class_probabilities(
    logits: Tensor, classes: Sequence[int], names: Sequence[str] | None = None, *, index: int = 0
) -> list[ClassScore]:
    """Probabilities of chosen classes (e.g. the full model's top-5 under the reduced model)."""
    probabilities = logits[index].float().softmax(dim=-1)
    return [ClassScore(i, _name(names, i), float(probabilities[i])) for i in classes]


def feature_cosine(full: Tensor, reduced: Tensor, *, index: int = 0) -> float:
    """Cosine similarity of one image's pooled features, reduced against full."""
    a, b = full[index].float().flatten(), reduced[index].float().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def reduction_percent(reduced_gmacs: float, full_gmacs: float) -> float:
    """How much of the full model's compute the schedule saves, in percent."""
    if full_gmacs <= 0:
        return 0.0
    return 100.0 * (1.0 - reduced_gmacs / full_gmacs)


REGISTERS_PAPER = "https://arxiv.org/abs/2309.16588"


def attention_artefact_note(model_name: str, methods: Iterable[str]) -> str | None:
    """A sentence for CLS-attention methods on DINOv2 without registers (the default
    model), or None. Its high-norm background tokens draw the CLS attention, so these
    methods keep border and background patches; without the note a user blames the tool.
    Which methods rank by CLS attention comes from the reducers (``needs_cls_attn``)."""
    from analysis.reducers import REDUCERS

    name = model_name.lower()
    if not (name == "default" or ("dinov2" in name and "reg" not in name)):
        return None
    labels = list(
        dict.fromkeys(
            REDUCERS[m].label for m in methods if m in REDUCERS and REDUCERS[m].needs_cls_attn
        )
    )
    if not labels:
        return None
    return (
        f"{' and '.join(labels)} rank{'s' if len(labels) == 1 else ''} patches by the CLS "
        "token's attention. DINOv2 without registers sends much of that attention to a few "
        "high-norm background tokens, so some border and background patches are kept: an "
        "artefact of the model, not of the tool (Darcet et al., "
        f"[Vision Transformers Need Registers]({REGISTERS_PAPER}), ICLR 2024)."
    )


def _name(names: Sequence[str] | None, index: int) -> str:
    if names is not None and 0 <= index < len(names):
        return names[index]
    return f"class {index}"
