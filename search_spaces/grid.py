"""Scenario grids: the cartesian product of scenarios × modes × seeds as frozen cells.

Each cell gets its own Optuna study and Tuner (``tune.grid_search`` cannot be combined with
``OptunaSearch``). Scenario names are canonicalised (``voc-15-5s`` -> ``voc-15-1``) and
duplicates removed, so a cell's name is stable.

Example:
    >>> [c.name for c in grid(["voc-15-1", "voc-19-1"], ["disjoint", "overlapped"])]
    ['voc-15-1-disjoint', 'voc-15-1-overlapped', 'voc-19-1-disjoint', 'voc-19-1-overlapped']
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from csseg_core.errors import ConfigError
from csseg_core.scenarios import check_mode, get_scenario


@dataclass(frozen=True)
class GridCell:
    """One point of the scenario grid.

    Attributes:
        scenario: canonical scenario name (e.g. ``voc-15-1``).
        mode: ``disjoint`` | ``overlapped`` | ``sequential``.
        seed: the seed of the cell's runs, or None to use the sweep's seed.
    """

    scenario: str
    mode: str = "disjoint"
    seed: int | None = None

    @property
    def name(self) -> str:
        """Stable name used for the Optuna study, the Tune experiment and the tables."""
        base = f"{self.scenario}-{self.mode}"
        return base if self.seed is None else f"{base}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def grid(scenarios: Sequence[str] | str, modes: Sequence[str] | str = ("disjoint",),
         seeds: Sequence[int | None] = (None,)) -> list[GridCell]:
    """Cartesian product ``scenarios × modes × seeds`` in that nesting order.

    Args:
        scenarios: scenario names or aliases (a comma-separated string is accepted).
        modes: modes (a comma-separated string is accepted).
        seeds: seeds of the cells; ``(None,)`` = one cell per (scenario, mode) using the sweep seed.

    Raises:
        ConfigError: an unknown scenario or mode, or an empty axis.
    """
    if isinstance(scenarios, str):
        scenarios = [s for s in scenarios.split(",") if s.strip()]
    if isinstance(modes, str):
        modes = [m for m in modes.split(",") if m.strip()]
    names = _unique(get_scenario(s.strip()).name for s in scenarios)
    mode_list = _unique(check_mode(m.strip()) for m in modes)
    seed_list = _unique(None if s is None else int(s) for s in seeds)
    for axis, values in (("scenarios", names), ("modes", mode_list), ("seeds", seed_list)):
        if not values:
            raise ConfigError(f"the scenario grid needs at least one value for {axis}")
    return [GridCell(s, m, seed) for s, m, seed in itertools.product(names, mode_list, seed_list)]
