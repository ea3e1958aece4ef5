"""End-to-end sweeps through ``run_sweep`` on a tiny synthetic VOC (local Ray, 2 CPUs).

Three real sweeps (each TorchTrainer launch costs ~15 s here; the Ctrl-C test fakes its cells):
* ``lwf_sweep``: 2 scenarios x 2 trials at concurrency 2 -> tables, step-0 once per cell,
  export/resolve, re-run and restore without re-running anything;
* the fault sweep: 2 workers per trial, one trial whose loss turns NaN at step 1 (LwF's teacher
  scale ``alpha`` infinite: the KD term is NaN, no test hook in the product; retried once from the
  cached step 0, then recorded as an error) and one healthy trial compared with csseg's own
  2-process DDP run of the same configuration;
* the throw-away method's 1-trial sweep: a method added as one module in the package runs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from ray_fixtures import ray_session_fixture, tiny_voc_fixture  # noqa: F401  (session fixtures)

from csseg_core.config import ExperimentConfig, resolve_config
from csseg_core.distributed import spawn
from csseg_core.errors import ConfigError
from csseg_core.results import read_rows
from csseg_core.scenario_run import run_scenario
from search_spaces import Choice, LogUniform
from sweeper import SweepSpec, best_config, export_best, leaderboard, load_best, run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

TINY = {"epochs": 1, "epochs_incremental": 1, "crop_size": 48, "head_channels": 32, "num_samples": 0}


def _spec(storage, data_root, **kw):
    base = dict(scenarios=("voc-19-1", "voc-15-5"), method="lwf", trials=2, concurrency=2, storage=str(storage),
                name="e2e", data_root=data_root, overrides=TINY, max_failures=0, verbose=0, seed=0)
    return SweepSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def lwf_sweep(tmp_path_factory, tiny_voc):
    storage = tmp_path_factory.mktemp("sweeps")
    started = time.perf_counter()
    sweep_dir = run_sweep(_spec(storage, tiny_voc))
    return sweep_dir, time.perf_counter() - started, storage


def test_sweep_writes_both_tables(lwf_sweep):
    sweep_dir, wall, _ = lwf_sweep
    steps = pq.read_table(sweep_dir / "steps.parquet").to_pylist()
    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert len(trials) == 2 * 2 and len(steps) == 2 * 2 * 2, (wall, trials)
    assert {(r["trial_id"], r["step"]) for r in steps} == {(t["trial_id"], s) for t in trials for s in (0, 1)}
    assert all(t["status"] == "ok" and t["error"] is None and t["steps_done"] == 2 for t in trials)
    assert {t["cell"] for t in trials} == {"voc-19-1-disjoint", "voc-15-5-disjoint"}
    for cell in ("voc-19-1-disjoint", "voc-15-5-disjoint"):
        kds = [t["param_kd"] for t in trials if t["cell"] == cell]
        assert 100.0 in kds and all(1 <= kd <= 100 for kd in kds)  # the preset is evaluated
    trial_cols = set(pq.read_schema(sweep_dir / "trials.parquet").names)
    assert {"sweep", "trial_id", "cell", "scenario", "mode", "method", "seed", "status", "error", "wall_s",
            "miou_all", "miou_old", "miou_new", "miou_avg", "val_miou_all", "val_miou_old", "val_miou_new",
            "val_miou_avg", "param_kd", "param_alpha", "step0_trained"} <= trial_cols
    step_cols = set(pq.read_schema(sweep_dir / "steps.parquet").names)
    assert {"step", "class_iou", "val_class_iou", "loss_ce", "loss_kd", "images_per_s", "cached", "status",
            "param_kd"} <= step_cols
    assert all(0.0 <= r["miou_all"] <= 1.0 and 0.0 <= r["val_miou_all"] <= 1.0 for r in steps)
    assert list((sweep_dir / "tb").rglob("events.out.tfevents.*")), "TensorBoard events live under the sweep dir"
    assert (sweep_dir / "optuna-voc-19-1-disjoint.log").exists()
    # one CPU worker per trial on one node: each trial trained in its Tune actor (Train's local mode),
    # keeping its own last-step state instead of Train checkpoints (sweeper.trial.trains_in_process)
    for t in trials:
        trained = sweep_dir / "train" / t["trial_id"]
        assert (trained / "last-step.pt").is_file() and not list(trained.glob("checkpoint_*")), t["trial_id"]


def test_step0_is_trained_once_per_cell_by_concurrent_trials(lwf_sweep):
    sweep_dir, _, _ = lwf_sweep
    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    for cell in ("voc-19-1-disjoint", "voc-15-5-disjoint"):
        assert sum(t["step0_trained"] for t in trials if t["cell"] == cell) == 1
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["status"] == "complete" and info["step0"]["trained"] == 2 and info["step0"]["reused"] == 2
    assert len(list((sweep_dir / "step0").glob("*.pt"))) == 2
    # one step-0 state per cell, so its concurrent trial waits: the trainer used both trials' CPUs
    steps = pq.read_table(sweep_dir / "steps.parquet").to_pylist()
    trained = [r for r in steps if r["step"] == 0 and r["step0_source"] == "trained"]
    assert len(trained) == 2 and all(r["step0_threads"] == 2 for r in trained), trained


def test_export_best_loads_with_resolve_config(lwf_sweep, tmp_path):
    sweep_dir, _, _ = lwf_sweep
    board = leaderboard(sweep_dir, "miou_all")
    assert [r["rank"] for r in board] == [1, 2, 1, 2] and {r["metric"] for r in board} == {"val_miou_all"}
    for cell in ("voc-19-1-disjoint", "voc-15-5-disjoint"):  # ranked on validation, never on test
        vals = [r["val_miou_all"] for r in board if r["cell"] == cell]
        assert vals == sorted(vals, reverse=True)
    out = export_best(sweep_dir, "miou_all", tmp_path / "best.yaml")
    doc = yaml.safe_load(out.read_text())
    assert [c["scenario"] for c in doc["cells"]] == ["voc-19-1", "voc-15-5"]
    for entry, best in zip(load_best(out), [r for r in board if r["rank"] == 1]):
        cfg = best_config(entry)
        assert cfg.method == "lwf" and cfg.mode == "disjoint" and cfg.crop_size == 48 and cfg.seed == 0
        assert cfg.method_params["kd"] == pytest.approx(best["kd"])
        assert entry["metrics"]["miou_all"] == pytest.approx(best["miou_all"])
        assert entry["metrics"]["val_miou_all"] == pytest.approx(best["val_miou_all"]) and entry["selected_on"] == "val"
        assert entry["command"] == f"csseg train {cfg.scenario} --method lwf --mode disjoint --config {out}"


def test_same_name_resumes_without_rerunning(lwf_sweep, tiny_voc):
    sweep_dir, _, storage = lwf_sweep
    before_steps = pq.read_table(sweep_dir / "steps.parquet").to_pylist()
    before_trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert run_sweep(_spec(storage, tiny_voc)) == sweep_dir  # every cell complete: skipped
    info = json.loads((sweep_dir / "sweep.json").read_text())
    info["cells_done"] = info["cells_done"][:1]  # pretend the sweep died during the second cell
    (sweep_dir / "sweep.json").write_text(json.dumps(info))
    run_sweep(_spec(storage, tiny_voc, resume=True, concurrency=1))  # restore that cell's Tuner
    assert pq.read_table(sweep_dir / "steps.parquet").to_pylist() == before_steps
    assert pq.read_table(sweep_dir / "trials.parquet").to_pylist() == before_trials
    assert json.loads((sweep_dir / "sweep.json").read_text())["step0"]["trained"] == 2
    with pytest.raises(ConfigError, match="different spec"):
        run_sweep(_spec(storage, tiny_voc, trials=3))
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_sweep(_spec(storage, tiny_voc, name="never-ran", resume=True))


class _Grid(list):
    """What Tune's fit() returns, reduced to what ``cell_finished`` reads."""

    def __init__(self, n: int, terminated: int, errors: int = 0) -> None:
        super().__init__(range(n))
        self.num_terminated, self.num_errors = terminated, errors


