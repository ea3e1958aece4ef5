"""Sweeper pieces that need no Ray: spec validation, tables, leaderboard and export."""

from __future__ import annotations

import json
import math
import os

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from csseg_core.config import resolve_config
from csseg_core.errors import ConfigError
from csseg_core.results import step_row
from search_spaces import Choice, LogUniform
from sweeper import SweepSpec, best_config, export_best, leaderboard, load_best, pareto_front, plan_sweep
from sweeper.tables import STEPS, TRIALS, merge_trial, read_table, rows_dir, write_json, write_step_fragment


# ---------------------------------------------------------------------------- spec
def test_spec_name_is_a_hash_of_identity_not_resources(tmp_path):
    a = plan_sweep(SweepSpec(scenarios="voc-15-1", method="sdr", trials=5, storage=str(tmp_path)))
    b = plan_sweep(SweepSpec(scenarios=["voc-15-5s"], method="SDR", trials=5, storage=str(tmp_path),
                             concurrency=3, workers_per_trial=2, address="auto"))
    c = plan_sweep(SweepSpec(scenarios="voc-15-1", method="sdr", trials=6, storage=str(tmp_path)))
    assert a.name == b.name and a.name.startswith("sdr-") and a.name != c.name
    assert a.sweep_dir == tmp_path / a.name
    assert a.points == ({"kd": 100.0, "pm": 0.01, "attraction": 1e-3, "repulsion": 1e-3, "sparsity": 1e-3,
                         "sparsity_norm": "max_maskedforclass", "sparsity_shrink": "exponential",
                         "sparsity_kind": "ratio"},)


@pytest.mark.parametrize("kwargs, match", [
    ({"metric": "miou_best"}, "unknown metric"),
    ({"scheduler": "hyperband"}, "unknown scheduler"),
    ({"trials": 0}, "trials must be"),
    ({"method": "sdrr"}, "did you mean"),
    ({"scenarios": "voc-15-2"}, "unknown scenario"),
    ({"modes": "sideways"}, "unknown mode"),
    ({"overrides": {"kdd": 1}}, "unknown key"),
    ({"workers_per_trial": 0}, "workers_per_trial"),
    ({"objectives": ("old", "newest")}, "unknown metric"),
    ({"name": "a b"}, "sweep name"),
    ({"select_on": "train"}, "--select-on"),
    ({"protocol": "first-task"}, "unknown protocol"),
    ({"metric": "val_miou_all", "select_on": "test"}, "validation metric"),
    ({"overrides": {"val_fraction": 0}}, "val_fraction=0"),
    ({"overrides": {"val_fraction": 1.5}}, "val_fraction"),
    ({"only_points": True}, "only_points"),
    ({"scheduler": "asha", "dashboard": False}, "asha needs the Ray dashboard.*drop --no-dashboard"),
])
def test_spec_validation_is_one_line(tmp_path, monkeypatch, kwargs, match):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # asha + --no-dashboard is refused only for a Ray the sweep starts
    spec = SweepSpec(**{"scenarios": "voc-15-1", "method": "sdr", "storage": str(tmp_path), **kwargs})
    with pytest.raises(ConfigError, match=match) as err:
        plan_sweep(spec)
    assert "\n" not in str(err.value)


