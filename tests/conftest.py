"""Shared fixtures: an isolated $CSSEG_HOME and one small synthetic VOC dataset per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    """Contract of the declared markers: a test that starts Ray (asks for ``ray_session``) is marked
    ``ray``, so ``pytest -m "not ray"`` (and ``-m "not slow"``) really leaves Ray out."""
    unmarked = [item.nodeid for item in items
                if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError("tests that start Ray must carry @pytest.mark.ray: " + ", ".join(unmarked))


@pytest.fixture(scope="session", autouse=True)
def csseg_home(tmp_path_factory):
    """A private $CSSEG_HOME for the whole session (filter caches, synthetic data, shared step-0
    states), so tests never read or write the user's ~/.cache/csseg."""
    home = tmp_path_factory.mktemp("csseg_home")
    old = os.environ.get("CSSEG_HOME")
    os.environ["CSSEG_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("CSSEG_HOME", None)
    else:
        os.environ["CSSEG_HOME"] = old


@pytest.fixture(scope="session")
def voc_root(csseg_home):
    """A small synthetic VOC dataset (generated once per session)."""
    from csseg_core.data import synth

    return synth.generate(csseg_home / "voc-small", dataset="voc", n_train=400, n_val=120, size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_overrides():
    """Engine overrides that make a step take a second or two."""
    return {"epochs": 2, "epochs_incremental": 1, "crop_size": 64, "batch_size": 16, "head_channels": 32,
            "num_samples": 0}


@pytest.fixture(scope="session")
def micro_overrides(csseg_home, voc_root, tiny_overrides):
    """tiny_overrides + 1 epoch on a fixed 32-image train list per step of voc-15-5 (2 iterations)."""
    from csseg_core.data import build_datasets
    from csseg_core.scenarios import get_scenario

    idx = csseg_home / "micro-index-voc-15-5"
    if not (idx / "train-1.txt").is_file():
        idx.mkdir(parents=True, exist_ok=True)
        scenario = get_scenario("voc-15-5")
        for step in range(scenario.num_steps):
            train = build_datasets("voc", str(voc_root), scenario, "disjoint", step, crop_size=64, splits=("train",))["train"]
            tmp = idx / f".train-{step}.txt.tmp"
            tmp.write_text("\n".join(train.ids[:32]) + "\n")
            tmp.replace(idx / f"train-{step}.txt")
    return {**tiny_overrides, "epochs": 1, "epochs_incremental": 1, "index_dir": str(idx)}


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module's tests: 2 shared cores (no oversubscription when Ray or
    another process trains beside us) and stable float sums. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
