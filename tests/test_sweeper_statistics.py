"""A sweep's shared step 0 collects the statistics of the sweep's method (one EWC trial, local Ray):
the Fisher only, and step 1 continues from it."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
from ray_fixtures import ray_session_fixture, tiny_voc_fixture  # noqa: F401  (session fixtures)

from csseg_core.state import load_state
from sweeper import SweepSpec, run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

TINY = {"epochs": 1, "epochs_incremental": 1, "crop_size": 48, "head_channels": 32, "num_samples": 0}


def test_ewc_sweep_step0_holds_the_fisher_only_and_step1_continues_from_it(tmp_path, tiny_voc):
    sweep_dir = run_sweep(SweepSpec(scenarios=("voc-19-1",), method="ewc", trials=1, concurrency=1,
                                    storage=str(tmp_path), name="ewc-stats", data_root=tiny_voc, overrides=TINY,
                                    max_failures=0, verbose=0, seed=0))
    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert [t["status"] for t in trials] == ["ok"], trials
    (state_file,) = (sweep_dir / "step0").glob("*.pt")
    state0 = load_state(state_file)
    assert state0["collected"] == ["fisher"] and set(state0["statistics"]) == {"fisher"}
    steps = {r["step"]: r for r in pq.read_table(sweep_dir / "steps.parquet").to_pylist()}
    # step 1 found the Fisher (EWC cannot start without it) and reports its penalty (0 while θ = θ_old)
    assert steps[1]["status"] == "ok" and steps[1]["loss_reg"] is not None and math.isfinite(steps[1]["loss_reg"])
