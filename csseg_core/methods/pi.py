"""PI (path integral / synaptic intelligence, Zenke et al., 2017): cross-entropy + the importance
penalty weighted by the path-integral scores (the ``pi`` statistic, registered here)."""

from __future__ import annotations

from typing import Mapping

import torch

from ..collectors import register_statistic
from ._regularizer import Regularizer, trainable
from .base import register_method


class PathIntegral:
    """PI (synaptic intelligence): ``delta += g * (theta_prev - theta)`` each iteration; at the
    end ``score = relu(delta / ((theta - theta_start)^2 + 1e-20)) + previous score``."""

    def __init__(self, model, prev: Mapping | None) -> None:
        params = trainable(model)
        self.start = {n: p.detach().clone() for n, p in params.items()}
        self.last = {n: p.detach().clone() for n, p in params.items()}
        self.delta = {n: torch.zeros_like(p) for n, p in params.items()}
        self.old_score = (prev or {}).get("pi") or {}

    def observe(self, features, labels) -> None:
        pass

    @torch.no_grad()
    def after_backward(self, model) -> None:
        items = [(n, p) for n, p in trainable(model).items() if p.grad is not None]
        if not items:
            return
        delta = [self.delta[n] for n, _ in items]
        last = [self.last[n] for n, _ in items]
        now = [p.detach() for _, p in items]
        torch._foreach_sub_(last, now)  # last <- theta_prev - theta, in place (no new buffer)
        torch._foreach_addcmul_(delta, [p.grad for _, p in items], last)
        torch._foreach_copy_(last, now)

    @torch.no_grad()
    def finalize(self, model) -> dict:
        out = {}
        for n, p in trainable(model).items():
            score = torch.relu(self.delta[n] / ((p.detach() - self.start[n]) ** 2 + 1e-20))
            if n in self.old_score:
                score = score + self.old_score[n].to(score.device)
            out[n] = score.cpu()
        return {"pi": out}


register_statistic("pi", lambda spec, built: PathIntegral(spec.model, spec.prev))


@register_method
class PI(Regularizer):
    name = "pi"
    collects = ("pi",)
    importance_keys = ("pi",)
