"""Engine and scenario runs: determinism, state round trip, step checks, DDP evaluation, run_scenario
files / resume / faults.

Every step trains one epoch on a fixed 32-image list per step of voc-15-5 (``index_dir``) with
one torch thread, on the session's synthetic VOC.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from faults import nan_loss, recorded_losses, without_random_augmentation
from torch.utils.data import RandomSampler, Subset

from csseg_core import scenario_run as run_module
from csseg_core.config import ExperimentConfig, resolve_config
from csseg_core.data import build_datasets
from csseg_core.distributed import spawn
from csseg_core.engine import evaluate, make_loader, run_step
from csseg_core.errors import ConfigError, TrainingError
from csseg_core.models import build_model
from csseg_core.results import read_rows, write_rows
from csseg_core.scenario_run import checkpoint_path, run_scenario
from csseg_core.scenarios import get_scenario
from csseg_core.state import load_state, save_state

pytestmark = pytest.mark.usefixtures("one_thread")

SCENARIO = "voc-15-5"
METRIC_KEYS = {"step", "miou_all", "miou_old", "miou_new", "miou_avg", "class_iou", "val_miou_all", "val_miou_old",
               "val_miou_new", "val_miou_avg", "val_class_iou", "losses", "wall_s", "images_per_s",
               "n_train_images"}


@pytest.fixture(scope="module")
def make_cfg(voc_root, micro_overrides):
    def make(method="ft", scenario=SCENARIO, **params):
        return resolve_config(scenario, method, profile="smoke", data_root=str(voc_root),
                              overrides={**micro_overrides, **params})
    return make


@pytest.fixture(scope="module")
def step0_runs(make_cfg):
    """Step 0 three times: seed 42 twice, seed 7 once -> {name: (state, metrics)}."""
    return {
        "a": run_step(make_cfg(), 0),
        "b": run_step(make_cfg(), 0),
        "other_seed": run_step(make_cfg(seed=7), 0),
    }


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_step0(step0_runs):
    (sa, ma), (sb, mb) = step0_runs["a"], step0_runs["b"]
    for key in METRIC_KEYS - {"wall_s", "images_per_s"} | {"val_miou_all", "val_miou_old", "val_class_iou", "iterations", "class_acc", "overall_acc"}:
        assert _same(ma[key], mb[key]), key
    assert _weights_equal(sa["model"], sb["model"])
    assert _same(sa["statistics"], sb["statistics"])


def test_other_seed_gives_another_step0(step0_runs):
    (sa, ma), (sc, mc) = step0_runs["a"], step0_runs["other_seed"]
    assert sc["config"]["seed"] == 7
    assert not _weights_equal(sa["model"], sc["model"])
    assert ma["losses"] != mc["losses"]


def test_step0_metrics_keys_and_average(step0_runs):
    state, metrics = step0_runs["a"]
    assert METRIC_KEYS <= set(metrics)
    assert set(metrics["losses"]) == {"ce"} and metrics["iterations"] == 2 and metrics["n_train_images"] == 32
    assert len(metrics["class_iou"]) == 16 and math.isnan(metrics["miou_new"])
    assert metrics["miou_avg"] == metrics["miou_all"] == state["history"][0]
    assert metrics["wall_s"] > 0 and metrics["images_per_s"] > 0
    assert {"step", "config", "model", "statistics", "history"} <= set(state) and state["step"] == 0


# ----------------------------------------------------------------------------- state round trip
def test_saved_state_continues_identically(step0_runs, make_cfg, tmp_path):
    state, _ = step0_runs["a"]
    path = save_state(state, tmp_path / "ckpt" / "step0.pt")
    assert [p.name for p in path.parent.iterdir()] == ["step0.pt"]  # no temporary file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    reloaded = load_state(path)
    assert _same(raw, reloaded) and _same(reloaded, state)
    cfg = make_cfg("sdr")
    s_mem, m_mem = run_step(cfg, 1, state)
    s_disk, m_disk = run_step(cfg, 1, reloaded)
    for key in METRIC_KEYS - {"wall_s", "images_per_s"} | {"val_miou_all", "val_miou_avg", "iterations"}:
        assert _same(m_mem[key], m_disk[key]), key
    assert _weights_equal(s_mem["model"], s_disk["model"])
    assert _same(s_mem["statistics"], s_disk["statistics"])
    # miou_avg is the mean of miou_all over the steps so far
    assert s_mem["history"] == [state["history"][0], m_mem["miou_all"]]
    assert m_mem["miou_avg"] == pytest.approx(np.mean(s_mem["history"]), abs=1e-12)


def test_load_state_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_state(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_state(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a csseg step state"):
        load_state(tmp_path / "other.pt")


# ----------------------------------------------------------------------------- step checks
def test_run_step_rejects_bad_steps_and_states(make_cfg, step0_runs):
    state0, _ = step0_runs["a"]
    cfg = make_cfg()
    for step in (2, -1):
        with pytest.raises(ConfigError, match=rf"step {step} is out of range: voc-15-5 has steps 0..1"):
            run_step(cfg, step, state0)
    with pytest.raises(ConfigError, match="step 1 needs the state of step 0"):
        run_step(cfg, 1, None)
    wrong = {**state0, "step": 1}
    with pytest.raises(ConfigError, match="needs the state of step 0, got the state of step 1"):
        run_step(cfg, 1, wrong)
    with pytest.raises(ConfigError, match="step 3 needs the state of step 2, got the state of step 0"):
        run_step(make_cfg(scenario="voc-15-1"), 3, state0)


# ----------------------------------------------------------------------------- DDP evaluation
def _eval_views(cfg: ExperimentConfig):
    """The first 33 (odd) and 32 (even) images of the step-0 test split."""
    scenario = get_scenario(cfg.scenario)
    test = build_datasets("voc", cfg.data_root, scenario, cfg.mode, 0, crop_size=cfg.crop_size,
                          splits=("test",))["test"]
    return {"odd": Subset(test, range(33)), "even": Subset(test, range(32))}


def _confusions(cfg: ExperimentConfig, weights: dict) -> dict[str, torch.Tensor]:
    model = build_model(cfg.backbone, get_scenario(cfg.scenario).classes_per_step[:1], output_stride=cfg.output_stride,
                        head_channels=cfg.head_channels)
    model.load_state_dict(weights, strict=True)
    out = {}
    for name, view in _eval_views(cfg).items():
        cm = evaluate(model, make_loader(view, cfg, train=False, seed=0), 16, torch.device("cpu"))
        out[name] = cm.mat.clone()
    return out


def _ddp_eval_worker(cfg_dict: dict, weights_path: str, out_dir: str) -> None:
    cfg = ExperimentConfig.from_dict(cfg_dict)
    mats = _confusions(cfg, torch.load(weights_path, weights_only=True))
    torch.save(mats, Path(out_dir) / f"rank{dist.get_rank()}.pt")


@pytest.fixture(scope="module")
def ddp_confusions(step0_runs, make_cfg, tmp_path_factory):
    cfg = make_cfg()
    state, _ = step0_runs["a"]
    out = tmp_path_factory.mktemp("ddp-eval")
    torch.save(state["model"], out / "weights.pt")
    spawn(2, _ddp_eval_worker, cfg.to_dict(), str(out / "weights.pt"), str(out))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return ranks, _confusions(cfg, state["model"])


def test_ddp_evaluation_all_reduces_the_confusion_matrix_exactly(ddp_confusions):
    ranks, single = ddp_confusions
    assert int(single["even"].sum()) > 0
    for r in ranks:  # all-reduced: both ranks hold the matrix of all 32 images
        assert torch.equal(r["even"], single["even"])


def test_ddp_evaluation_of_an_odd_split_counts_every_image_once(ddp_confusions):
    ranks, single = ddp_confusions
    for r in ranks:
        assert torch.equal(r["odd"], single["odd"])


# ----------------------------------------------------------------------------- DDP training
@pytest.mark.parametrize("n, batch, world", [(37, 8, 2), (40, 8, 4), (30, 6, 3), (5, 8, 2)])
def test_ddp_ranks_deal_out_the_one_process_batches(make_cfg, monkeypatch, n, batch, world):
    """Over two epochs, rank r's k-th batch holds the r-th, (r+world)-th, ... images of the one
    process's k-th batch (same generator, same draws), and every rank gets as many batches."""
    from csseg_core import engine

    cfg = make_cfg(batch_size=batch)
    data = list(range(n))

    def epochs(rank: int, w: int) -> list[list[int]]:
        monkeypatch.setattr(engine, "dist_info", lambda: (rank, w))
        loader = make_loader(data, cfg, train=True, seed=3)
        return [b.tolist() for _ in range(2) for b in loader]

    one = epochs(0, 1)
    ranks = [epochs(r, world) for r in range(world)]
    assert {len(r) for r in ranks} == {len(one)} or n < batch  # as many iterations as one process
    if n >= batch:
        for k, whole in enumerate(one):
            assert [ranks[i % world][k][i // world] for i in range(batch)] == whole
    else:  # fewer images than one batch: every rank as many, none twice
        assert len({len(r[0]) for r in ranks}) == 1
        seen = [i for r in ranks for i in r[0]]
        assert len(seen) == len(set(seen)) >= n - world + 1
    monkeypatch.setattr(engine, "dist_info", lambda: (0, 1))
    assert isinstance(make_loader(data, cfg, train=True, seed=3).sampler, RandomSampler)  # one process: as before


def test_a_global_batch_that_does_not_split_over_the_workers_is_a_config_error(make_cfg, monkeypatch):
    from csseg_core import plan

    monkeypatch.setattr(plan, "dist_info", lambda: (0, 3))
    with pytest.raises(ConfigError, match="batch_size 16 does not split over 3 DDP workers"):
        run_step(make_cfg(), 0)


def _ddp_train_worker(cfg_dict: dict, out_path: str) -> None:
    mp = pytest.MonkeyPatch()
    without_random_augmentation(mp)
    losses = recorded_losses(mp)
    state, metrics = run_step(ExperimentConfig.from_dict(cfg_dict), 0)
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "model": state["model"], "ce": metrics["losses"]["ce"]}, out_path)


