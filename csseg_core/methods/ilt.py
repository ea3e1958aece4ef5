"""ILT: cross-entropy + output distillation (100) + L2 distillation of the encoder features (100)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import losses as L
from .base import Method, register_method, weight


@dataclass(frozen=True)
class ILTParams:
    kd: float = weight(100.0)
    """Weight of the output distillation."""
    de: float = weight(100.0)
    """Weight of the feature distillation (MSE on the backbone output)."""
    alpha: float = 1.0


@register_method
class ILT(Method):
    name = "ilt"
    Params = ILTParams

    def needs_old_model(self, step):
        return step > 0 and (self.params.kd > 0 or self.params.de > 0)

    def distillation(self, ctx, batch, out, old):
        terms = {}
        if self.params.kd > 0:
            terms["kd"] = self.params.kd * L.knowledge_distillation(out.logits, old.logits, self.params.alpha)
        if self.params.de > 0:
            terms["de"] = self.params.de * L.feature_distillation(out.body, old.body)
        return terms
