"""Continual-segmentation scenarios as data: class ids per step, aliases, lookup.

A scenario is ``(dataset, task)``; the mode (disjoint / overlapped / sequential) is a separate
option (:data:`MODES`). Class lists follow the reference ``tasks.py`` of SDR and PLOP (see
``tests/data/scenarios.json``, checked by ``tests/test_scenarios.py``): standard orders are generated from ``(initial, increment)``,
only the shuffled orders (VOC ``19-1b``, PLOP ``15-5s_b..w``, ADE ``b``/``c``) are spelled out.

Model index space: the index of a class is its position in :attr:`Scenario.order`
(background first), the identity for the standard orders.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache

from csseg_core.errors import ConfigError

MODES = ("disjoint", "overlapped", "sequential")

VOC_CLASSES = tuple(
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor".split()
)

_ADE_NAMES = (
    "wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,"
    "earth,door,table,mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,"
    "mirror,rug,field,armchair,seat,fence,desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,"
    "box,column,signboard,chest of drawers,counter,sand,sink,skyscraper,fireplace,refrigerator,"
    "grandstand,path,stairs,runway,case,pool table,pillow,screen door,stairway,river,bridge,"
    "bookcase,blind,coffee table,toilet,flower,book,hill,bench,countertop,stove,palm,"
    "kitchen island,computer,swivel chair,boat,bar,arcade machine,hovel,bus,towel,light,truck,"
    "tower,chandelier,awning,streetlight,booth,television receiver,airplane,dirt track,apparel,"
    "pole,land,bannister,escalator,ottoman,bottle,buffet,poster,stage,van,ship,fountain,"
    "conveyer belt,canopy,washer,plaything,swimming pool,stool,barrel,basket,waterfall,tent,bag,"
    "minibike,cradle,oven,ball,food,step,tank,trade name,microwave,pot,animal,bicycle,lake,"
    "dishwasher,screen,blanket,sculpture,hood,sconce,vase,traffic light,tray,ashcan,fan,pier,"
    "crt screen,plate,monitor,bulletin board,shower,radiator,glass,clock,flag"
)
ADE_CLASSES = ("other",) + tuple(_ADE_NAMES.split(","))

#: Number of foreground classes per dataset (class ids 1..N; 0 = background / "other").
NUM_FOREGROUND = {"voc": 20, "ade": 150}
CLASS_NAMES = {"voc": VOC_CLASSES, "ade": ADE_CLASSES}

# PLOP's random VOC 15-1 orders: 15 step-0 classes (after background), then 5 single steps.
_PLOP_ORDERS = {
    "b": "12 9 20 7 15 8 14 16 5 19 4 1 13 2 11 17 3 6 18 10",
    "c": "13 19 15 17 9 8 5 20 4 3 10 11 18 16 7 12 14 6 1 2",
    "d": "15 3 2 12 14 18 20 16 11 1 19 8 10 7 17 6 5 13 9 4",
    "e": "7 5 3 9 13 12 14 19 10 2 1 4 16 8 17 15 18 6 11 20",
    "f": "7 13 5 11 9 2 15 12 14 3 20 1 16 4 18 8 6 10 19 17",
    "g": "7 5 9 1 15 18 14 3 20 10 4 19 11 17 16 12 8 6 2 13",
    "h": "12 9 19 6 4 10 5 18 14 15 16 3 8 7 11 13 2 20 17 1",
    "i": "13 10 15 8 7 19 4 3 16 12 14 11 5 20 6 2 18 9 17 1",
    "j": "1 14 9 5 2 15 8 20 6 16 18 7 11 10 19 3 4 17 12 13",
    "k": "16 13 1 11 12 18 6 14 5 3 7 9 20 19 15 4 2 10 8 17",
    "l": "10 7 6 19 16 8 17 1 14 4 9 3 15 11 12 2 18 20 13 5",
    "m": "18 4 14 17 12 10 7 3 9 1 8 15 6 13 2 5 11 20 16 19",
    "n": "5 4 13 18 14 10 19 15 7 9 3 2 8 16 20 1 12 11 6 17",
    "o": "9 12 13 18 7 1 15 17 10 8 4 5 20 16 6 14 19 11 2 3",
    "p": "9 12 13 18 2 11 15 17 10 8 4 5 20 16 6 14 19 1 7 3",
    "q": "3 14 13 18 2 11 15 17 10 8 4 5 20 16 6 12 19 1 7 9",
    "r": "3 14 13 1 2 11 15 17 7 8 4 5 9 16 19 12 6 18 10 20",
    "s": "3 14 6 1 2 11 12 17 7 20 4 5 9 16 19 15 13 18 10 8",
    "t": "3 15 13 1 2 11 18 17 7 20 8 5 9 16 19 14 6 12 10 4",
    "u": "3 15 13 14 6 11 18 17 7 20 8 4 9 16 10 1 2 12 19 5",
    "v": "1 2 12 14 6 19 18 17 5 20 8 4 9 16 10 3 15 13 11 7",
    "w": "1 2 12 14 13 19 18 7 11 20 8 4 9 16 10 3 15 6 5 17",
}

# ADE class orders "b" and "c" (MiB/SDR tasks.py) as one permutation of 1..150: classes
# [0:50] and [50:100] are the two 50-class blocks of 50-50, [100:150] holds the 10-class
# chunks of 100-10 in step order. Every step's list is sorted, as in the reference.
_ADE_ORDERS = {
    "b": "1 9 14 18 22 24 25 27 28 29 32 38 42 45 46 47 48 49 54 56 58 61 62 63 69 74 75 76 77 "
    "81 82 84 90 93 96 100 103 104 109 117 119 121 123 128 129 130 134 135 136 144 "
    "3 5 6 8 10 12 13 19 21 23 26 31 33 34 36 39 40 43 44 53 55 57 60 70 71 80 86 87 91 "
    "95 99 101 105 106 107 113 116 120 125 126 131 132 133 140 142 143 147 148 149 150 "
    "11 16 50 64 66 73 89 92 145 146 30 37 51 52 72 85 98 114 115 138 2 35 65 97 110 111 "
    "112 118 124 141 4 7 15 41 67 78 79 88 108 139 17 20 59 68 83 94 102 122 127 137",
    "c": "5 10 11 12 13 16 17 19 20 23 27 28 30 31 32 33 37 43 46 52 56 57 65 66 69 70 74 76 77 "
    "79 82 83 86 87 105 109 110 111 119 128 129 132 133 134 138 142 143 144 146 147 "
    "1 6 8 9 14 24 25 26 29 34 35 36 40 41 44 45 48 50 54 61 63 67 68 71 78 81 84 85 90 "
    "94 95 96 97 98 99 102 106 112 114 115 118 120 121 123 124 126 135 136 139 149 "
    "3 4 7 18 39 64 73 101 113 137 47 51 55 60 62 80 116 127 140 148 22 42 49 58 59 89 91 "
    "92 108 125 2 38 53 100 104 117 130 131 141 145 15 21 72 75 88 93 103 107 122 150",
}


@dataclass(frozen=True)
class Scenario:
    """One class-incremental scenario: the dataset class ids learnt at every step.

    Attributes:
        name: Canonical name ``<dataset>-<task>``, e.g. ``"voc-15-1"``.
        dataset: ``"voc"`` or ``"ade"``.
        task: Reference task key (``tasks.py``), e.g. ``"15-5s"``.
        steps: Dataset class ids per step; step 0 includes background 0.
        aliases: Other accepted names (lower case).
    """

    name: str
    dataset: str
    task: str
    steps: tuple[tuple[int, ...], ...]
    aliases: tuple[str, ...] = ()

    @property
    def num_steps(self) -> int:
        """Number of learning steps (1 for offline)."""
        return len(self.steps)

    @property
    def order(self) -> tuple[int, ...]:
        """Dataset class ids in learning order; position = model index."""
        return tuple(c for step in self.steps for c in step)

    @property
    def classes_per_step(self) -> tuple[int, ...]:
        """Number of model outputs added at every step (step 0 counts background)."""
        return tuple(len(s) for s in self.steps)

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise ConfigError(
                f"step {step} is out of range for scenario {self.name} "
                f"(valid steps: 0..{self.num_steps - 1})"
            )

    def labels(self, step: int) -> tuple[int, ...]:
        """Dataset class ids learnt at ``step``, background removed.

        Args:
            step: Step index.

        Returns:
            The current classes.
        """
        self._check_step(step)
        return tuple(c for c in self.steps[step] if c != 0)

    def labels_old(self, step: int) -> tuple[int, ...]:
        """Dataset class ids learnt before ``step``, background removed.

        Args:
            step: Step index.

        Returns:
            The old classes (empty at step 0).
        """
        self._check_step(step)
        return tuple(c for s in self.steps[:step] for c in s if c != 0)

    def num_classes(self, step: int) -> int:
        """Number of classes seen up to and including ``step`` (background included).

        Args:
            step: Step index.

        Returns:
            The number of model outputs after ``step``.
        """
        self._check_step(step)
        return sum(self.classes_per_step[: step + 1])

    def class_names(self) -> tuple[str, ...]:
        """Dataset class names in model index order (``order``)."""
        names = CLASS_NAMES[self.dataset]
        return tuple(names[c] for c in self.order)


def _standard(n_fg: int, initial: int, increment: int) -> tuple[tuple[int, ...], ...]:
    steps = [tuple(range(initial + 1))]
    for start in range(initial + 1, n_fg + 1, increment):
        steps.append(tuple(range(start, min(start + increment, n_fg + 1))))
    return tuple(steps)


def _from_order(order: list[int], sizes: list[int]) -> tuple[tuple[int, ...], ...]:
    steps, pos = [], 0
    for i, size in enumerate(sizes):
        chunk = sorted(order[pos : pos + size])
        steps.append(tuple([0] + chunk) if i == 0 else tuple(chunk))
        pos += size
    return tuple(steps)


def _build_table() -> tuple[Scenario, ...]:
    table: list[Scenario] = []

    def add(name: str, task: str, steps, aliases=()) -> None:
        dataset = name.split("-", 1)[0]
        table.append(Scenario(name, dataset, task, tuple(tuple(s) for s in steps), tuple(aliases)))

    # VOC (SDR tasks.py; PLOP 10-1 = 10-10s).
    add("voc-offline", "offline", _standard(20, 20, 1))
    add("voc-19-1", "19-1", _standard(20, 19, 1))
    add("voc-19-1b", "19-1b", (tuple(c for c in range(21) if c != 5), (5,)))
    add("voc-15-5", "15-5", _standard(20, 15, 5))
    add("voc-15-1", "15-5s", _standard(20, 15, 1), ("voc-15-5s",))
    add("voc-10-10", "10-10", _standard(20, 10, 10))
    add("voc-10-1", "10-10s", _standard(20, 10, 1), ("voc-10-10s",))
    add("voc-10-5-5", "10-5-5", _standard(20, 10, 5))
    for key, text in _PLOP_ORDERS.items():
        order = [int(c) for c in text.split()]
        steps = [(0, *order[:15])] + [(c,) for c in order[15:]]
        add(f"voc-15-1{key}", f"15-5s_{key}", steps, (f"voc-15-5s_{key}",))
    # ADE (SDR/MiB tasks.py; PLOP adds 100-5).
    add("ade-offline", "offline", _standard(150, 150, 1))
    add("ade-100-50", "100-50", _standard(150, 100, 50))
    add("ade-100-10", "100-10", _standard(150, 100, 10))
    add("ade-100-5", "100-5", _standard(150, 100, 5))
    add("ade-50-50", "50", _standard(150, 50, 50), ("ade-50",))
    for key, text in _ADE_ORDERS.items():
        order = [int(c) for c in text.split()]
        add(f"ade-100-50{key}", f"100-50{key}", _from_order(order, [100, 50]))
        add(f"ade-100-10{key}", f"100-10{key}", _from_order(order, [100] + [10] * 5))
        add(f"ade-50-50{key}", f"50{key}", _from_order(order, [50, 50, 50]), (f"ade-50{key}",))
    return tuple(table)


SCENARIOS: tuple[Scenario, ...] = _build_table()


@lru_cache(maxsize=1)
def _lookup() -> dict[str, Scenario]:
    table: dict[str, Scenario] = {}
    for sc in SCENARIOS:
        for key in (sc.name, *sc.aliases):
            table[key.lower()] = sc
    return table


def list_scenarios() -> list[Scenario]:
    """All scenarios, in table order (VOC first)."""
    return list(SCENARIOS)


def get_scenario(name: str) -> Scenario:
    """Look a scenario up by canonical name or alias (case-insensitive).

    Args:
        name: E.g. ``"voc-15-1"`` or the legacy ``"voc-15-5s"``.

    Returns:
        The scenario.

    Raises:
        ConfigError: Unknown name; the message lists the closest valid names.
    """
    if isinstance(name, Scenario):
        return name
    key = str(name).strip().lower()
    table = _lookup()
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "run `csseg scenarios` for the list"
    raise ConfigError(f"unknown scenario {name!r}; {hint}")


def check_mode(mode: str) -> str:
    """Validate a mode name.

    Args:
        mode: One of :data:`MODES` (case-insensitive).

    Returns:
        The mode in lower case.

    Raises:
        ConfigError: Unknown mode.
    """
    m = str(mode).strip().lower()
    if m not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return m