def _max_relative_change(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp(min=1e-12))
               for k in a if a[k].is_floating_point())


def test_two_ddp_workers_train_like_one_process_on_the_same_global_batch(make_cfg, monkeypatch, tmp_path):
    """Same images per global batch (the sampler), BatchNorm statistics of the global batch (sync BN)
    and gradients averaged by DDP: two ranks follow the one-process run's losses and weights.
    Random crops and flips are switched off in both (each process draws its own). With per-rank
    BatchNorm (``sync_bn=false``) the first iteration's loss already differs (the check can fail)."""
    cfg = make_cfg()  # 32 images, batch 16: two iterations
    without_random_augmentation(monkeypatch)
    losses = recorded_losses(monkeypatch)
    state, metrics = run_step(cfg, 0)
    runs = {}
    for sync in (True, False):
        spawn(2, _ddp_train_worker, make_cfg(sync_bn=sync).to_dict(), str(tmp_path / f"sync-{sync}.pt"))
        runs[sync] = torch.load(tmp_path / f"sync-{sync}.pt", weights_only=True)
    assert len(losses) == len(runs[True]["losses"]) == 2 and losses[1] < losses[0]
    # measured: losses within 1e-7, weights 1.2e-5 (float32 sums in another order)
    assert runs[True]["losses"] == pytest.approx(losses, rel=1e-5)
    assert runs[True]["ce"] == pytest.approx(metrics["losses"]["ce"], rel=1e-5)  # the ranks' losses averaged
    assert _max_relative_change(state["model"], runs[True]["model"]) < 1e-4
    # per-rank BatchNorm: 0.4 % off at the first iteration, weights 1.4 (relative) apart after two
    assert runs[False]["losses"][0] != pytest.approx(losses[0], rel=1e-3)
    assert _max_relative_change(state["model"], runs[False]["model"]) > 1e-2