def test_asha_without_dashboard_is_allowed_on_a_cluster_someone_else_started(tmp_path, monkeypatch):
    """The dashboard is the joined cluster's business (--address or RAY_ADDRESS), not the sweep's."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = {"scenarios": "voc-15-1", "method": "sdr", "storage": str(tmp_path), "scheduler": "asha", "dashboard": False}
    plan_sweep(SweepSpec(**base, address="127.0.0.1:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    plan_sweep(SweepSpec(**base))


def test_a_failed_first_ray_start_is_shut_down_before_the_start_without_dashboard(tmp_path, monkeypatch):
    """Ray without its dashboard extras fails the first ``ray.init``: whatever that start left
    running is shut down before Ray starts again without the dashboard (no Ray is started here)."""
    from types import SimpleNamespace

    from sweeper import ray_session

    calls: list[str] = []

    def init(include_dashboard, **kwargs):
        calls.append(f"init dashboard={include_dashboard}")
        if include_dashboard:
            raise RuntimeError("dashboard failed")
        return SimpleNamespace(address_info={}, dashboard_url=None)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_session.ray, "init", init)
    monkeypatch.setattr(ray_session.ray, "shutdown", lambda: calls.append("shutdown"))
    own, url = ray_session.init_ray(SweepSpec(scenarios="voc-15-1", storage=str(tmp_path)))
    assert (own, url) == (True, None)
    assert calls == ["init dashboard=True", "shutdown", "init dashboard=False"]


def test_unwritable_storage_names_the_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'file'} is not writable"):
        plan_sweep(SweepSpec(scenarios="voc-15-1", storage=str(tmp_path / "file")))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(ConfigError, match=str(locked)):
            plan_sweep(SweepSpec(scenarios="voc-15-1", storage=str(locked / "sub")))
    finally:
        locked.chmod(0o700)


def test_overrides_pin_keys_and_objectives_normalise(tmp_path):
    plan = plan_sweep(SweepSpec(scenarios="voc-15-1", method="sdr", storage=str(tmp_path),
                                overrides={"kd": 10, "epochs": 1}, objectives="old,new"))
    assert "kd" not in plan.space and "kd" not in plan.points[0]
    assert plan.objectives == ("val_miou_old", "val_miou_new") and plan.multi_objective
    assert plan_sweep(SweepSpec(scenarios="voc-15-1", storage=str(tmp_path), metric="miou_new")).metric == "val_miou_new"
    on_test = plan_sweep(SweepSpec(scenarios="voc-15-1", storage=str(tmp_path), select_on="test"))
    assert on_test.metric == "miou_all" and on_test.name != plan_sweep(SweepSpec(scenarios="voc-15-1",
                                                                                 storage=str(tmp_path))).name
    ft = plan_sweep(SweepSpec(scenarios="voc-15-1", method="ft", storage=str(tmp_path)))
    assert ft.space == {} and ft.points == ()
    custom = plan_sweep(SweepSpec(scenarios="voc-19-1", method="lwf", storage=str(tmp_path),
                                  space={"kd": LogUniform(1, 10), "grad_clip_incremental": Choice([0.0, 3.0])},
                                  points=[{"kd": 2.0, "grad_clip_incremental": 0.0}]))
    assert custom.points == ({"grad_clip_incremental": 0.0, "kd": 2.0},)
    with pytest.raises(ConfigError, match="outside"):
        plan_sweep(SweepSpec(scenarios="voc-19-1", method="lwf", storage=str(tmp_path),
                             space={"kd": LogUniform(1, 10)}, points=[{"kd": 50.0}]))


def test_size_concurrency():
    from sweeper import size_concurrency

    spec = SweepSpec(scenarios="voc-15-1", trials=8)
    assert size_concurrency(spec, {"CPU": 2.0}) == 2
    assert size_concurrency(SweepSpec(scenarios="voc-15-1", trials=1), {"CPU": 16.0}) == 1
    assert size_concurrency(SweepSpec(scenarios="voc-15-1", trials=8, workers_per_trial=2), {"CPU": 2.0}) == 1
    assert size_concurrency(SweepSpec(scenarios="voc-15-1", trials=8, gpus_per_worker=1),
                            {"CPU": 16.0, "GPU": 4.0}) == 4
    assert size_concurrency(SweepSpec(scenarios="voc-15-1", trials=8, concurrency=1), {"CPU": 8.0}) == 1
    with pytest.raises(ConfigError, match="cluster has"):
        size_concurrency(SweepSpec(scenarios="voc-15-1", gpus_per_worker=1), {"CPU": 2.0})


def test_train_env_speeds_up_trials_and_yields_to_the_user(monkeypatch):
    from sweeper.ray_session import HEALTH_CHECK_INTERVAL_S, train_env

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    assert train_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_INTERVAL_S,
                           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert float(HEALTH_CHECK_INTERVAL_S) < 2.0  # faster than Ray Train's default poll
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in train_env(local=False)  # a real cluster keeps Ray's default
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert train_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}


def test_a_local_ray_starts_on_the_address_its_workers_are_told(monkeypatch):
    """Ray Train's PlacementGroupCleaner must find *this* cluster when other Ray instances run on the
    machine (else an ASHA-stopped trial's CPU is never freed): the GCS port is pinned and passed on."""
    import ray

    from sweeper import ray_session

    seen = []

    def fake_init(**kwargs):
        port = os.environ.get("RAY_GCS_SERVER_PORT")
        seen.append((port, kwargs["runtime_env"]["env_vars"]["RAY_ADDRESS"]))
        return type("Ctx", (), {"address_info": {"gcs_address": kwargs["runtime_env"]["env_vars"]["RAY_ADDRESS"]},
                                "dashboard_url": None})()

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_GCS_SERVER_PORT", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    assert ray_session.init_ray(SweepSpec(scenarios="voc-15-1", dashboard=False)) == (True, None)
    (port, address), = seen
    assert port and address.endswith(f":{port}") and "RAY_GCS_SERVER_PORT" not in os.environ  # restored
    monkeypatch.setenv("RAY_GCS_SERVER_PORT", "6390")  # the user's port wins
    ray_session.init_ray(SweepSpec(scenarios="voc-15-1", dashboard=False))
    assert seen[-1][0] == "6390" and seen[-1][1].endswith(":6390") and os.environ["RAY_GCS_SERVER_PORT"] == "6390"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # ray.init joins that cluster: nothing pinned
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw["runtime_env"]["env_vars"].get("RAY_ADDRESS")) or None)
    ray_session.init_ray(SweepSpec(scenarios="voc-15-1", dashboard=False))
    assert seen[-1] is None


