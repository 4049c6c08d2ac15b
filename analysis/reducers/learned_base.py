"""What a learned reducer is: the mixin and the training hooks its ``reduce_train`` sees.

It lives with the reducers so that they need nothing above their own layer: reading,
writing and checking weights files (:mod:`analysis.learned`) sits above the models and
imports the reducers, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from analysis.errors import ScheduleError
from analysis.reducers.base import LearnedWeights, ModelFacts


@dataclass
class TrainContext:
    """What a reducer's ``reduce_train`` may read and add to during one training forward.

    ``aux_loss`` scores an auxiliary prediction against this batch's target (labels or the
    unreduced model's output); reducers append their auxiliary terms to ``losses``.
    ``scratch`` holds state carried from layer to layer within one forward (DTEM's count of
    active tokens).
    """

    aux_loss: Callable[[Tensor], Tensor] | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)

    def add_loss(self, name: str, value: Tensor) -> None:
        self.losses[name] = self.losses[name] + value if name in self.losses else value


class LearnedReducer:
    """Mixin for reducers with a trained module per layer.

    Subclasses set ``module_class`` (built from keyword config) and implement
    :meth:`new_module`. ``bind`` stores this run's module on the (per-run) reducer instance;
    the module itself is never modified.
    """

    module_class: ClassVar[type[nn.Module]]
    name: ClassVar[str]
    label: ClassVar[str]
    default_lr: ClassVar[float] = 1e-3  # AdamW learning rate of `python -m analysis train`

    _module: nn.Module | None = None
    _source: str = ""

    def wants_weights(self) -> bool:
        return True

    def bind(self, weights: LearnedWeights, layer: int) -> None:
        module = weights.modules.get(layer)
        source = weights.metadata.get("source", "the loaded weights")
        if module is None:
            covered = ", ".join(str(i) for i in sorted(weights.modules)) or "none"
            raise ScheduleError(
                f"{self.label}: {source} has no trained module for layer {layer} (it covers "
                f"layers {covered}). Run {self.name} at those layers, or train one for this "
                f"layer: python -m analysis train --schedule '{self.name}@{layer}' ..."
            )
        self.check_module(module, layer, source)
        self._module = module
        self._source = source

    def check_module(self, module: nn.Module, layer: int, source: str) -> None:
        """Refuse a module whose shape does not fit this reducer's parameters."""

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            raise ScheduleError(f"{self.label} needs trained weights; none are bound")
        return self._module

    @classmethod
    def new_module(
        cls, facts: ModelFacts, values: dict[str, Any], aux_out: int = 0
    ) -> nn.Module:  # pragma: no cover - abstract
        """A freshly initialised module for training (``aux_out``: auxiliary head width)."""
        raise NotImplementedError


__all__ = ["LearnedReducer", "TrainContext"]
