"""EWC (Kirkpatrick et al., 2017): cross-entropy + the importance penalty weighted by the
empirical Fisher (the ``fisher`` statistic, registered here; RW reuses it)."""

from __future__ import annotations

from typing import Mapping

import torch

from ..collectors import register_statistic
from ._regularizer import Regularizer, trainable
from .base import register_method


class Fisher:
    """EWC's empirical Fisher: ``F <- alpha * g^2 + (1 - alpha) * F`` every iteration."""

    def __init__(self, model, prev: Mapping | None, alpha: float = 0.9) -> None:
        old = (prev or {}).get("fisher") or {}
        self.alpha = alpha
        self.fisher = {n: old[n].clone().to(p.device) if n in old else torch.ones_like(p) for n, p in trainable(model).items()}

    def observe(self, features, labels) -> None:
        pass

    @torch.no_grad()
    def after_backward(self, model) -> None:
        pairs = [(self.fisher[n], p.grad) for n, p in trainable(model).items() if p.grad is not None]
        if pairs:
            fisher, grads = map(list, zip(*pairs))
            torch._foreach_mul_(fisher, 1 - self.alpha)
            torch._foreach_addcmul_(fisher, grads, grads, value=self.alpha)

    def finalize(self, model) -> dict:
        return {"fisher": {n: f.cpu() for n, f in self.fisher.items()}}


register_statistic("fisher", lambda spec, built: Fisher(spec.model, spec.prev, spec.alpha))


@register_method
class EWC(Regularizer):
    name = "ewc"
    collects = ("fisher",)
    importance_keys = ("fisher",)
