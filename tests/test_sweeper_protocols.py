"""Honest selection end to end (local Ray, 2 CPUs, tiny synthetic VOC):

* a ``--protocol first-step`` sweep runs step 1 only (from the shared step 0) and selects on
  the held-out validation split;
* ``export-best --top 2 --seeds 2`` re-runs both trials over two seeds (step 0 trained once per
  seed, the sweep's own step 0 reused) and picks the best mean on validation;
* ``csseg final --scenarios`` runs the choice on a class order the sweep never saw (GTEP) and
  writes ``final.parquet`` with validation and test mean ± std.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml
from ray_fixtures import ray_session_fixture, tiny_voc_fixture  # noqa: F401  (session fixtures)
from typer.testing import CliRunner

import cli
from search_spaces import LogUniform
from sweeper import SweepSpec, export_best, leaderboard, load_best, read_reeval, run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

TINY = {"epochs": 1, "epochs_incremental": 1, "crop_size": 48, "head_channels": 32, "num_samples": 0}


@pytest.fixture(scope="module")
def first_step(tmp_path_factory, tiny_voc):
    storage = tmp_path_factory.mktemp("sweeps")
    spec = SweepSpec(scenarios=("voc-15-1",), method="lwf", trials=2, concurrency=2, storage=str(storage),
                     name="first", data_root=tiny_voc, overrides=TINY, max_failures=0, verbose=0, seed=0,
                     protocol="first-step", space={"kd": LogUniform(1, 100)}, points=[{"kd": 100.0}, {"kd": 2.0}])
    return run_sweep(spec)


def test_first_step_protocol_runs_step_one_and_selects_on_validation(first_step):
    steps = pq.read_table(first_step / "steps.parquet").to_pylist()
    trials = pq.read_table(first_step / "trials.parquet").to_pylist()
    assert sorted({r["step"] for r in steps}) == [0, 1]  # voc-15-1 has 6 steps; only 0 and 1 ran
    assert all(t["status"] == "ok" and t["final_step"] == 1 and t["protocol"] == "first-step" for t in trials)
    for r in steps:  # validation and test side by side, every step
        assert 0.0 <= r["val_miou_all"] <= 1.0 and 0.0 <= r["miou_all"] <= 1.0 and r["val_fraction"] == 0.15
        assert len(r["val_class_iou"]) == len(r["class_iou"])
    board = leaderboard(first_step)
    assert board[0]["metric"] == "val_miou_all" and board[0]["select_on"] == "val"
    assert board[0]["val_miou_all"] >= board[1]["val_miou_all"]
    assert json.loads((first_step / "sweep.json").read_text())["identity"]["select_on"] == "val"


def test_export_top_seeds_reruns_and_picks_the_best_mean(first_step, tmp_path):
    out = export_best(first_step, None, tmp_path / "best.yaml", top=2, seeds=2)
    entry = yaml.safe_load(out.read_text())
    assert entry["selected_on"] == "val" and entry["metric"] == "val_miou_all" and entry["protocol"] == "first-step"
    assert entry["seeds"] == [0, 1] and set(entry["metrics_std"]) == set(entry["metrics"])
    summary = read_reeval(first_step)["cells"][0]
    means = [c["metrics"]["val_miou_all"] for c in summary["candidates"]]
    assert len(means) == 2 and means[0] >= means[1] and entry["trial_id"] == summary["best"]["trial_id"]
    for c in summary["candidates"]:
        values = c["seed_values"]["val_miou_all"]
        assert len(values) == 2 and c["metrics"]["val_miou_all"] == pytest.approx(sum(values) / 2)
    reeval_dir = next((first_step / "reeval").iterdir())
    rows = pq.read_table(reeval_dir / "trials.parquet").to_pylist()
    assert len(rows) == 4 and {r["seed"] for r in rows} == {0, 1} and all(r["final_step"] == 1 for r in rows)
    # step 0: seed 0 came from the sweep's own file, seed 1 was trained once for both candidates
    assert sum(r["step0_trained"] for r in rows) == 1
    assert load_best(out)[0]["params"]["kd"] in (100.0, 2.0)
    result = CliRunner().invoke(cli.app, ["results", str(first_step)])
    assert result.exit_code == 0 and "re-run over seeds" in result.output and "±" in result.output


def test_final_on_unseen_class_orders_writes_final_parquet(first_step, tiny_voc, tmp_path):
    best = export_best(first_step, None, tmp_path / "best.yaml")
    result = CliRunner().invoke(cli.app, ["final", str(best), "--seeds", "1", "--scenarios", "voc-15-1b",
                                          "--no-progress", "--out", str(tmp_path / "final")])
    assert result.exit_code == 0, result.output
    assert "(transfer)" in result.output and "± 0.0" in result.output
    [row] = pq.read_table(tmp_path / "final" / "final.parquet").to_pylist()
    assert row["scenario"] == "voc-15-1b" and row["tuned_on"] == "voc-15-1" and row["transfer"]
    assert row["selected_on"] == "val" and row["seeds"] == [0]
    for k in ("val_miou_all", "val_miou_old", "miou_all", "miou_old", "miou_new"):
        assert 0.0 <= row[f"{k}_mean"] <= 1.0 and row[f"{k}_std"] == 0.0
    steps = pq.read_table(tmp_path / "final" / "steps.parquet").to_pylist()
    assert sorted(r["step"] for r in steps) == list(range(6))  # final runs every step, whatever the protocol