def test_a_cell_interrupted_by_ctrl_c_is_not_marked_done(tiny_voc, tmp_path, monkeypatch):
    """Ctrl-C makes Tune's fit() return with trials unfinished: the sweep stops (KeyboardInterrupt,
    the CLI's "rerun the same command to resume"), the cell stays undone, and the same command
    runs it again (restoring its Tune experiment) instead of skipping it."""
    import sweeper.sweep as sweep_module

    calls = []

    def fake_run_cell(plan, cell, concurrency):
        calls.append(cell.name)
        return _Grid(2, terminated=1) if len(calls) == 1 else _Grid(2, terminated=1, errors=1)

    monkeypatch.setattr(sweep_module, "run_cell", fake_run_cell)
    spec = _spec(tmp_path, tiny_voc, name="ctrlc", scenarios=("voc-19-1",))
    with pytest.raises(KeyboardInterrupt, match="1 of 2 trials ended"):
        run_sweep(spec)
    assert json.loads((tmp_path / "ctrlc" / "sweep.json").read_text())["cells_done"] == []
    run_sweep(spec)  # the same command: the cell runs again and now ends
    assert calls == ["voc-19-1-disjoint", "voc-19-1-disjoint"]
    assert json.loads((tmp_path / "ctrlc" / "sweep.json").read_text())["cells_done"] == ["voc-19-1-disjoint"]
    assert not sweep_module.cell_finished(_Grid(1, terminated=1), 2)  # fewer trials than the cell runs


