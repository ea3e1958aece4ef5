"""RW (Riemannian walk, Chaudhry et al., 2018): cross-entropy + the importance penalty weighted by
the Fisher plus the RW scores (the ``rw`` statistic, registered here; it needs EWC's ``fisher``)."""

from __future__ import annotations

from typing import Mapping

import torch

from ..collectors import register_statistic
from ._regularizer import Regularizer, trainable
from .base import register_method
from .ewc import Fisher


class RWalk:
    """RW (Riemannian walk): every ``interval`` iterations
    ``score += g * (theta_tmp - theta) / (0.5 * F * (theta - theta_tmp)^2 + 1e-8)``;
    the stored score is ``0.5 * (relu(score) + previous score)``. Needs the Fisher collector."""

    def __init__(self, model, prev: Mapping | None, fisher: Fisher, interval: int = 10) -> None:
        params = trainable(model)
        self.fisher, self.interval, self.iteration = fisher, interval, 0
        self.tmp = {n: p.detach().clone() for n, p in params.items()}
        self.score = {n: torch.zeros_like(p) for n, p in params.items()}
        self.old_score = (prev or {}).get("rw") or {}

    def observe(self, features, labels) -> None:
        pass

    @torch.no_grad()
    def after_backward(self, model) -> None:
        self.iteration += 1
        if self.iteration % self.interval:
            return
        items = [(n, p) for n, p in trainable(model).items() if p.grad is not None]
        if not items:
            return
        now = [p.detach() for _, p in items]
        tmp = [self.tmp[n] for n, _ in items]
        diff = torch._foreach_sub(now, tmp)                # theta - theta_tmp
        den = torch._foreach_mul(diff, diff)
        torch._foreach_mul_(den, [self.fisher.fisher[n] for n, _ in items])
        torch._foreach_mul_(den, 0.5)
        torch._foreach_add_(den, 1e-8)                     # 0.5 * F * diff^2 + 1e-8
        torch._foreach_mul_(diff, [p.grad.detach() for _, p in items])
        torch._foreach_div_(diff, den)                     # g * diff / den
        torch._foreach_sub_([self.score[n] for n, _ in items], diff)  # score += g * (-diff) / den
        torch._foreach_copy_(tmp, now)

    def finalize(self, model) -> dict:
        out = {}
        for n, s in self.score.items():
            s = torch.relu(s)
            if n in self.old_score:
                s = 0.5 * (s + self.old_score[n].to(s.device))
            out[n] = s.cpu()
        return {"rw": out}


register_statistic("rw", lambda spec, built: RWalk(spec.model, spec.prev, built["fisher"]), needs=("fisher",))


@register_method
class RW(Regularizer):
    name = "rw"
    collects = ("fisher", "rw")
    importance_keys = ("fisher", "rw")
