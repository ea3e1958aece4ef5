"""Converters from the neutral primitives to Ray Tune and Optuna (imported lazily)."""

from __future__ import annotations

from typing import Any, Mapping

from ._primitives import Choice, IntRange, LogUniform, Param, Uniform, check_space


def to_tune(space: Mapping[str, Param]) -> dict[str, Any]:
    """Ray Tune sampling objects (``tune.loguniform`` ...) for ``space``.

    Example:
        >>> from search_spaces import get_space, to_tune
        >>> type(to_tune(get_space("lwf"))["kd"]).__name__
        'Float'
    """
    from ray import tune

    out: dict[str, Any] = {}
    for name, p in check_space(space).items():
        if isinstance(p, LogUniform):
            out[name] = tune.loguniform(p.lo, p.hi)
        elif isinstance(p, Uniform):
            out[name] = tune.uniform(p.lo, p.hi)
        elif isinstance(p, IntRange):
            # Tune's upper bound is exclusive; ours is inclusive.
            out[name] = tune.lograndint(p.lo, p.hi + 1) if p.log else tune.randint(p.lo, p.hi + 1)
        elif isinstance(p, Choice):
            out[name] = tune.choice(list(p.options))
    return out


def to_optuna(space: Mapping[str, Param]) -> dict[str, Any]:
    """Optuna distributions (``FloatDistribution`` ...) for ``space`` (bounds included).

    Example:
        >>> from search_spaces import get_space, to_optuna
        >>> to_optuna(get_space("lwf"))["kd"].log
        True
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name, p in check_space(space).items():
        if isinstance(p, LogUniform):
            out[name] = FloatDistribution(p.lo, p.hi, log=True)
        elif isinstance(p, Uniform):
            out[name] = FloatDistribution(p.lo, p.hi)
        elif isinstance(p, IntRange):
            out[name] = IntDistribution(p.lo, p.hi, log=p.log)
        elif isinstance(p, Choice):
            out[name] = CategoricalDistribution(list(p.options))
    return out