# ----------------------------------------------------------------------------- run_scenario
@pytest.fixture(scope="module")
def scenario_run(make_cfg, tmp_path_factory):
    """One run directory driven through: a NaN fault at step 1, the complete run, an identical rerun."""
    out = tmp_path_factory.mktemp("runs") / "sdr-run"
    cfg = make_cfg("sdr")
    rec: dict = {"cfg": cfg, "out": out}

    # 1. the NaN fault: step 0 finishes and is saved, step 1 fails
    snap = {}

    def echo_nan(line: str) -> None:
        if line.startswith("step 0:"):
            snap["bytes"] = checkpoint_path(out, cfg, 0).read_bytes()
            snap["rows"] = read_rows(out / "steps.parquet")

    with pytest.raises(TrainingError) as err, nan_loss("sdr", step=1):
        run_scenario(cfg, out, progress=False, echo=echo_nan)
    rec["nan_error"] = str(err.value)
    rec["nan_snapshot"] = snap
    rec["nan_files"] = sorted(p.name for p in (out / "checkpoints").iterdir())
    rec["nan_ckpt_bytes"] = checkpoint_path(out, cfg, 0).read_bytes()
    rec["nan_rows"] = read_rows(out / "steps.parquet")

    # 2. the same directory with the real config: step 0 is reused, step 1 runs
    lines: list[str] = []
    rec["results"] = run_scenario(cfg, out, progress=False, echo=lines.append)
    rec["lines"] = lines
    rec["rows"] = read_rows(out / "steps.parquet")
    rec["files"] = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}

    # 3. an identical rerun must not train anything
    def no_training(*args, **kwargs):
        raise AssertionError("run_step called on a finished run")

    rerun_lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "run_step", no_training)
        rec["rerun_results"] = run_scenario(cfg, out, progress=False, echo=rerun_lines.append)
    rec["rerun_lines"] = rerun_lines
    rec["rerun_rows"] = read_rows(out / "steps.parquet")
    rec["rerun_files"] = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    return rec