def test_failing_trial_is_recorded_and_two_workers_match_local_ddp(tiny_voc, tmp_path, capsys, monkeypatch):
    spec = _spec(tmp_path, tiny_voc, name="faults", scenarios=("voc-19-1",), workers_per_trial=2, concurrency=None,
                 max_failures=1, space={"kd": LogUniform(1, 100), "alpha": Choice([1.0, math.inf])},
                 points=[{"kd": 100.0, "alpha": 1.0}, {"kd": 100.0, "alpha": math.inf}])
    sweep_dir = run_sweep(spec)
    trials = {t["trial_id"]: t for t in pq.read_table(sweep_dir / "trials.parquet").to_pylist()}
    assert sorted(t["status"] for t in trials.values()) == ["error", "ok"]
    bad = next(t for t in trials.values() if t["status"] == "error")
    assert "TrainingError" in bad["error"] and "nan" in bad["error"].lower()
    # the calm console (stdout is no terminal here): one plain line for the failure, with its log
    shown = [ln for ln in capsys.readouterr().out.splitlines() if f"{bad['trial_id']} error" in ln]
    assert len(shown) == 1 and "TrainingError" in shown[0], shown
    assert Path(shown[0].rsplit("(log: ", 1)[1].rstrip(")")).is_file(), shown
    assert "ERROR ray.tune" in (sweep_dir / "sweep.log").read_text()  # Tune's "Trials did not complete"
    steps = pq.read_table(sweep_dir / "steps.parquet").to_pylist()
    bad_steps = sorted((r["step"], r["status"]) for r in steps if r["trial_id"] == bad["trial_id"])
    assert bad_steps == [(0, "ok"), (1, "error")]
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["step0"]["trained"] == 1  # the retry reused the cached step 0
    # two DDP workers per trial: Ray Train's worker group and its checkpoints, not the in-process mode
    assert not list((sweep_dir / "train").rglob("last-step.pt"))
    assert list((sweep_dir / "train" / next(t["trial_id"] for t in trials.values() if t["status"] == "ok")).rglob("state.pt"))
    # Ray Train's 2-worker trial is csseg's own 2-process DDP run of the same configuration, step for step
    # (same shards, synchronised BatchNorm, one thread a rank); that run follows one process to 1e-7
    # (tests/test_engine.py::test_two_ddp_workers_train_like_one_process_on_the_same_global_batch)
    good = next(t for t in trials.values() if t["status"] == "ok")
    cfg = resolve_config("voc-19-1", "lwf", seed=0, data_root=tiny_voc,
                         overrides={**TINY, "kd": good["param_kd"], "alpha": good["param_alpha"]})
    monkeypatch.setenv("CSSEG_HOME", str(tmp_path / "home"))  # no shared step 0 of another test
    spawn(2, _local_ddp_run, cfg.to_dict(), str(tmp_path / "local"))
    local = read_rows(tmp_path / "local" / "steps.parquet")
    assert [r["step"] for r in local] == [0, 1]
    for row in local:
        ray_row = next(r for r in steps if r["trial_id"] == good["trial_id"] and r["step"] == row["step"])
        for metric in ("miou_all", "val_miou_all", "loss_ce"):
            assert ray_row[metric] == pytest.approx(row[metric], rel=1e-6, abs=1e-9), (row["step"], metric)


