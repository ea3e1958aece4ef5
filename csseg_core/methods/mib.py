"""MiB: unbiased cross-entropy + unbiased distillation (10; 100 for 15-1 in the MiB paper)
+ balanced initialisation of the new classifier."""

from __future__ import annotations

from dataclasses import dataclass

from .. import losses as L
from .base import Method, register_method, weight


@dataclass(frozen=True)
class MiBParams:
    kd: float = weight(10.0, term="unkd")
    """Weight of the unbiased knowledge distillation."""
    alpha: float = 1.0
    init_balanced: bool = True
    """Initialise the new classifier from the background one (MiB §4.3)."""


class UnbiasedMixin:
    """Unbiased CE/KD, shared by MiB and SDR."""

    def classification(self, ctx, batch, out):
        if ctx.step == 0:
            return {"ce": L.cross_entropy(out.logits, batch.target)}
        return {"unce": L.unbiased_cross_entropy(out.logits, batch.target, ctx.n_old)}

    def unkd(self, out, old):
        if self.params.kd <= 0:
            return {}
        return {"unkd": self.params.kd * L.unbiased_knowledge_distillation(out.logits, old.logits, self.params.alpha)}

    def setup(self, ctx):
        if ctx.step > 0 and self.params.init_balanced:
            ctx.model.init_balanced()


@register_method
class MiB(UnbiasedMixin, Method):
    name = "mib"
    Params = MiBParams

    def needs_old_model(self, step):
        return step > 0 and self.params.kd > 0

    def distillation(self, ctx, batch, out, old):
        return self.unkd(out, old)