def test_nan_fault_keeps_the_step0_checkpoint_and_writes_no_step1_row(scenario_run):
    r = scenario_run
    assert "step 1, iteration 0: loss term 'unce' became nan" in r["nan_error"]
    assert r["nan_snapshot"]["bytes"] == r["nan_ckpt_bytes"], "the step-0 checkpoint changed"
    assert r["nan_files"] == [checkpoint_path(r["out"], r["cfg"], 0).name]  # no step-1 file, no temporary file
    assert [row["step"] for row in r["nan_rows"]] == [0] and r["nan_rows"] == r["nan_snapshot"]["rows"]


def test_run_scenario_writes_config_checkpoints_and_rows(scenario_run):
    r = scenario_run
    cfg, out = r["cfg"], r["out"]
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written == cfg.to_dict()
    assert ExperimentConfig.from_dict(written).run_name() == cfg.run_name()
    assert sorted(r["files"]) == [f"step{k}-{cfg.step_key(k)}.pt" for k in (0, 1)]
    states = [load_state(checkpoint_path(out, cfg, k)) for k in (0, 1)]
    assert [state["step"] for state in states] == [0, 1]
    # step 0 is shared between methods: it may come from the session's step-0 cache, trained by
    # another test's method (its key is what makes it this run's); step 1 is this run's own
    assert ExperimentConfig.from_dict(states[0]["config"]).step_key(0) == cfg.step_key(0)
    assert states[1]["config"]["method"] == "sdr"
    assert any((out / "tensorboard").iterdir())
    # step 0 came from the faulty run (same step-0 key), step 1 was trained now
    assert r["lines"][0].startswith(f"step 0: reusing step0-{cfg.step_key(0)}.pt")
    assert r["lines"][1].startswith("step 1: val all ") and "| test all " in r["lines"][1]
    rows = r["rows"]
    assert [row["step"] for row in rows] == [0, 1]
    for row in rows:
        assert (row["scenario"], row["mode"], row["method"], row["seed"]) == ("voc-15-5", "disjoint", "sdr", 42)
        assert row["step_key"] == cfg.step_key(row["step"])
        for key in ("miou_all", "miou_old", "miou_avg", "wall_s", "images_per_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
        assert {f"param_{k}": v for k, v in cfg.method_params.items()}.items() <= row.items()
    assert rows[0]["miou_new"] is None and isinstance(rows[1]["miou_new"], float)
    assert len(rows[0]["class_iou"]) == 16 and len(rows[1]["class_iou"]) == 21
    assert rows[0]["loss_ce"] is not None and rows[0]["loss_unce"] is None
    for term in ("unce", "unkd", "pm", "attraction", "repulsion", "sparsity"):
        assert math.isfinite(rows[1][f"loss_{term}"]), term
    assert rows[1]["loss_unce"] == pytest.approx(r["results"][1]["losses"]["unce"])


def test_config_written_before_the_fault_field_was_removed_still_reads(make_cfg):
    """config.yaml files and states written while ``fault_nan_step`` was a config field (always -1
    outside tests) still load, with the same step keys; any other value is refused."""
    cfg = make_cfg("sdr")
    old = {**cfg.to_dict(), "fault_nan_step": -1}
    assert ExperimentConfig.from_dict(old) == cfg
    assert "fault_nan_step" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="unknown key 'fault_nan_step'"):
        ExperimentConfig.from_dict({**old, "fault_nan_step": 1})


