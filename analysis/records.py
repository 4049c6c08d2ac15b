"""The record a run returns, apart from the engine that makes it.

Pictures, tables and metrics read a :class:`RunResult` without running a model, so they
import it from here and never load the engine (or timm) for a type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module imports nothing heavy
    from torch import Tensor

    from analysis.flops import CostReport
    from analysis.images import CropInfo
    from analysis.schedule import Schedule
    from analysis.trace import Trace


@dataclass
class RunResult:
    """What one ``run()`` produced: outputs, the token trace, the analytic cost."""

    logits: Tensor | None  # [B, classes] or None for a backbone
    features: Tensor  # [B, D] pooled features
    trace: Trace
    cost: CostReport
    schedule: Schedule
    crops: list[CropInfo] | None = None

    @property
    def gmacs(self) -> float:
        return self.cost.gmacs

    @property
    def tokens(self) -> list[int]:
        return self.trace.tokens


__all__ = ["RunResult"]