def _local_ddp_run(cfg_dict: dict, out: str) -> None:
    torch.set_num_threads(1)  # as a Ray Train worker with one CPU
    run_scenario(ExperimentConfig.from_dict(cfg_dict), out, progress=False)


def test_journal_holds_every_finished_trial_and_the_report_reads_it(lwf_sweep, tmp_path):
    """The Optuna journal (what optuna-dashboard and `csseg report` read) matches trials.parquet."""
    pytest.importorskip("plotly")
    pytest.importorskip("matplotlib")
    import optuna

    from sweeper.report import load_study, report

    sweep_dir, _, _ = lwf_sweep
    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    for cell in ("voc-19-1-disjoint", "voc-15-5-disjoint"):
        study = load_study(sweep_dir, cell)  # JournalStorage(JournalFileBackend(optuna-<cell>.log))
        done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        rows = [t for t in trials if t["cell"] == cell and t["status"] == "ok"]
        journal = [x for pair in sorted((t.params["kd"], t.values[0]) for t in done) for x in pair]
        table = [x for pair in sorted((r["param_kd"], r["val_miou_all"]) for r in rows) for x in pair]
        assert len(done) == len(rows) == 2 and journal == pytest.approx(table)
    out = report(sweep_dir, tmp_path / "report")
    assert out["figures"] >= 2 * 5 and len(out["pngs"]) == out["figures"]
    assert out["html"].read_text().count('class="plotly-graph-div"') == out["figures"]


@pytest.fixture
def throwaway_module():
    """The throw-away method of tests/test_methods.py written into the methods package and its space
    into search_spaces/ (removed afterwards): what a researcher adding a method does. The Ray
    workers import the package on their own, so the files must be where the package is."""
    import importlib
    import sys

    from test_methods import THROWAWAY_METHOD, THROWAWAY_SPACE

    import csseg_core.methods as M
    import search_spaces as S
    from csseg_core.methods import base

    files = {Path(M.__file__).parent / "throwaway_method.py": THROWAWAY_METHOD,
             Path(S.__file__).parent / "throwaway.py": THROWAWAY_SPACE}
    assert not any(path.exists() for path in files), "a throw-away module was left behind"
    registry = dict(base._REGISTRY)
    try:
        for path, text in files.items():
            path.write_text(text)
        importlib.invalidate_caches()
        yield "throwaway"
    finally:
        for path in files:
            path.unlink(missing_ok=True)
        for module in ("csseg_core.methods.throwaway_method", "search_spaces.throwaway"):
            sys.modules.pop(module, None)
        base._REGISTRY.clear()
        base._REGISTRY.update(registry)


def test_a_method_added_as_one_module_runs_in_a_sweep(throwaway_module, tiny_voc, tmp_path):
    """Nothing but the method's module and its space: the sweep plans it, its Ray workers import it,
    its preset is the first trial, and its loss term reaches steps.parquet."""
    spec = _spec(tmp_path, tiny_voc, name="throwaway", scenarios=("voc-19-1",), method=throwaway_module, trials=1,
                 concurrency=1)
    sweep_dir = run_sweep(spec)
    (trial,) = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert trial["status"] == "ok" and trial["method"] == "throwaway" and trial["param_hint"] == 3.0, trial
    step1 = next(r for r in pq.read_table(sweep_dir / "steps.parquet").to_pylist() if r["step"] == 1)
    assert step1["loss_hint_kd"] > 0 and step1["status"] == "ok"
