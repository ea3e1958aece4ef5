"""Statistics a step collects for later steps, and their registry.

A statistic is registered (:func:`register_statistic`) by the method module that needs it: the EWC
Fisher in ``methods/ewc.py``, PI scores in ``methods/pi.py``, RW scores in ``methods/rw.py``; SDR's
class prototypes (:class:`Prototypes`, a generic running mean of features) here.

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

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from . import losses as L
from .errors import ConfigError


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


@dataclass(frozen=True)
class CollectorSpec:
    """What a statistic's factory may read to build its collector for one step."""

    model: Any
    step: int
    mode: str
    num_classes: int
    dim: int
    prev: Mapping | None
    device: Any
    alpha: float = 0.9
    """EMA factor of the Fisher (the method's ``statistics_alpha()``)."""
    gather: str = "pixel"
    sync_prototypes: bool = True


@dataclass(frozen=True)
class Statistic:
    name: str
    build: Callable[[CollectorSpec, Mapping[str, Any]], Any]
    """``build(spec, collectors built before it) -> collector``."""
    needs: tuple[str, ...] = ()


_STATISTICS: dict[str, Statistic] = {}


def register_statistic(name: str, build: Callable[[CollectorSpec, Mapping[str, Any]], Any], *,
                       needs: tuple[str, ...] = ()) -> None:
    """Register a statistic (by the method module that needs it). ``needs``: statistics it is
    computed from, registered before it (their collectors are built and updated before its own)."""
    if not name or name in _STATISTICS:
        raise ValueError(f"statistic name {name!r} is empty or registered twice")
    missing = [n for n in needs if n not in _STATISTICS]
    if missing:
        raise ValueError(f"statistic {name!r} needs {missing[0]!r}: register that one first")
    _STATISTICS[name] = Statistic(name, build, tuple(needs))


def statistic_names() -> tuple[str, ...]:
    """Registered statistics, in registration order (a statistic after those it needs)."""
    return tuple(_STATISTICS)


def closed_statistics(names) -> tuple[str, ...]:
    """``names`` plus the statistics they need, in registration order.

    Raises:
        ConfigError: an unknown statistic.
    """
    names = set(names)
    unknown = sorted(names - set(_STATISTICS))
    if unknown:
        raise ConfigError(f"unknown statistic {unknown[0]!r}; choose from: {', '.join(_STATISTICS)}")
    for name in reversed(list(_STATISTICS)):  # needs are registered first: one backward pass closes the set
        if name in names:
            names.update(_STATISTICS[name].needs)
    return tuple(n for n in _STATISTICS if n in names)


def held_statistics(state: Mapping) -> frozenset[str]:
    """The statistics (registered names) a state holds: ``state["collected"]``, or for states written
    before that key existed (and converted official checkpoints) what its ``statistics`` hold."""
    if "collected" in state:
        return frozenset(state["collected"])
    stats = state.get("statistics") or {}
    return frozenset(k for k in _STATISTICS if k in stats)


def build_collectors(names, *, model, step: int, mode: str, num_classes: int, dim: int, prev: Mapping | None, device,
                     alpha: float = 0.9, gather: str = "pixel", sync_prototypes: bool = True) -> dict:
    """Collectors for ``names`` and the statistics they need, each after those it needs (the order
    the engine updates them in); ``gather`` and ``sync_prototypes`` configure :class:`Prototypes`."""
    spec = CollectorSpec(model=model, step=step, mode=mode, num_classes=num_classes, dim=dim, prev=prev,
                         device=device, alpha=alpha, gather=gather, sync_prototypes=sync_prototypes)
    out: dict = {}
    for name in closed_statistics(names):
        out[name] = _STATISTICS[name].build(spec, out)
    return out


def _prototypes(spec: CollectorSpec, built: Mapping[str, Any]) -> Prototypes:
    has_prev = spec.prev and "prototypes" in spec.prev
    return Prototypes(spec.num_classes, spec.dim, spec.step, spec.mode, spec.prev if has_prev else None, spec.device,
                      gather=spec.gather, sync=spec.sync_prototypes)


register_statistic("prototypes", _prototypes)  # SDR's; the other statistics are registered by their methods
