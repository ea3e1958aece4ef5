"""ASHA end to end (local Ray, 2 CPUs, tiny synthetic VOC): a trial the scheduler stops is
``stopped`` in every table, never ``error``, and keeps the steps it finished.

voc-10-5-5 has steps 0..2, so ASHA (``time_attr="step"``, grace period 1, reduction factor 2)
has one rung at step 1. Two trials run one after the other: the preset SDR learning rate first
(val mIoU 0.05 at step 1 on this data), then ``lr_incremental=0.2``, which wrecks the model at
step 1 (val mIoU 0.0008, finite: no NaN) and is stopped there. When Tune stops a trial whose
driver is inside ``TorchTrainer.fit()``, the Train controller and workers die with the trial
actor and ``fit()`` may raise ``ActorDiedError`` in the driver: that must not turn the trial
into an error.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from ray_fixtures import ray_session_fixture, tiny_voc_fixture  # noqa: F401  (session fixtures)
from typer.testing import CliRunner

import cli
from search_spaces import LogUniform
from sweeper import SweepSpec, leaderboard, run_sweep
from sweeper.live import LiveView
from sweeper.tables import read_json, rows_dir

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

TINY = {"epochs": 1, "epochs_incremental": 1, "crop_size": 48, "head_channels": 32, "num_samples": 0}
GOOD, BAD = 0.0005, 0.2


@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory, tiny_voc):
    views = []
    real_init = LiveView.__init__

    def spy(self, progress, *args, **kwargs):  # keep the sweep's live view to read its final states
        real_init(self, progress, *args, **kwargs)
        views.append(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(LiveView, "__init__", spy)
    try:
        spec = SweepSpec(scenarios=("voc-10-5-5",), method="sdr", trials=2, concurrency=1, scheduler="asha",
                         storage=str(tmp_path_factory.mktemp("sweeps")), name="asha", data_root=tiny_voc,
                         overrides=TINY, max_failures=0, verbose=0, seed=0, space={"lr_incremental": LogUniform(1e-4, 1)},
                         points=[{"lr_incremental": GOOD}, {"lr_incremental": BAD}])
        sweep_dir = run_sweep(spec)
    finally:
        mp.undo()
    return sweep_dir, views[0].progress


def test_asha_stopped_trial_is_stopped_everywhere(asha_sweep):
    sweep_dir, progress = asha_sweep
    lr = {t: read_json(rows_dir(sweep_dir, t) / "meta.json")["hp"]["lr_incremental"] for t in progress.trials}
    trials = {lr[t["trial_id"]]: t for t in pq.read_table(sweep_dir / "trials.parquet").to_pylist()}
    assert set(trials) == {GOOD, BAD}, trials
    assert all(t["status"] in ("ok", "stopped") and t["error"] is None for t in trials.values()), trials
    good, bad = trials[GOOD], trials[BAD]
    assert good["status"] == "ok" and good["steps_done"] == 3 and good["final_step"] == 2
    assert bad["status"] == "stopped", bad
    # the stopped trial keeps the steps it finished (0 and 1; 2 too if it finished before the kill)
    steps = pq.read_table(sweep_dir / "steps.parquet").to_pylist()
    bad_steps = sorted((r["step"], r["status"]) for r in steps if r["trial_id"] == bad["trial_id"])
    assert bad_steps[:2] == [(0, "ok"), (1, "ok")] and all(s == "ok" for _, s in bad_steps), bad_steps
    assert bad["steps_done"] == len(bad_steps) and bad["final_step"] == bad_steps[-1][0]
    assert bad["val_miou_all"] < good["val_miou_all"]
    # the leaderboard (and `csseg results`) rank only trials that finished every step
    assert [r["trial_id"] for r in leaderboard(sweep_dir)] == [good["trial_id"]]
    out = CliRunner().invoke(cli.app, ["results", str(sweep_dir)])
    assert out.exit_code == 0, out.output
    assert "1 stopped" in out.output and "error" not in out.output, out.output
    # the live view saw the same ends
    states = {tid: row.state for tid, row in progress.trials.items()}
    assert states == {good["trial_id"]: "ok", bad["trial_id"]: "stopped"}, states
