"""LwF: cross-entropy + knowledge distillation of the old model's logits (reference preset 100)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import losses as L
from .base import Method, register_method, weight


@dataclass(frozen=True)
class LwFParams:
    kd: float = weight(100.0)
    """Weight of the output distillation."""
    alpha: float = 1.0
    """Multiplies the old logits before the softmax."""


@register_method
class LwF(Method):
    name = "lwf"
    Params = LwFParams

    def needs_old_model(self, step):
        return step > 0 and self.params.kd > 0

    def distillation(self, ctx, batch, out, old):
        if self.params.kd <= 0:
            return {}
        return {"kd": self.params.kd * L.knowledge_distillation(out.logits, old.logits, self.params.alpha)}
