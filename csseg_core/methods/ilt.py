"""ILT: LwF's output distillation (100) + L2 distillation of the encoder features (100)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import losses as L
from .base import register_method, weight
from .lwf import LwF, LwFParams


@dataclass(frozen=True)
class ILTParams(LwFParams):
    de: float = weight(100.0)
    """Weight of the feature distillation (MSE on the backbone output)."""


@register_method
class ILT(LwF):
    name = "ilt"
    Params = ILTParams

    def needs_old_model(self, step):
        return super().needs_old_model(step) or (step > 0 and self.params.de > 0)

    def distillation(self, ctx, batch, out, old):
        terms = super().distillation(ctx, batch, out, old)
        if self.params.de > 0:
            terms["de"] = self.params.de * L.feature_distillation(out.body, old.body)
        return terms