# ---------------------------------------------------------------------------- fake sweep
def _fake_trial(sweep_dir, cell_scenario, trial_id, kd, finals, *, fail_at=None, val=None):
    """``finals`` = test (all, old, new); ``val`` = validation (all, old, new), default = test."""
    val = val or finals
    cfg = resolve_config(cell_scenario, "lwf", profile="smoke", mode="disjoint", seed=0,
                         overrides={"kd": kd, "epochs": 1})
    cell = f"{cell_scenario}-disjoint"
    write_json(rows_dir(sweep_dir, trial_id) / "meta.json", {
        "sweep": "fake", "cell": cell, "trial_id": trial_id, "scenario": cfg.scenario, "mode": cfg.mode,
        "method": cfg.method, "profile": cfg.profile, "seed": cfg.seed, "num_steps": cfg.num_steps,
        "hp": {"kd": kd}, "params": cfg.method_params, "config": cfg.to_dict()})
    extra = {"sweep": "fake", "trial_id": trial_id, "cell": cell, "error": None}
    for step in range(cfg.num_steps):
        if step == fail_at:
            write_step_fragment(sweep_dir, trial_id, step_row(cfg, {"step": step}, status="error",
                                                              **{**extra, "error": "TrainingError: NaN"}))
            write_json(rows_dir(sweep_dir, trial_id) / "trial.json", {"status": "error", "error": "TrainingError: NaN"})
            return cell
        m = {"step": step, "miou_all": finals[0], "miou_old": finals[1], "miou_new": finals[2] if step else math.nan,
             "miou_avg": finals[0], "class_iou": [0.5, math.nan, 0.25], "losses": {"ce": 0.1, "kd": 0.2},
             "val_miou_all": val[0], "val_miou_old": val[1], "val_miou_new": val[2] if step else math.nan,
             "val_miou_avg": val[0], "val_class_iou": [0.4, math.nan, 0.2],
             "wall_s": 1.0, "images_per_s": 10.0, "n_train_images": 5}
        write_step_fragment(sweep_dir, trial_id, step_row(cfg, m, status="ok", cached=step == 0, **extra))
    write_json(rows_dir(sweep_dir, trial_id) / "trial.json", {"status": "ok", "error": None, "wall_s": 3.0})
    return cell


@pytest.fixture
def fake_sweep(tmp_path):
    d = tmp_path / "fake"
    identity = {"metric": "val_miou_all", "objectives": [], "overrides": {"epochs": 1}, "select_on": "val",
                "space": {"kd": {"kind": "loguniform", "lo": 1, "hi": 100}}, "data_root": None}
    write_json(d / "sweep.json", {"name": "fake", "identity": identity})
    # t2 is best on test, t1 on validation: selection must follow validation
    _fake_trial(d, "voc-19-1", "t1", 100.0, (0.5, 0.6, 0.1), val=(0.8, 0.7, 0.2))
    _fake_trial(d, "voc-19-1", "t2", 10.0, (0.7, 0.5, 0.3), val=(0.6, 0.4, 0.3))
    _fake_trial(d, "voc-19-1", "t3", 3.0, (0.0, 0.0, 0.0), fail_at=1)
    _fake_trial(d, "voc-15-5", "t4", 20.0, (0.4, 0.45, 0.2))
    for t in ("t1", "t2", "t3", "t4"):
        merge_trial(d, t)
    return d


def test_tables_have_one_row_per_trial_and_step(fake_sweep):
    steps, trials = read_table(fake_sweep, STEPS), read_table(fake_sweep, TRIALS)
    assert len(trials) == 4 and len(steps) == 2 + 2 + 2 + 2
    merge_trial(fake_sweep, "t1")  # idempotent: merging again never duplicates
    merge_trial(fake_sweep, "t3", ended="error", error="ignored")
    assert len(read_table(fake_sweep, TRIALS)) == 4 and len(read_table(fake_sweep, STEPS)) == 8
    by_id = {r["trial_id"]: r for r in read_table(fake_sweep, TRIALS)}
    assert by_id["t3"]["status"] == "error" and "NaN" in by_id["t3"]["error"] and by_id["t3"]["steps_done"] == 1
    assert by_id["t2"]["status"] == "ok" and by_id["t2"]["param_kd"] == 10.0 and by_id["t2"]["miou_all"] == 0.7
    assert by_id["t2"]["val_miou_all"] == 0.6 and by_id["t1"]["val_miou_old"] == 0.7
    schema = pq.read_schema(fake_sweep / STEPS)
    for col in ("sweep", "trial_id", "cell", "status", "error", "step", "miou_all", "miou_old", "miou_new",
                "miou_avg", "class_iou", "val_miou_all", "val_miou_old", "val_miou_new", "val_miou_avg",
                "val_class_iou", "val_fraction", "param_kd", "loss_ce", "wall_s", "images_per_s"):
        assert col in schema.names, col
    assert str(schema.field("class_iou").type).startswith("list")
    assert not [p for p in fake_sweep.iterdir() if p.name.endswith(".tmp")]


