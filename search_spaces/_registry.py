"""Registry of the per-method search spaces (one data module per method)."""

from __future__ import annotations

import difflib
from types import ModuleType
from typing import Any

from csseg_core.errors import ConfigError

from . import cil, ewc, ft, ilt, lwf, lwf_mc, mib, pi, rw, sdr
from ._primitives import Param, check_point, check_space, iter_params

_MODULES: dict[str, ModuleType] = {
    "ft": ft, "lwf": lwf, "lwf-mc": lwf_mc, "ilt": ilt, "ewc": ewc, "pi": pi, "rw": rw,
    "mib": mib, "cil": cil, "sdr": sdr,
}


def list_spaces() -> list[str]:
    """Method names that have a search space (every registered method)."""
    return list(_MODULES)


def canonical(method: str) -> str:
    """Canonical method name (``MiB`` -> ``mib``, ``lwf_mc`` -> ``lwf-mc``); ConfigError if unknown."""
    key = method.strip().lower().replace("_", "-")
    if key not in _MODULES:
        close = difflib.get_close_matches(key, list(_MODULES), n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"no search space for method {method!r}{hint}; choose one of: {', '.join(_MODULES)}")
    return key


def get_space(method: str) -> dict[str, Param]:
    """The search space of ``method`` as a fresh dict ``{name: primitive}`` (empty for FT).

    Example:
        >>> sorted(get_space("ilt"))
        ['de', 'kd']
    """
    name = canonical(method)
    return check_space(_MODULES[name].SPACE, where=f"search_spaces/{name}")


def preset(method: str) -> dict[str, Any]:
    """The reference defaults of the searched hyperparameters (the first trial of every sweep).

    Example:
        >>> preset("mib")
        {'kd': 10.0}
    """
    name = canonical(method)
    return check_point(get_space(name), _MODULES[name].PRESET, where=f"preset of {name}")


def describe(method: str | None = None) -> list[dict[str, str]]:
    """Rows for a table of the spaces: ``method, param, distribution, range, preset``.

    Args:
        method: one method, or None for every method (FT gets one row saying it is empty).
    """
    rows = []
    for name in [canonical(method)] if method else list_spaces():
        space, point = get_space(name), preset(name)
        if not space:
            rows.append({"method": name, "param": "-", "distribution": "-",
                         "range": "empty: the sweep runs the preset over seeds", "preset": "-"})
        for param_name, param in iter_params(space):
            rows.append({"method": name, "param": param_name, "distribution": param.kind,
                         "range": param.describe(), "preset": f"{point[param_name]:g}"
                         if isinstance(point[param_name], float) else str(point[param_name])})
    return rows
