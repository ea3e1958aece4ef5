"""Per-method search spaces and scenario grids, as data (backend neutral).

``search_spaces/<method>.py`` holds ``SPACE`` (name -> primitive), found by the method's name
(no module: an empty space). The preset, evaluated first in every sweep, is the method's own
reference defaults (its ``Params``). Convert at the edge with
:func:`to_tune` / :func:`to_optuna`; print with :func:`describe` (``csseg spaces [METHOD]``).

Example:
    >>> from search_spaces import get_space, preset, to_optuna, grid
    >>> sorted(get_space("sdr"))[:3]
    ['attraction', 'kd', 'pm']
    >>> preset("sdr")["kd"]
    100.0
    >>> len(grid(["voc-15-1", "voc-10-1"], ["disjoint", "overlapped"], seeds=[0, 1]))
    8
"""

from ._convert import to_optuna, to_tune
from ._primitives import (
    Choice,
    IntRange,
    LogUniform,
    Param,
    Uniform,
    check_point,
    check_space,
    param_from_dict,
    param_to_dict,
)
from ._registry import canonical, describe, get_space, list_spaces, preset
from .grid import GridCell, grid

__all__ = [
    "Choice", "GridCell", "IntRange", "LogUniform", "Param", "Uniform", "canonical", "check_point",
    "check_space", "describe", "get_space", "grid", "list_spaces", "param_from_dict", "param_to_dict",
    "preset", "to_optuna", "to_tune",
]
