"""LwF-MC (iCaRL-style): per-class BCE + BCE distillation of the old sigmoid outputs (preset 10)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import losses as L
from .base import Method, register_method, weight


@dataclass(frozen=True)
class LwFMCParams:
    icarl: float = weight(10.0)
    """Weight of the iCaRL distillation (reference ``icarl_importance``)."""


@register_method
class LwFMC(Method):
    name = "lwf-mc"
    Params = LwFMCParams

    def needs_old_model(self, step):
        return step > 0 and self.params.icarl > 0

    def classification(self, ctx, batch, out):
        if ctx.step == 0:
            return super().classification(ctx, batch, out)
        return {"bce": L.bce_with_ignore(out.logits, batch.target)}

    def distillation(self, ctx, batch, out, old):
        if self.params.icarl <= 0:
            return {}
        return {"icarl": self.params.icarl * L.icarl_distillation(out.logits, old.logits)}
