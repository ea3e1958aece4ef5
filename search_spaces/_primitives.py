"""Backend-neutral search-space primitives.

A search space is a plain ``dict`` mapping a hyperparameter name (a ``--set`` key of the
method) to one of the frozen primitives below. Converters to Ray Tune and Optuna live in
:mod:`search_spaces._convert`; nothing here imports either backend.

Example:
    >>> from search_spaces import LogUniform, Choice
    >>> space = {"kd": LogUniform(1, 100), "sparsity_kind": Choice(["ratio", "entropy"])}
    >>> space["kd"].contains(100.0), space["sparsity_kind"].describe()
    (True, 'ratio | entropy')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

from csseg_core.errors import ConfigError


def _check_bounds(kind: str, lo: float, hi: float, *, positive: bool = False) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ConfigError(f"{kind}({lo}, {hi}): needs finite bounds with lo < hi")
    if positive and lo <= 0:
        raise ConfigError(f"{kind}({lo}, {hi}): a log scale needs lo > 0")


@dataclass(frozen=True)
class LogUniform:
    """A float sampled uniformly in log space on ``[lo, hi]``."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))
        _check_bounds("LogUniform", self.lo, self.hi, positive=True)

    kind = "loguniform"

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in the range (bounds included)."""
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.lo <= value <= self.hi

    def describe(self) -> str:
        return f"{self.lo:g} .. {self.hi:g} (log)"


@dataclass(frozen=True)
class Uniform:
    """A float sampled uniformly on ``[lo, hi]``."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))
        _check_bounds("Uniform", self.lo, self.hi)

    kind = "uniform"

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.lo <= value <= self.hi

    def describe(self) -> str:
        return f"{self.lo:g} .. {self.hi:g}"


@dataclass(frozen=True)
class IntRange:
    """An integer in ``[lo, hi]`` (both included), optionally on a log scale."""

    lo: int
    hi: int
    log: bool = False

    def __post_init__(self) -> None:
        if int(self.lo) != self.lo or int(self.hi) != self.hi:
            raise ConfigError(f"IntRange({self.lo}, {self.hi}): bounds must be integers")
        object.__setattr__(self, "lo", int(self.lo))
        object.__setattr__(self, "hi", int(self.hi))
        _check_bounds("IntRange", self.lo, self.hi, positive=self.log)

    kind = "int"

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.lo <= value <= self.hi

    def describe(self) -> str:
        return f"{self.lo} .. {self.hi} (int{', log' if self.log else ''})"


@dataclass(frozen=True)
class Choice:
    """One of a fixed list of options (str, int, float, bool or None)."""

    options: tuple

    def __post_init__(self) -> None:
        options = tuple(self.options) if not isinstance(self.options, (str, bytes)) else (self.options,)
        if not options:
            raise ConfigError("Choice([]): needs at least one option")
        if len(set(map(repr, options))) != len(options):
            raise ConfigError(f"Choice({list(options)}): options must be distinct")
        for o in options:
            if o is not None and not isinstance(o, (str, int, float, bool)):
                raise ConfigError(f"Choice option {o!r}: only str, int, float, bool or None are allowed")
        object.__setattr__(self, "options", options)

    kind = "choice"

    def contains(self, value: Any) -> bool:
        return any(type(value) is type(o) and value == o for o in self.options)

    def describe(self) -> str:
        return " | ".join(str(o) for o in self.options)


Param = Union[LogUniform, Uniform, IntRange, Choice]
"""Any search-space primitive."""

PRIMITIVES = (LogUniform, Uniform, IntRange, Choice)


def check_space(space: Mapping[str, Param], *, where: str = "search space") -> dict[str, Param]:
    """Validate a space (names are strings, values are primitives) and return a copy."""
    out: dict[str, Param] = {}
    for name, param in space.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: parameter names must be non-empty strings (got {name!r})")
        if not isinstance(param, PRIMITIVES):
            raise ConfigError(f"{where}: {name!r} is {param!r}, not LogUniform/Uniform/IntRange/Choice")
        out[name] = param
    return out


def check_point(space: Mapping[str, Param], point: Mapping[str, Any], *, where: str = "point") -> dict[str, Any]:
    """Validate that ``point`` gives a value inside ``space`` for every key of the space."""
    missing = sorted(set(space) - set(point))
    if missing:
        raise ConfigError(f"{where} has no value for {', '.join(missing)}")
    for name, param in space.items():
        if not param.contains(point[name]):
            raise ConfigError(f"{where}: {name}={point[name]!r} is outside {param.describe()}")
    return {name: point[name] for name in space}


def param_to_dict(param: Param) -> dict[str, Any]:
    """JSON-friendly description of a primitive (used for sweep identity and sweep.json)."""
    if isinstance(param, Choice):
        return {"kind": "choice", "options": list(param.options)}
    if isinstance(param, IntRange):
        return {"kind": "int", "lo": param.lo, "hi": param.hi, "log": param.log}
    return {"kind": param.kind, "lo": param.lo, "hi": param.hi}


def param_from_dict(d: Mapping[str, Any]) -> Param:
    """Inverse of :func:`param_to_dict`."""
    kind = d.get("kind")
    if kind == "choice":
        return Choice(tuple(d["options"]))
    if kind == "int":
        return IntRange(d["lo"], d["hi"], bool(d.get("log", False)))
    if kind == "loguniform":
        return LogUniform(d["lo"], d["hi"])
    if kind == "uniform":
        return Uniform(d["lo"], d["hi"])
    raise ConfigError(f"unknown search-space primitive {kind!r}; use loguniform, uniform, int or choice")


def iter_params(space: Mapping[str, Param]) -> Iterable[tuple[str, Param]]:
    """``(name, param)`` pairs in a stable (sorted) order."""
    return sorted(space.items())
