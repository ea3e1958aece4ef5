"""CIL: cross-entropy + knowledge distillation with entropy-based gradient scaling.

The reference preset writes ``opts.loss_CIL == 1`` (a comparison), so ``--method CIL`` in the
SDR code trains plain FT. csseg implements the intended method with weight 1; see
docs/DEPARTURES.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import losses as L
from .base import Method, register_method, weight


@dataclass(frozen=True)
class CILParams:
    cil: float = weight(1.0)
    """Weight of the CIL distillation."""
    gradient_scale: float = 1.0
    """Entropy gradient scaling of the distillation (reference ``loss_CIL`` doubles as it)."""
    temperature: float = 1.0


@register_method
class CIL(Method):
    name = "cil"
    Params = CILParams

    def needs_old_model(self, step):
        return step > 0 and self.params.cil > 0

    def distillation(self, ctx, batch, out, old):
        if self.params.cil <= 0:
            return {}
        p = self.params
        return {"cil": p.cil * L.cil_distillation(out.logits, old.logits, batch.target, p.gradient_scale, p.temperature)}