def test_a_retried_step_replaces_its_row(fake_sweep):
    cfg = resolve_config("voc-19-1", "lwf", overrides={"kd": 3.0, "epochs": 1}, seed=0)
    m = {"step": 1, "miou_all": 0.9, "miou_old": 0.9, "miou_new": 0.9, "miou_avg": 0.9}
    write_step_fragment(fake_sweep, "t3", step_row(cfg, m, sweep="fake", trial_id="t3", cell="voc-19-1-disjoint",
                                                    status="ok", error=None))
    write_json(rows_dir(fake_sweep, "t3") / "trial.json", {"status": "ok", "error": None, "wall_s": 1.0})
    merge_trial(fake_sweep, "t3")
    rows = [r for r in read_table(fake_sweep, STEPS) if r["trial_id"] == "t3"]
    assert [(r["step"], r["status"]) for r in rows] == [(0, "ok"), (1, "ok")]


def test_leaderboard_ranks_finished_trials_per_cell_on_validation(fake_sweep):
    rows = leaderboard(fake_sweep, "miou_all")  # the kind: the split is the sweep's (validation)
    assert [(r["cell"], r["rank"], r["trial_id"]) for r in rows] == [
        ("voc-19-1-disjoint", 1, "t1"), ("voc-19-1-disjoint", 2, "t2"), ("voc-15-5-disjoint", 1, "t4")]
    assert rows[0]["metric"] == "val_miou_all" and rows[0]["select_on"] == "val"
    assert rows[0]["kd"] == 100.0 and rows[0]["pareto"] and rows[1]["pareto"]  # t1 wins on old, t2 on new
    assert rows[0]["miou_all"] == 0.5 and rows[0]["val_miou_all"] == 0.8  # test shown beside validation
    assert [r["trial_id"] for r in leaderboard(fake_sweep, "new", top=1)] == ["t2", "t4"]
    test_rows = leaderboard(fake_sweep, "all", select_on="test")  # explicit: the literature's protocol
    assert [r["trial_id"] for r in test_rows][:2] == ["t2", "t1"] and test_rows[0]["metric"] == "miou_all"
    with pytest.raises(ConfigError, match="validation metric"):
        leaderboard(fake_sweep, "val_miou_all", select_on="test")


def test_pareto_front():
    rows = [{"a": 1, "b": 1}, {"a": 2, "b": 0}, {"a": 0.5, "b": 0.5}, {"a": math.nan, "b": 3}]
    assert pareto_front(rows, ["a", "b"]) == rows[:2]


def test_export_best_writes_loadable_yaml(fake_sweep, tmp_path):
    out = export_best(fake_sweep, None, tmp_path / "best.yaml")
    doc = yaml.safe_load(out.read_text())
    assert [c["scenario"] for c in doc["cells"]] == ["voc-19-1", "voc-15-5"]
    first = doc["cells"][0]
    assert set(first) >= {"scenario", "mode", "method", "profile", "seed", "params", "metrics", "command"}
    assert first["params"] == {"epochs": 1, "kd": 100.0} and first["metrics"]["val_miou_all"] == 0.8
    assert first["metrics"]["miou_all"] == 0.5 and first["selected_on"] == "val" and first["metric"] == "val_miou_all"
    assert first["protocol"] == "end-of-training" and first["selected_at_step"] == 1
    assert first["command"] == f"csseg train voc-19-1 --method lwf --mode disjoint --config {out}"
    entries = load_best(out)
    cfg = best_config(entries[0])
    assert cfg.method_params["kd"] == 100.0 and cfg.epochs == 1 and cfg.seed == 0 and cfg.scenario == "voc-19-1"
    on_test = yaml.safe_load(export_best(fake_sweep, None, tmp_path / "t.yaml", select_on="test").read_text())
    assert on_test["cells"][0]["trial_id"] == "t2" and on_test["cells"][0]["selected_on"] == "test"
    with pytest.raises(ConfigError, match="--seeds"):
        export_best(fake_sweep, None, tmp_path / "x.yaml", top=3)
    one = export_best(fake_sweep, "old", tmp_path / "one.yaml")  # single cell -> a plain mapping
    assert len(load_best(one)) == 2
    with pytest.raises(ConfigError):
        load_best(tmp_path / "missing.yaml")


