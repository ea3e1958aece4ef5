"""The method contract and its registry.

A continual method is one small registered module: a frozen ``Params`` dataclass holding the
reference defaults, and a :class:`Method` subclass that says which loss terms it adds, which
parameter-space penalty it applies, which statistics the step must collect, and what to do
to the model before training (``setup``). The trainer sums the terms it gets and never
branches on a method's name.

Example:
    >>> from csseg_core.methods import build_method
    >>> m = build_method("sdr", {"kd": 10.0})
    >>> m.params.kd, m.params.pm
    (10.0, 0.01)
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from .. import losses as L
from ..collectors import closed_statistics
from ..errors import ConfigError


def required_statistics(methods=(), extra=()) -> tuple[str, ...]:
    """The statistics a step must collect so that every method of ``methods`` can continue from
    its state, plus ``extra`` (registered statistic names), closed under what each statistic
    needs, in registration order (:func:`csseg_core.collectors.closed_statistics`).

    Example:
        >>> required_statistics(["sdr", "rw"])
        ('prototypes', 'fisher', 'rw')
    """
    return closed_statistics({s for m in methods for s in get_method(m).collects} | set(extra))


def weight(default: float, *, term: str | None = None):
    """A ``Params`` field that weighs a loss term (``term``; default: the field's own name), e.g.
    ``kd: float = weight(10.0, term="unkd")``. At 0 the method adds no such term
    (:func:`weight_terms`; the contract tests derive what a method reduces to from these marks)."""
    return field(default=default, metadata={"weight": True, "term": term})


def weight_terms(name: str) -> dict[str, str]:
    """``{hyperparameter: loss term}`` of the weights of method ``name`` (see :func:`weight`).

    Example:
        >>> weight_terms("mib")
        {'kd': 'unkd'}
    """
    return {f.name: f.metadata.get("term") or f.name
            for f in dataclasses.fields(get_method(name).Params) if f.metadata.get("weight")}


@dataclass(frozen=True)
class NoParams:
    """A method without hyperparameters."""


@dataclass
class Batch:
    """One training batch: images, full-resolution targets and targets at feature resolution."""

    image: torch.Tensor
    target: torch.Tensor
    target_small: torch.Tensor


@dataclass
class Output:
    """What the model returns: logits (upsampled to the input) and the features methods use."""

    logits: torch.Tensor
    body: torch.Tensor
    pre_logits: torch.Tensor


@dataclass
class StepContext:
    """Everything a method may read during a step.

    ``n_old`` is the number of output channels of the previous step's model (background
    included), 0 at step 0. ``prev_statistics`` comes from the previous state;
    ``collectors`` are the live statistics of this step (e.g. SDR's running prototypes).
    ``feature_gather`` and ``attraction_reduce`` are the config's ``sdr_feature_gather`` and
    ``attraction_reduce`` (reference-compatibility switches of SDR's losses, docs/DEPARTURES.md §1–3).
    """

    step: int
    mode: str
    n_old: int
    num_classes: int
    model: torch.nn.Module
    old_model: torch.nn.Module | None
    prev_statistics: Mapping[str, Any]
    old_params: Mapping[str, torch.Tensor]
    collectors: Mapping[str, Any] = field(default_factory=dict)
    feature_gather: str = "pixel"
    attraction_reduce: str = "mean"


class Method:
    """Base class: plain cross-entropy on the current labels (that is FT)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    collects: ClassVar[tuple[str, ...]] = ()
    """Statistics this method needs from the previous step's state (every step of the method collects
    them; step 0 collects them when the method, or another one sharing that step 0, needs them)."""

    def __init__(self, params: Any) -> None:
        self.params = params

    def needs_old_model(self, step: int) -> bool:
        """Whether the step needs the frozen previous model's outputs."""
        return False

    def setup(self, ctx: StepContext) -> None:
        """Adjust the freshly loaded model before training (MiB's balanced init)."""

    def statistics_alpha(self) -> float:
        """EMA factor of the Fisher statistic the steps of this method collect (EWC/RW: ``reg_alpha``)."""
        return 0.9

    def classification(self, ctx: StepContext, batch: Batch, out: Output) -> dict[str, torch.Tensor]:
        return {"ce": L.cross_entropy(out.logits, batch.target)}

    def distillation(self, ctx: StepContext, batch: Batch, out: Output, old: Output | None) -> dict[str, torch.Tensor]:
        return {}

    def terms(self, ctx: StepContext, batch: Batch, out: Output, old: Output | None) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one iteration; the trainer sums them."""
        terms = self.classification(ctx, batch, out)
        if ctx.step > 0:
            terms.update(self.distillation(ctx, batch, out, old))
        return terms

    def penalty(self, ctx: StepContext) -> torch.Tensor | None:
        """A parameter-space regulariser, back-propagated after the main loss (EWC/PI/RW)."""
        return None


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry (duplicate names fail loudly)."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    if not (dataclasses.is_dataclass(cls.Params) and cls.Params.__dataclass_params__.frozen):
        raise TypeError(f"{cls.__name__}.Params must be a frozen dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Registered method names: FT (the lower bound) first, then alphabetical."""
    return sorted(_REGISTRY, key=lambda name: (name != "ft", name))


def canonical_method(name: str) -> str:
    """Lower-case canonical name (accepts the reference spellings MiB, LWF-MC, lwf_mc)."""
    key = name.strip().lower().replace("_", "-")
    if key not in _REGISTRY:  # a method module added since this process imported the package
        from . import discover

        discover()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint}; choose one of: {', '.join(_REGISTRY)}")
    return key


def get_method(name: str) -> type[Method]:
    """The registered class of ``name``."""
    return _REGISTRY[canonical_method(name)]


def method_defaults(name: str) -> dict[str, Any]:
    """Hyperparameters of ``name`` with their reference defaults."""
    return dataclasses.asdict(get_method(name).Params())


def build_method(name: str, params: Mapping[str, Any] | None = None) -> Method:
    """Instantiate ``name`` with ``params`` overriding its defaults (unknown keys fail)."""
    cls = get_method(name)
    params = dict(params or {})
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ConfigError(f"method {cls.name!r} has no hyperparameter {unknown[0]!r}; it has: {', '.join(sorted(fields)) or 'none'}")
    return cls(cls.Params(**params))
