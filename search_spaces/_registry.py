"""Registry of the per-method search spaces: ``search_spaces/<method>.py`` (``lwf-mc`` ->
``lwf_mc.py``), found by name. A method without such a module has an empty space (a sweep runs
its preset over seeds); the preset is the method's own defaults (its ``Params``)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from csseg_core.methods import canonical_method, list_methods, method_defaults

from ._primitives import Param, check_point, check_space, iter_params


def _module(name: str) -> ModuleType | None:
    """``search_spaces/<name>.py``, or None when the method has none."""
    module = f"{__package__}.{name.replace('-', '_')}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            return None
        raise


def list_spaces() -> list[str]:
    """Method names that have a search space (every registered method; empty for some)."""
    return list_methods()


def canonical(method: str) -> str:
    """Canonical method name (``MiB`` -> ``mib``, ``lwf_mc`` -> ``lwf-mc``); ConfigError if unknown."""
    return canonical_method(method)


def get_space(method: str) -> dict[str, Param]:
    """The search space of ``method`` as a fresh dict ``{name: primitive}`` (empty for FT).

    Example:
        >>> sorted(get_space("ilt"))
        ['de', 'kd']
    """
    name = canonical(method)
    module = _module(name)
    return check_space(getattr(module, "SPACE", {}) if module else {}, where=f"search_spaces/{name}")


def preset(method: str) -> dict[str, Any]:
    """The reference defaults of the searched hyperparameters (the first trial of every sweep):
    the method's ``Params`` defaults, which must lie inside the space.

    Example:
        >>> preset("mib")
        {'kd': 10.0}
    """
    name = canonical(method)
    space, defaults = get_space(name), method_defaults(name)
    return check_point(space, {k: defaults[k] for k in space if k in defaults}, where=f"preset of {name}")


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