def test_export_single_cell_is_a_mapping(tmp_path):
    d = tmp_path / "s"
    write_json(d / "sweep.json", {"name": "s", "identity": {"metric": "miou_all", "objectives": [], "overrides": {},
                                                           "space": {"kd": {}}, "data_root": "/data"}})
    _fake_trial(d, "voc-19-1", "a", 5.0, (0.3, 0.3, 0.3))
    merge_trial(d, "a")
    doc = yaml.safe_load(export_best(d, "miou_all", tmp_path / "b.yaml").read_text())
    assert doc["scenario"] == "voc-19-1" and doc["params"] == {"kd": 5.0} and doc["data_root"] == "/data"
    assert json.loads(json.dumps(doc))  # plain types only


# ---------------------------------------------------------------------------- tune config
def test_first_step_protocol_and_only_points(tmp_path):
    from sweeper.sweep import _cell_ctx, tune_config

    plan = plan_sweep(SweepSpec(scenarios="voc-15-1,voc-offline", method="sdr", trials=4, storage=str(tmp_path),
                                protocol="first-step", scheduler="asha"))
    assert [plan.last_step(c) for c in plan.cells] == [1, 0]
    assert _cell_ctx(plan, plan.cells[0])["last_step"] == 1
    plan.sweep_dir.mkdir(parents=True)
    config, _ = tune_config(plan, plan.cells[0], concurrency=2)
    assert config.scheduler is None  # one incremental step: nothing for ASHA to stop
    full = plan_sweep(SweepSpec(scenarios="voc-15-1", method="sdr", trials=4, storage=str(tmp_path)))
    assert full.last_step(full.cells[0]) == 5 and full.name != plan.name
    points = ({"kd": 3.0}, {"kd": 30.0})
    reeval = plan_sweep(SweepSpec(scenarios="voc-15-1", method="sdr", storage=str(tmp_path), only_points=True,
                                  points=points, grid_seeds=(0, 1), space={"kd": LogUniform(1, 100)}))
    assert [c.seed for c in reeval.cells] == [0, 1] and reeval.points == points  # no preset added
    reeval.sweep_dir.mkdir(parents=True)
    config, param_space = tune_config(reeval, reeval.cells[0], concurrency=2)
    assert config.search_alg is None and config.num_samples == 1
    assert param_space == {"point": {"grid_search": [{"kd": 3.0}, {"kd": 30.0}]}}


def test_step0_threads_lends_the_cells_cores_only_when_all_its_trials_share_one_step0(tmp_path):
    from sweeper.sweep import _cell_ctx
    from sweeper.trial import intra_op_threads, step0_threads

    plan = plan_sweep(SweepSpec(scenarios="voc-15-1", method="sdr", trials=4, storage=str(tmp_path)))
    ctx = _cell_ctx(plan, plan.cells[0])
    assert step0_threads(ctx, plan.space, plan.points, seeds=4, concurrency=2) == 2  # loss weights only
    assert step0_threads({**ctx, "cpus_per_worker": 2.0}, plan.space, plan.points, seeds=4, concurrency=3) == 6
    assert step0_threads(ctx, plan.space, plan.points, seeds=4, concurrency=1) == 0  # nobody waits
    with_lr = {**plan.space, "lr": LogUniform(0.01, 0.1)}  # step 0's learning rate: one step 0 per value
    assert step0_threads(ctx, with_lr, plan.points, seeds=4, concurrency=2) == 0
    seeds = ({"kd": 3.0, "seed": 0}, {"kd": 3.0, "seed": 1})
    assert step0_threads(ctx, {}, seeds, seeds=1, concurrency=2) == 0
    assert step0_threads(ctx, {}, ({"kd": 3.0}, {"kd": 30.0}), seeds=1, concurrency=2) == 2
    assert step0_threads({**ctx, "gpus_per_worker": 1.0}, plan.space, plan.points, seeds=4, concurrency=2) == 0
    ft = plan_sweep(SweepSpec(scenarios="voc-15-1", method="ft", trials=3, storage=str(tmp_path)))
    ft_ctx = _cell_ctx(ft, ft.cells[0])
    assert step0_threads(ft_ctx, ft.space, ft.points, seeds=3, concurrency=2) == 0  # one seed per trial
    assert step0_threads(ft_ctx, ft.space, ft.points, seeds=1, concurrency=2) == 2
    before = torch.get_num_threads()
    with intra_op_threads(before + 1) as n:
        assert n == torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with intra_op_threads(0) as n:
        assert n == before