def test_run_scenario_metrics_and_average(scenario_run):
    r = scenario_run
    reused, fresh = r["results"]
    assert METRIC_KEYS <= set(fresh)
    assert reused["step"] == 0 and fresh["step"] == 1
    assert fresh["miou_avg"] == pytest.approx((reused["miou_all"] + fresh["miou_all"]) / 2, abs=1e-9)
    assert r["rows"][1]["miou_avg"] == pytest.approx(np.mean([row["miou_all"] for row in r["rows"]]), abs=1e-9)


def test_rerun_reuses_checkpoints_without_duplicating_rows(scenario_run):
    r = scenario_run
    assert [line.split(":")[0] for line in r["rerun_lines"]] == ["step 0", "step 1"]
    assert all(": reusing step" in line for line in r["rerun_lines"])
    assert [row["step"] for row in r["rerun_rows"]] == [0, 1]
    for old, new in zip(r["rows"], r["rerun_rows"]):
        for key in ("step_key", "miou_all", "miou_old", "miou_new", "miou_avg", "class_iou", "loss_ce", "loss_unce"):
            assert _same(new[key], old[key]), key
    assert r["rerun_files"] == r["files"]  # checkpoints are not rewritten
    assert [m["miou_all"] for m in r["rerun_results"]] == [row["miou_all"] for row in r["rows"]]


def test_step_without_previous_checkpoint_names_the_missing_file(make_cfg, tmp_path):
    cfg = make_cfg("sdr")
    with pytest.raises(ConfigError) as err:
        run_scenario(cfg, tmp_path / "empty", steps=[1], progress=False, echo=lambda s: None)
    assert str(checkpoint_path(tmp_path / "empty", cfg, 0)) in str(err.value)
    assert "--step-ckpt" in str(err.value)


def test_unwritable_out_dir_is_a_config_error(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write to output directory"):
        run_scenario(make_cfg(), blocker / "run", progress=False, echo=lambda s: None)


def test_resume_rebuilds_missing_rows_from_the_checkpoints(scenario_run, tmp_path):
    r = scenario_run
    out = tmp_path / "copy"
    shutil.copytree(r["out"], out)
    (out / "steps.parquet").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "run_step", lambda *a, **k: pytest.fail("a finished step was trained again"))
        results = run_scenario(r["cfg"], out, progress=False, echo=lambda s: None)
    assert [m["step"] for m in results] == [0, 1]
    rows = read_rows(out / "steps.parquet")
    assert [row["step"] for row in rows] == [0, 1]
    assert [row["miou_all"] for row in rows] == [row["miou_all"] for row in r["rows"]]


def test_resume_reruns_a_step_whose_checkpoint_has_no_metrics(scenario_run, tmp_path):
    r = scenario_run
    out = tmp_path / "copy"
    shutil.copytree(r["out"], out)
    ckpt = checkpoint_path(out, r["cfg"], 1)
    state = load_state(ckpt)
    state.pop("metrics", None)
    save_state(state, ckpt)
    write_rows(out / "steps.parquet", [row for row in read_rows(out / "steps.parquet") if row["step"] == 0])
    results = run_scenario(r["cfg"], out, progress=False, echo=lambda s: None)
    assert [m["step"] for m in results] == [0, 1]
    assert [row["step"] for row in read_rows(out / "steps.parquet")] == [0, 1]


def test_iteration_budget_and_new_classifier_multiplier(make_cfg, step0_runs):
    """iters replaces epochs (partial epochs included); lr_new_cls only touches step > 0."""
    state0, _ = step0_runs["a"]
    cfg = make_cfg("sdr", iters_incremental=3, lr_new_cls=10.0, fix_bn_incremental=True)
    assert cfg.step_key(0) == make_cfg().step_key(0)  # step 0 is shared whatever the incremental budget
    _, metrics = run_step(cfg, 1, state0)
    assert metrics["iterations"] == 3


