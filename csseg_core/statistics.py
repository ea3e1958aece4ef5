"""Statistics a step collects for later steps: SDR prototypes, EWC Fisher, PI and RW scores.

A step collects what the methods continuing from its state need (``Method.collects``, see
:func:`csseg_core.methods.required_statistics`): step 0 is FT for every method but still collects
the importances EWC/PI/RW need (the reference code silently reduces them to FT when step 0 ran
without the regulariser). ``state["collected"]`` lists what a state holds (:func:`held_statistics`);
a shared step-0 state that lacks a statistic is trained again with the union (none of them can
be added afterwards: they follow the training trajectory).

The per-iteration updates are in place (``torch._foreach_*``): no full-size temporaries except
RW's two every ``interval`` iterations.

Each collector has ``observe`` (before the loss, with detached features), ``after_backward``
(with the main loss' gradients, before the optimizer step) and ``finalize`` (returns the
tensors stored in the state; all-reduced across workers where they differ per worker; the
prototypes are all-reduced batch by batch unless ``sync_prototypes`` is false).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist

from . import losses as L


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class Prototypes:
    """Per-class running means of the backbone features (``body``), as in SDR.

    ``previous`` holds the prototypes from the previous state (frozen); ``current`` is updated
    every iteration with the classes of this step. Background (0) is not updated when the
    step's labels do not define it: in overlapped mode, and at steps > 0 outside sequential
    mode (old classes are labelled background there).

    ``gather``: how a class's feature vectors are gathered (:func:`losses.class_feature_sums`;
    "reference" = the official code's channel-major selection, ``docs/DEPARTURES.md`` §1).
    ``sync``: all-reduce each batch's sums and counts across DDP ranks so that every rank holds
    the running means over all ranks' images (default); False keeps one running mean per rank,
    as the reference (§4), and the state then holds rank 0's. Without a process group (one
    process) both are the same.
    """

    def __init__(self, num_classes: int, dim: int, step: int, mode: str, prev: Mapping | None, device,
                 gather: str = "pixel", sync: bool = True) -> None:
        self.gather, self.sync = gather, sync
        self.previous = torch.zeros(num_classes, dim, device=device)
        self.prev_counts = torch.zeros(num_classes, device=device, dtype=torch.float64)
        if prev:
            n = prev["prototypes"].shape[0]
            self.previous[:n] = prev["prototypes"].to(device)
            self.prev_counts[:n] = prev["prototype_counts"].to(device, torch.float64)
        self.current = self.previous.clone()
        self.sums = torch.zeros(num_classes, dim, device=device, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, device=device, dtype=torch.float64)
        self.skip_background = mode == "overlapped" or (mode != "sequential" and step > 0)

    @torch.no_grad()
    def observe(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        sums, counts = L.class_feature_sums(features.detach(), labels, self.current.shape[0], gather=self.gather)
        sums, counts = sums.double(), counts.double()
        if self.sync:  # the same running means on every rank
            sums, counts = _all_reduce(sums), _all_reduce(counts)
        if self.skip_background:
            counts = counts.clone()
            counts[0] = 0
            sums = sums.clone()
            sums[0] = 0
        self.sums += sums.double()
        self.counts += counts.double()
        seen = self.counts > 0
        total = self.prev_counts + self.counts
        mean = (self.previous.double() * self.prev_counts[:, None] + self.sums) / total.clamp(min=1)[:, None]
        self.current[seen] = mean[seen].to(self.current.dtype)

    def after_backward(self, model) -> None:
        pass

    def finalize(self, model) -> dict:
        sums, counts = self.sums, self.counts  # already summed over ranks in observe (when sync)
        total = self.prev_counts + counts
        protos = (self.previous.double() * self.prev_counts[:, None] + sums) / total.clamp(min=1)[:, None]
        keep = total == 0
        protos[keep] = self.previous.double()[keep]
        return {"prototypes": protos.float().cpu(), "prototype_counts": total.cpu()}


def _params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Fisher:
    """EWC's empirical Fisher: ``F <- alpha * g^2 + (1 - alpha) * F`` every iteration."""

    def __init__(self, model, prev: Mapping | None, alpha: float = 0.9) -> None:
        old = (prev or {}).get("fisher") or {}
        self.alpha = alpha
        self.fisher = {n: old[n].clone().to(p.device) if n in old else torch.ones_like(p) for n, p in _params(model).items()}

    def observe(self, features, labels) -> None:
        pass

    @torch.no_grad()
    def after_backward(self, model) -> None:
        pairs = [(self.fisher[n], p.grad) for n, p in _params(model).items() if p.grad is not None]
        if pairs:
            fisher, grads = map(list, zip(*pairs))
            torch._foreach_mul_(fisher, 1 - self.alpha)
            torch._foreach_addcmul_(fisher, grads, grads, value=self.alpha)

    def finalize(self, model) -> dict:
        return {"fisher": {n: f.cpu() for n, f in self.fisher.items()}}