def test_a_single_worker_cpu_trial_on_one_node_trains_in_its_tune_actor(tmp_path, monkeypatch):
    from sweeper import sweep as sweep_module
    from sweeper import trial as trial_module
    from sweeper.sweep import _cell_ctx

    plan = plan_sweep(SweepSpec(scenarios="voc-15-1", method="sdr", trials=4, storage=str(tmp_path)))
    ctx = _cell_ctx(plan, plan.cells[0])
    nodes = [{"NodeID": "head", "Alive": True}, {"NodeID": "gone", "Alive": False}]
    monkeypatch.setattr(trial_module.ray, "nodes", lambda: nodes)
    assert trial_module.trains_in_process(ctx)
    assert not trial_module.trains_in_process({**ctx, "workers_per_trial": 2})  # DDP: Train's worker group
    assert not trial_module.trains_in_process({**ctx, "gpus_per_worker": 1.0})
    nodes.append({"NodeID": "w1", "Alive": True})  # a cluster: workers that Train restarts when a node is lost
    assert not trial_module.trains_in_process(ctx)
    # the trial actor then reserves the worker's CPUs itself; otherwise the Train worker does
    monkeypatch.setattr(sweep_module.ray, "get_runtime_context", lambda: type("C", (), {"get_node_id": lambda s: "head"})())
    assert sweep_module.driver_resources({**ctx, "in_process": True}).bundles[0].get("CPU") == ctx["cpus_per_worker"]
    assert not sweep_module.driver_resources({**ctx, "in_process": False}).bundles[0].get("CPU")


def test_an_in_process_trial_retries_max_failures_times_unless_tune_stopped_it():
    from sweeper.trial import _fit_in_process

    class Trainer:
        def __init__(self, fails):
            self.fails, self.calls, self.threads = fails, 0, []

        def fit(self):
            self.calls += 1
            self.threads.append(torch.get_num_threads())
            if self.calls <= self.fails:
                raise RuntimeError(f"attempt {self.calls}")

    ok = Trainer(fails=1)
    _fit_in_process(ok, 1, 2, lambda: False)
    assert ok.calls == 2 and ok.threads == [2, 2]
    for retries, stopped, calls in ((0, False, 1), (2, False, 3), (5, True, 1)):
        bad = Trainer(fails=99)
        with pytest.raises(RuntimeError, match=f"attempt {calls}"):
            _fit_in_process(bad, retries, 1, lambda stopped=stopped: stopped)
        assert bad.calls == calls
    forever = Trainer(fails=4)
    _fit_in_process(forever, -1, 1, lambda: False)
    assert forever.calls == 5


def test_a_cross_node_read_is_one_from_another_nodes_object_store(tmp_path):
    import pyarrow as pa

    from sweeper.sweep import _step0_summary

    plan = plan_sweep(SweepSpec(scenarios="voc-15-1", method="sdr", trials=2, storage=str(tmp_path)))
    plan.sweep_dir.mkdir(parents=True)
    # a state trained in an earlier Ray session (its node id is gone), read on the store's node and on another
    rows = [{"step": 0, "step0_source": "object_store", "node_id": n, "step0_node_id": "earlier-session",
             "step0_store_node_id": "head"} for n in ("head", "worker")]
    rows.append({"step": 0, "step0_source": "trained", "node_id": "head", "step0_node_id": "head",
                 "step0_store_node_id": "head"})
    pq.write_table(pa.Table.from_pylist(rows), plan.sweep_dir / STEPS)
    summary = _step0_summary(plan, {})
    assert summary["object_store_reads"] == 2 and summary["cross_node_reads"] == 1


def test_tune_config_single_multi_objective_asha_and_ft(tmp_path, monkeypatch):
    import ray.tune.schedulers as schedulers

    from sweeper.sweep import tune_config

    asha_kwargs = {}

    class RecordedASHA(schedulers.ASHAScheduler):  # what tune_config asks of ASHA, through its public constructor
        def __init__(self, **kwargs):
            asha_kwargs.update(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(schedulers, "ASHAScheduler", RecordedASHA)
    plan = plan_sweep(SweepSpec(scenarios="voc-15-1,voc-19-1", method="sdr", trials=7, storage=str(tmp_path),
                                objectives=("old", "new"), scheduler="asha", seed=3))
    plan.sweep_dir.mkdir(parents=True)
    config, param_space = tune_config(plan, plan.cells[0], concurrency=2)
    assert param_space is None and config.num_samples == 7 and config.max_concurrent_trials == 2
    searcher = config.search_alg
    assert searcher.metric == ["val_miou_old", "val_miou_new"] and searcher.mode == ["max", "max"]
    assert searcher.suggest("first") == dict(plan.points[0])  # the preset is the first trial
    assert (plan.sweep_dir / "optuna-voc-15-1-disjoint.log").exists()
    asha = config.scheduler
    assert isinstance(asha, RecordedASHA) and asha.metric == "val_miou_all"
    assert asha_kwargs["time_attr"] == "step" and asha_kwargs["max_t"] == 5 and asha_kwargs["mode"] == "max"
    assert config.reuse_actors is False  # a stopped trial's actor must die (its fit() is still running)
    config, _ = tune_config(plan, plan.cells[1], concurrency=1)  # voc-19-1: one incremental step, no ASHA
    assert config.scheduler is None and config.reuse_actors is True  # every trial ends: its actor serves the next
    ft = plan_sweep(SweepSpec(scenarios="voc-15-1", method="ft", trials=3, storage=str(tmp_path), seed=5))
    config, param_space = tune_config(ft, ft.cells[0], concurrency=1)
    assert config.search_alg is None and config.num_samples == 1
    assert param_space["seed"] == {"grid_search": [5, 6, 7]}


def test_load_best_filters_by_scenario_and_mode(fake_sweep, tmp_path):
    out = export_best(fake_sweep, "miou_all", tmp_path / "best.yaml")
    assert [e["scenario"] for e in load_best(out, scenario="voc-15-5")] == ["voc-15-5"]
    assert len(load_best(out, mode="disjoint")) == 2
    with pytest.raises(ConfigError, match="no configuration"):
        load_best(out, scenario="voc-15-1")


# ---------------------------------------------------------------------------- live view
def _render(renderable, width: int = 100) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open(os.devnull, "w"), color_system=None)
    console.print(renderable)
    return console.export_text()