def test_fix_bn_incremental_keeps_step0_batchnorm_at_step1(make_cfg, step0_runs):
    """fix_bn_incremental (the smoke default) keeps step 0's BatchNorm statistics and affine
    parameters at step 1; without it the statistics drift to the new step's images."""
    state0, _ = step0_runs["a"]
    stats = [k for k in state0["model"] if k.endswith(("running_mean", "running_var"))]
    affine = [k[: -len("running_mean")] + s for k in stats if k.endswith("running_mean") for s in ("weight", "bias")]
    assert stats and affine
    drift, _ = run_step(make_cfg("ft", iters_incremental=3, fix_bn_incremental=False), 1, state0)
    kept, _ = run_step(make_cfg("ft", iters_incremental=3, fix_bn_incremental=True), 1, state0)
    assert not all(torch.equal(drift["model"][k], state0["model"][k]) for k in stats)
    assert all(torch.equal(kept["model"][k], state0["model"][k]) for k in stats + affine)
    convs = [k for k, v in state0["model"].items() if v.dim() == 4]
    assert convs and not all(torch.equal(kept["model"][k], state0["model"][k]) for k in convs)  # the body trains
    assert make_cfg(fix_bn_incremental=True).step_key(0) == make_cfg(fix_bn_incremental=False).step_key(0)


def test_grad_clip_incremental_bounds_the_old_network_not_the_new_classifier(make_cfg, step0_runs):
    """grad_clip_incremental (on in smoke) clips the gradient norm of every parameter but the new
    classifier at steps > 0: with a vanishing bound the old network barely moves while the new
    classifier learns as without clipping; step 0 is shared whatever the bound."""
    state0, _ = step0_runs["a"]
    old = [k for k in state0["model"] if state0["model"][k].is_floating_point() and "running" not in k]

    def moved(clip):
        state, _ = run_step(make_cfg("lwf", iters_incremental=3, grad_clip_incremental=clip, kd=100), 1, state0)
        body = sum(float((state["model"][k] - state0["model"][k]).norm()) for k in old)
        new = {k: v for k, v in state["model"].items() if k not in state0["model"]}
        return body, new

    body_free, new_free = moved(0.0)
    body_clipped, new_clipped = moved(1e-9)
    assert new_free and new_clipped.keys() == new_free.keys()
    assert body_free > 0 and body_clipped < 0.02 * body_free, (body_clipped, body_free)  # what remains: weight decay
    assert all(float((new_clipped[k] - new_free[k]).norm()) < 0.5 * float(new_free[k].norm()) for k in new_free)
    assert make_cfg(grad_clip_incremental=0.0).step_key(0) == make_cfg(grad_clip_incremental=3.0).step_key(0)
    assert make_cfg(grad_clip_incremental=0.0).step_key(1) != make_cfg(grad_clip_incremental=3.0).step_key(1)
    with pytest.raises(ConfigError, match="grad_clip_incremental must be >= 0"):
        make_cfg(grad_clip_incremental=-1)


# ----------------------------------------------------------------------------- statistics a step 0 holds
def test_shared_step0_is_trained_again_with_the_union_when_it_lacks_a_statistic(make_cfg, tmp_path):
    """SDR's step 0 holds the prototypes only; EWC then needs the Fisher: step 0 is trained again
    (one line says why) collecting both, and that superset replaces the shared state, which
    SDR and FT then reuse without training."""
    seed = 1234  # a step-0 key of this test only (the shared states live in the session's $CSSEG_HOME)
    sdr, ewc = make_cfg("sdr", seed=seed), make_cfg("ewc", seed=seed)
    assert sdr.step_key(0) == ewc.step_key(0)
    shared = run_module.shared_step0_path(sdr)
    lines: list[str] = []
    run_scenario(sdr, tmp_path / "sdr", steps=[0], progress=False, echo=lines.append)
    first = load_state(shared)
    assert first["collected"] == ["prototypes"] and set(first["statistics"]) == {"prototypes", "prototype_counts"}

    lines.clear()
    run_scenario(ewc, tmp_path / "ewc", steps=[0], progress=False, echo=lines.append)
    assert len(lines) == 2 and lines[0] == (
        f"step 0: trained again: the cached step-0 state {shared} lacks the statistic(s) fisher that ewc needs "
        "(it holds prototypes); the retrained state holds the union and replaces it"), lines
    again = load_state(shared)
    assert again["collected"] == ["prototypes", "fisher"]
    assert _weights_equal(again["model"], first["model"])  # collecting never changes the training
    assert _same(again["statistics"]["prototypes"], first["statistics"]["prototypes"])
    assert _same(load_state(checkpoint_path(tmp_path / "ewc", ewc, 0))["collected"], ["prototypes", "fisher"])

    # the superset serves every method: nothing is trained again
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "run_step", lambda *a, **k: pytest.fail("step 0 was trained again"))
        for method in ("sdr", "ft", "ewc"):
            lines.clear()
            run_scenario(make_cfg(method, seed=seed), tmp_path / f"{method}-again", steps=[0], progress=False,
                         echo=lines.append)
            assert lines[0] == f"step 0: reusing the shared step-0 state {shared}", (method, lines)
        # the run directory of SDR still holds the prototypes-only state: EWC there takes the shared one
        lines.clear()
        run_scenario(ewc, tmp_path / "sdr", steps=[0], progress=False, echo=lines.append)
        assert lines[0] == f"step 0: reusing the shared step-0 state {shared}", lines
    assert load_state(checkpoint_path(tmp_path / "sdr", ewc, 0))["collected"] == ["prototypes", "fisher"]
    # and EWC's step 1 runs from it with its penalty
    _, metrics = run_step(ewc, 1, again)
    assert set(metrics["losses"]) == {"ce", "reg"} and all(math.isfinite(v) for v in metrics["losses"].values())