class PathIntegral:
    """PI (synaptic intelligence): ``delta += g * (theta_prev - theta)`` each iteration; at the
    end ``score = relu(delta / ((theta - theta_start)^2 + 1e-20)) + previous score``."""

    def __init__(self, model, prev: Mapping | None) -> None:
        params = _params(model)
        self.start = {n: p.detach().clone() for n, p in params.items()}
        self.last = {n: p.detach().clone() for n, p in params.items()}
        self.delta = {n: torch.zeros_like(p) for n, p in params.items()}
        self.old_score = (prev or {}).get("pi") or {}

    def observe(self, features, labels) -> None:
        pass

    @torch.no_grad()
    def after_backward(self, model) -> None:
        items = [(n, p) for n, p in _params(model).items() if p.grad is not None]
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
        for n, p in _params(model).items():
            score = torch.relu(self.delta[n] / ((p.detach() - self.start[n]) ** 2 + 1e-20))
            if n in self.old_score:
                score = score + self.old_score[n].to(score.device)
            out[n] = score.cpu()
        return {"pi": out}


class RWalk:
    """RW (Riemannian walk): every ``interval`` iterations
    ``score += g * (theta_tmp - theta) / (0.5 * F * (theta - theta_tmp)^2 + 1e-8)``;
    the stored score is ``0.5 * (relu(score) + previous score)``. Needs the Fisher collector."""

    def __init__(self, model, prev: Mapping | None, fisher: Fisher, interval: int = 10) -> None:
        params = _params(model)
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
        items = [(n, p) for n, p in _params(model).items() if p.grad is not None]
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


def held_statistics(state: Mapping) -> frozenset[str]:
    """The statistics (names of :data:`csseg_core.methods.STATISTICS`) a state holds:
    ``state["collected"]``, or for states written before that key existed (and converted
    official checkpoints) what its ``statistics`` hold."""
    if "collected" in state:
        return frozenset(state["collected"])
    stats = state.get("statistics") or {}
    return frozenset(k for k in ("prototypes", "fisher", "pi", "rw") if k in stats)


def build_collectors(names, *, model, step: int, mode: str, num_classes: int, dim: int, prev: Mapping | None, device,
                     alpha: float = 0.9, gather: str = "pixel", sync_prototypes: bool = True) -> dict:
    """Collectors for ``names`` (a subset of :data:`csseg_core.methods.STATISTICS`; RW adds the Fisher);
    ``gather`` and ``sync_prototypes`` configure :class:`Prototypes`."""
    names = set(names)
    if "rw" in names:
        names.add("fisher")
    out: dict = {}
    if "prototypes" in names:
        has_prev = prev and "prototypes" in prev
        out["prototypes"] = Prototypes(num_classes, dim, step, mode, prev if has_prev else None, device,
                                       gather=gather, sync=sync_prototypes)
    if "fisher" in names:
        out["fisher"] = Fisher(model, prev, alpha)
    if "pi" in names:
        out["pi"] = PathIntegral(model, prev)
    if "rw" in names:
        out["rw"] = RWalk(model, prev, out["fisher"])
    return out