def test_live_table_from_fake_trial_events():
    """Tune's events (start / result / complete / error) -> the table, the headline's progress and ETA."""
    from sweeper.live import SweepProgress, build_table, plain_line

    cells = ["voc-15-1-disjoint", "voc-15-5-disjoint"]
    p = SweepProgress(cells=cells, trials_per_cell=3, last_step={cells[0]: 5, cells[1]: 1},
                      dashboard_url="http://127.0.0.1:8265", log_path="sweeps/sdr-x/sweep.log", started=1000.0)
    assert p.eta_s(1000.0) is None and "ETA ?" in _render(build_table(p, now=1000.0))
    p.start(cells[0], "t_ok", 1000.0)
    p.start(cells[0], "t_run", 1000.0)
    for step in range(1, 6):
        p.result(cells[0], "t_ok", {"step": step, "val_miou_all": 0.4 + step / 100, "miou_all": 0.3}, 1000.0 + 20 * step)
    p.end(cells[0], "t_ok", 1101.0)
    p.result(cells[0], "t_run", {"step": 2, "val_miou_all": 0.355, "miou_all": 0.331}, 1100.0)
    err = p.start(cells[0], "t_err", 1150.0)
    p.end(cells[0], "t_err", 1170.0, error="FloatingPointError: loss is NaN",
          error_path="sweeps/sdr-x/tune/voc-15-1-disjoint/t_err/error.txt")
    assert [t.state for t in p.trials.values()] == ["ok", "running", "error"] and err.step is None
    assert (p.total, p.done) == (6, 2)
    # steps done: 5 (ok) + 2 (running) + 5 (an error counts in full) of 3*5 + 3*1 = 18 -> 200 s for 2/3: 100 s left
    assert p.fraction() == pytest.approx(12 / 18) and p.eta_s(1200.0) == pytest.approx(100.0)
    text = _render(build_table(p, now=1200.0, width=120), width=120)
    lines = text.splitlines()
    assert lines[0] == "trials 2/6 done · 1 error · elapsed 3m20s · ETA 1m40s · dashboard http://127.0.0.1:8265"
    row = {ln.split()[1] if ln.split()[0].startswith("voc") else ln.split()[0]: ln for ln in lines if "t_" in ln}
    assert "ok" in row["t_ok"] and "5/5" in row["t_ok"] and "45.0" in row["t_ok"] and "30.0" in row["t_ok"]
    assert "running" in row["t_run"] and "2/5" in row["t_run"] and "35.5" in row["t_run"] and "3m20s" in row["t_run"]
    assert "error" in row["t_err"] and "-/5" in row["t_err"] and "20s" in row["t_err"]
    error_lines = [ln for ln in lines if ln.startswith("error t_err")]
    assert len(error_lines) == 1 and "loss is NaN" in error_lines[0] and "error.txt" in error_lines[0]
    narrow = [ln for ln in _render(build_table(p, now=1200.0, width=90), width=90).splitlines() if "t_err:" in ln]
    assert len(narrow) == 1 and "…" in narrow[0] and narrow[0].endswith("(log: sweeps/sdr-x/tune/voc-15-1-disjoint/t_err/error.txt)")
    assert any("voc-15-5-disjoint" in ln and "pending" in ln and "3 trials" in ln for ln in lines)
    assert lines[-1] == "Ray/Tune log: sweeps/sdr-x/sweep.log"
    assert len(lines) <= 12
    # plain mode: one line per ended trial, with the error's log
    line = plain_line(p, p.trials["t_err"], 1200.0)
    assert line.startswith("[2/6 trials, ETA 1m40s]") and "t_err error" in line and "error.txt" in line and "\n" not in line