# ----------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_trains_with_finite_float32_losses_and_states(make_cfg, step0_runs):
    cfg = make_cfg("sdr", amp="bf16")
    assert cfg.step_key(0) != make_cfg("sdr").step_key(0)  # amp changes the training, hence the key
    state0, metrics0 = run_step(cfg, 0)
    assert all(math.isfinite(v) for v in metrics0["losses"].values()) and metrics0["iterations"] == 2
    assert 0.0 <= metrics0["miou_all"] <= 1.0
    # the weights and statistics stay float32 (autocast touches the forward only) and differ from fp32's
    fp32 = step0_runs["a"][0]
    for n, t in state0["model"].items():
        assert t.dtype == fp32["model"][n].dtype and bool(torch.isfinite(t.float()).all()), n
    assert not _weights_equal(state0["model"], fp32["model"])
    assert state0["statistics"]["prototypes"].dtype == torch.float32
    _, metrics1 = run_step(cfg, 1, state0)  # SDR's distillation terms under autocast, computed in float32
    assert set(metrics1["losses"]) == {"unce", "unkd", "pm", "attraction", "repulsion", "sparsity"}
    assert all(math.isfinite(v) for v in metrics1["losses"].values()), metrics1["losses"]


def test_channels_last_is_the_same_computation_in_another_layout(make_cfg, step0_runs):
    """channels_last changes how, not what, is computed: same key, same losses and metrics up to
    rounding, and the saved weights are plain contiguous tensors whatever the layout trained in."""
    cl, plain = make_cfg("sdr", channels_last=True), make_cfg("sdr", channels_last=False)
    assert cl.step_key(0) == plain.step_key(0) and cl.step_key(1) == plain.step_key(1)
    assert resolve_config(SCENARIO, "sdr", profile="paper").channels_last is False
    runs = {c.channels_last: run_step(c, 1, step0_runs["a"][0]) for c in (cl, plain)}
    (s_cl, m_cl), (s_plain, m_plain) = runs[True], runs[False]
    for k, v in m_plain["losses"].items():
        assert m_cl["losses"][k] == pytest.approx(v, rel=1e-3, abs=1e-6), k
    assert m_cl["miou_all"] == pytest.approx(m_plain["miou_all"], abs=0.01)
    for n, t in s_cl["model"].items():
        assert t.is_contiguous() and torch.allclose(t, s_plain["model"][n], rtol=1e-3, atol=1e-5), n
    conv = next(t for t in s_cl["model"].values() if t.dim() == 4)
    assert conv.stride() == conv.contiguous().stride()


def test_fp16_without_cuda_is_a_one_line_config_error(make_cfg):
    if torch.cuda.is_available():
        pytest.skip("fp16 autocast is available on this machine")
    with pytest.raises(ConfigError, match=r"^amp=fp16 needs a CUDA device; use amp=bf16 on CPU \(or amp=off\)$"):
        run_step(make_cfg(amp="fp16"), 0)


