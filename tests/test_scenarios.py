"""Scenario table: class lists, aliases, lookup errors, label space helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csseg_core.errors import ConfigError
from csseg_core.scenarios import (
    ADE_CLASSES,
    MODES,
    NUM_FOREGROUND,
    VOC_CLASSES,
    Scenario,
    check_mode,
    get_scenario,
    list_scenarios,
)

#: Class ids per step of the reference implementations (SDR and PLOP ``tasks.py``), vendored
#: verbatim from the project's shared reference folder so the parity tests run everywhere.
REFERENCE = Path(__file__).parent / "data" / "scenarios.json"
SCENARIOS = list_scenarios()
IDS = [sc.name for sc in SCENARIOS]


def _reference() -> dict:
    return json.loads(REFERENCE.read_text())["tasks"]


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_matches_reference_json(sc: Scenario) -> None:
    ref = _reference()[sc.dataset][sc.task]
    assert [tuple(ref[str(i)]) for i in range(len(ref))] == list(sc.steps)


def test_every_reference_task_resolves() -> None:
    for dataset, tasks in _reference().items():
        for task, steps in tasks.items():
            sc = get_scenario(f"{dataset}-{task}")
            assert sc.dataset == dataset
            assert [tuple(steps[str(i)]) for i in range(len(steps))] == list(sc.steps)


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_structure(sc: Scenario) -> None:
    n_fg = NUM_FOREGROUND[sc.dataset]
    assert sc.name.startswith(f"{sc.dataset}-")
    assert 0 in sc.steps[0]
    assert all(0 not in s for s in sc.steps[1:])
    assert len(set(sc.order)) == len(sc.order), "steps must be disjoint"
    assert sorted(sc.order) == list(range(n_fg + 1)), "union must be all classes"
    assert sc.order[0] == 0
    assert sum(sc.classes_per_step) == n_fg + 1
    assert sc.num_classes(sc.num_steps - 1) == n_fg + 1
    for step in range(sc.num_steps):
        assert set(sc.labels(step)) == set(sc.steps[step]) - {0}
        assert set(sc.labels_old(step)) == set(c for s in sc.steps[:step] for c in s) - {0}
        assert sc.num_classes(step) == len(sc.labels_old(step)) + len(sc.labels(step)) + 1
    names = sc.class_names()
    assert len(names) == n_fg + 1 and names[0] in ("background", "other")
    assert get_scenario(sc.name) is sc
    for alias in sc.aliases:
        assert get_scenario(alias) is sc


def test_paper_names() -> None:
    sc = get_scenario("voc-15-1")
    assert sc.task == "15-5s" and sc.classes_per_step == (16, 1, 1, 1, 1, 1)
    assert sc.labels(2) == (17,) and sc.labels_old(2) == tuple(range(1, 17))
    assert sc.num_classes(0) == 16 and sc.num_classes(2) == 18
    assert get_scenario("voc-10-1").classes_per_step == (11,) + (1,) * 10
    assert get_scenario("ade-100-5").classes_per_step == (101,) + (5,) * 10
    assert get_scenario("ade-50-50").classes_per_step == (51, 50, 50)
    assert get_scenario("voc-offline").num_steps == 1


@pytest.mark.parametrize(
    "alias,name",
    [
        ("voc-15-5s", "voc-15-1"),
        ("VOC-15-1", "voc-15-1"),
        ("voc-10-10s", "voc-10-1"),
        ("voc-15-5s_b", "voc-15-1b"),
        ("voc-15-5s_w", "voc-15-1w"),
        ("ade-50", "ade-50-50"),
        ("ade-50b", "ade-50-50b"),
        ("ade-50c", "ade-50-50c"),
        (" Ade-100-50 ", "ade-100-50"),
    ],
)
def test_aliases(alias: str, name: str) -> None:
    assert get_scenario(alias).name == name


def test_unknown_name_lists_close_names() -> None:
    with pytest.raises(ConfigError) as err:
        get_scenario("voc-15-2")
    msg = str(err.value)
    assert "voc-15-2" in msg and "voc-15-1" in msg and "\n" not in msg
    with pytest.raises(ConfigError):
        get_scenario("cityscapes")


def test_class_names_follow_order() -> None:
    assert get_scenario("voc-15-1").class_names() == VOC_CLASSES
    b = get_scenario("voc-19-1b")
    assert b.class_names()[-1] == "bottle" and b.order.index(5) == 20
    assert len(ADE_CLASSES) == 151 and ADE_CLASSES[0] == "other" and ADE_CLASSES[1] == "wall"
    assert ADE_CLASSES[150] == "flag"


def test_steps_out_of_range() -> None:
    sc = get_scenario("voc-15-1")
    with pytest.raises(ConfigError, match="step 6"):
        sc.labels(6)
    with pytest.raises(ConfigError):
        sc.num_classes(-1)


def test_modes() -> None:
    assert MODES == ("disjoint", "overlapped", "sequential")
    assert check_mode("Overlapped") == "overlapped"
    with pytest.raises(ConfigError, match="overlap"):
        check_mode("overlap")