def test_live_eta_and_row_cap():
    from sweeper.live import SweepProgress, build_table

    p = SweepProgress(cells=["c"], trials_per_cell=4, last_step={"c": 2}, started=0.0)
    for i in range(4):
        p.start("c", f"t{i}", 0.0)
    p.result("c", "t0", {"step": 2}, 50.0)
    p.end("c", "t0", 50.0)
    p.result("c", "t1", {"step": 1}, 100.0)
    p.end("c", "t1", 100.0)  # stopped early (ASHA): counts as done, state "stopped"
    assert p.trials["t1"].state == "stopped" and p.done == 2
    assert p.fraction() == pytest.approx(4 / 8) and p.eta_s(100.0) == pytest.approx(100.0)
    text = _render(build_table(p, now=100.0, max_rows=2))
    assert "t2" in text and "t3" in text and "t0" not in text and "2 finished trial(s) not shown" in text


def test_a_trial_tune_stopped_is_stopped_even_if_its_driver_saw_the_kill(tmp_path):
    """ASHA stops a trial after step 1; its driver then sees the Train controller die (ActorDiedError) and the
    worker's step 2 fails under the kill: Tune's recorded end decides (stopped, steps 0-1 kept), not the driver."""
    from sweeper.tables import record_end, tune_end

    d = tmp_path / "asha"
    for t in ("stopped", "unknown", "finished"):
        _fake_trial(d, "voc-10-5-5", t, 5.0, (0.3, 0.3, 0.3), fail_at=2 if t != "finished" else None)
    for t in ("stopped", "unknown"):
        write_json(rows_dir(d, t) / "trial.json", {"status": "error", "error": "ActorDiedError: The actor died unexpectedly"})
    record_end(d, "stopped", "complete", reported_step=1)
    record_end(d, "finished", "complete", reported_step=2, wall_s=7.5)
    (rows_dir(d, "finished") / "trial.json").unlink()  # ASHA stops at max_t too: killed in fit()'s teardown
    assert tune_end(d, "stopped") == {"ended": "complete", "error": None, "reported_step": 1, "wall_s": None}
    assert tune_end(d, "unknown") is None
    rows = {t: merge_trial(d, t) for t in ("stopped", "unknown", "finished")}
    assert (rows["stopped"]["status"], rows["stopped"]["error"], rows["stopped"]["steps_done"]) == ("stopped", None, 2)
    assert rows["stopped"]["final_step"] == 1
    assert rows["unknown"]["status"] == "error" and "ActorDiedError" in rows["unknown"]["error"]  # no word from Tune
    assert rows["finished"]["status"] == "ok" and rows["finished"]["steps_done"] == 3
    assert rows["finished"]["error"] is None and rows["finished"]["wall_s"] == 7.5
    steps = sorted((r["step"], r["status"]) for r in read_table(d, STEPS) if r["trial_id"] == "stopped")
    assert steps == [(0, "ok"), (1, "ok")]  # the step that failed under the kill is not a finished step
    record_end(d, "unknown", "error", error="TrialError: boom")
    assert merge_trial(d, "unknown")["status"] == "error"
    with pytest.raises(ValueError):
        record_end(d, "x", "stopped")


@pytest.mark.parametrize("uri", ["s3://bucket/sweeps", "gs://bucket/sweeps", "s3:/bucket/sweeps"])
def test_a_storage_uri_is_refused_with_the_fix(uri):
    with pytest.raises(ConfigError, match="is a URI; the sweep folder must be a path every node sees"):
        plan_sweep(SweepSpec(scenarios=("voc-19-1",), method="lwf", trials=1, storage=uri))


def test_address_auto_is_left_to_ray_when_ray_cannot_resolve_it(monkeypatch):
    """``--address auto`` with several Ray instances on the machine: Ray's resolver raises; the
    probe leaves it to ``ray.init`` (which names the instances) instead of calling "auto" malformed."""
    import ray._private.services as services

    from sweeper.ray_session import probe_address

    def ambiguous(address, *args, **kwargs):
        raise ConnectionError("Found multiple active Ray instances: {'10.0.0.1:6379', '10.0.0.2:6379'}")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", ambiguous)
    assert probe_address("auto") is None
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        probe_address("head-node")


def _serve_once(reply: bytes):
    """A one-connection TCP server (every interface: Ray maps 127.0.0.1 to this node's IP) that reads
    the client's first bytes and sends ``reply``."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.recv(64)
            conn.sendall(reply)
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def test_a_port_that_answers_but_is_not_ray_is_a_one_line_error(monkeypatch):
    """A mistyped --address that hits a web server: one line, at once (ray.init would retry for minutes)."""
    from sweeper.ray_session import probe_address

    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    port = _serve_once(b"HTTP/1.0 400 Bad Request\r\n\r\n")
    with pytest.raises(ConfigError, match="answers but is not a Ray cluster.*GCS port") as err:
        probe_address(f"127.0.0.1:{port}")
    assert "\n" not in str(err.value)
    settings = bytes([0, 0, 6, 4, 0, 0, 0, 0, 0]) + bytes(6)  # an HTTP/2 server's SETTINGS frame, as gRPC sends
    assert probe_address(f"127.0.0.1:{_serve_once(settings)}") is None