def test_loader_workers_persist_over_the_epochs_and_stop_with_the_step(make_cfg, step0_runs):
    """num_workers > 0: the workers are forked once (before the statistics buffers) and serve
    every epoch; they are gone when the step returns."""
    import multiprocessing

    from torch.utils.data import dataloader

    created = []
    original = dataloader._MultiProcessingDataLoaderIter.__init__

    def counting(self, loader):
        created.append(loader.dataset)
        original(self, loader)

    cfg = make_cfg("lwf", epochs_incremental=2, num_workers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", counting)
        state, metrics = run_step(cfg, 1, step0_runs["a"][0])
    train_forks = [d for d in created if len(d) == 32]  # the 32-image train list (val/test loaders fork per split)
    assert len(train_forks) == 1, f"the training workers were forked {len(train_forks)} times for 2 epochs"
    assert metrics["iterations"] == 4 and state["collected"] == [] and set(metrics["losses"]) == {"ce", "kd"}
    assert all(math.isfinite(v) for v in metrics["losses"].values())
    assert not multiprocessing.active_children(), "loader workers outlived the step"
    # FT's step 0 collected nothing: EWC cannot continue from it and says why
    with pytest.raises(ConfigError, match="method 'ewc' cannot start step 1: the previous state has no 'fisher' statistics"):
        run_step(make_cfg("ewc"), 1, step0_runs["a"][0])


def test_a_run_without_resume_keeps_the_shared_step0_statistics(make_cfg, tmp_path):
    """resume=False retrains step 0 but never shrinks what the shared state holds."""
    seed = 4321
    ewc, sdr = make_cfg("ewc", seed=seed), make_cfg("sdr", seed=seed)
    run_scenario(ewc, tmp_path / "a", steps=[0], progress=False, echo=lambda s: None)
    assert load_state(run_module.shared_step0_path(ewc))["collected"] == ["fisher"]
    run_scenario(sdr, tmp_path / "b", steps=[0], progress=False, resume=False, echo=lambda s: None)
    assert load_state(run_module.shared_step0_path(sdr))["collected"] == ["prototypes", "fisher"]


def test_evaluate_under_amp_counts_like_float32_and_fp16_falls_back_on_cpu():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x), {}

    torch.manual_seed(0)
    net = Net()
    data = [(torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))) for _ in range(3)]
    ref = evaluate(net, data, 4, torch.device("cpu")).mat
    assert ref.sum() == 3 * 2 * 8 * 8
    if not torch.cuda.is_available():  # a GPU fp16 state evaluated on a CPU: float32
        assert torch.equal(evaluate(net, data, 4, torch.device("cpu"), "fp16").mat, ref)
    bf16 = evaluate(net, data, 4, torch.device("cpu"), "bf16").mat
    assert bf16.sum() == ref.sum()


_FAULTS_SCRIPT = """
import resource, sys, torch
from csseg_core.engine import run_step  # noqa: F401  (importing the engine tunes nothing by itself)
from csseg_core.plan import keep_freed_memory

def faults_of_five_iterations():
    def iteration():  # big blocks alive at once, then all freed (glibc mmaps blocks > 32 MiB whatever it saw)
        blocks = [torch.ones(10 << 20) for _ in range(3)]
        del blocks
    for _ in range(3):
        iteration()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        iteration()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults_of_five_iterations(), keep_freed_memory(), faults_of_five_iterations())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("setting", ["default", "0"])
def test_keep_freed_memory_stops_the_per_iteration_page_faults_of_big_blocks(setting):
    """A step's freed activations are kept for the next iteration instead of being returned to the OS
    (and faulted in again): 3 × 40 MiB allocated and freed 5 times fault every page each time with
    glibc's defaults and none once ``keep_freed_memory`` ran; ``CSSEG_MALLOC_TUNING=0`` leaves malloc
    as it is. (Blocks under 32 MiB fault or not by glibc's dynamic threshold, i.e. by what the
    process freed before; ADE's 151-class logits are 40 MiB, a smoke step's many blocks 0.1-4 MiB.)"""
    env = {k: v for k, v in os.environ.items() if k != "CSSEG_MALLOC_TUNING"}
    if setting == "0":
        env["CSSEG_MALLOC_TUNING"] = "0"
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True)
    before, applied, after = out.stdout.split()
    pages = 5 * 3 * (40 << 20) // 4096  # every page of every block, every iteration
    assert int(before) > pages // 2
    if setting == "0":
        assert applied == "False" and int(after) > pages // 2
    else:
        assert applied == "True" and int(after) < pages // 100
