"""``run_final``: an exported configuration over several seeds (engine stubbed: the engine has its own tests).

Each seed is one resumable run folder (``run_scenario``); all rows also land in ``<out>/steps.parquet``.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml

import csseg_core.scenario_run
from sweeper import run_final


def _fake_run_step(cfg, step, prev_state=None, *, collect=(), log_dir=None, progress=False):
    assert (prev_state is None) == (step == 0) and log_dir
    value = 0.5 + 0.1 * cfg.seed - 0.05 * step
    metrics = {"step": step, "miou_all": value, "miou_old": value + 0.1, "miou_new": value - 0.1 if step else float("nan"),
               "miou_avg": value, "class_iou": [value] * 3, "losses": {"ce": 1.0}, "wall_s": 0.1, "images_per_s": 1.0}
    return {"step": step, "model": {}, "history": [], "metrics": metrics}, metrics


def test_run_final_reports_mean_and_std_over_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(csseg_core.scenario_run, "run_step", _fake_run_step)
    best = tmp_path / "best.yaml"
    entry = {"scenario": "voc-19-1", "mode": "disjoint", "method": "lwf", "profile": "smoke", "seed": 0,
             "params": {"kd": 10.0, "epochs": 1}, "metrics": {"miou_all": 0.1},
             "command": f"csseg train voc-19-1 --method lwf --mode disjoint --config {best}"}
    best.write_text(yaml.safe_dump({"cells": [entry, {**entry, "scenario": "voc-15-5"}]}))
    summaries = run_final(best, seeds=2)
    assert [s["scenario"] for s in summaries] == ["voc-19-1", "voc-15-5"]
    stats = summaries[0]["metrics"]["miou_all"]
    assert summaries[0]["seeds"] == [0, 1] and stats["values"] == pytest.approx([0.45, 0.55])
    assert stats["mean"] == pytest.approx(0.5) and stats["std"] == pytest.approx(0.0707107, abs=1e-6)
    rows = pq.read_table(tmp_path / "final" / "steps.parquet").to_pylist()
    assert len(rows) == 2 * 2 * 2 and all(r["param_kd"] == 10.0 and r["status"] == "ok" for r in rows)
    [one] = run_final(best, seeds=[7], out_dir=tmp_path / "one", overrides={"kd": 3.0})[:1]
    assert one["metrics"]["miou_old"]["std"] == 0.0 and one["seeds"] == [7]
    assert {r["param_kd"] for r in pq.read_table(tmp_path / "one" / "steps.parquet").to_pylist()} == {3.0}


def test_final_parquet_keeps_one_row_per_configuration_and_scenario(tmp_path, monkeypatch):
    monkeypatch.setattr(csseg_core.scenario_run, "run_step", _fake_run_step)
    entry = {"scenario": "voc-19-1", "mode": "disjoint", "method": "lwf", "profile": "smoke", "seed": 0,
             "params": {"kd": 10.0, "epochs": 1}, "selected_on": "val"}
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(entry))
    b.write_text(yaml.safe_dump({**entry, "params": {"kd": 3.0, "epochs": 1}}))
    out = tmp_path / "final"
    run_final(a, seeds=1, out_dir=out)
    run_final(b, seeds=1, out_dir=out, scenarios=["voc-19-1", "voc-19-1b"])
    run_final(a, seeds=1, out_dir=out)  # a rerun replaces its own row
    rows = pq.read_table(out / "final.parquet").to_pylist()
    assert sorted((r["scenario"], r["transfer"], r["params"]) for r in rows) == [
        ("voc-19-1", False, '{"epochs": 1, "kd": 10.0}'), ("voc-19-1", False, '{"epochs": 1, "kd": 3.0}'),
        ("voc-19-1b", True, '{"epochs": 1, "kd": 3.0}')]
    assert all(r["miou_all_mean"] == pytest.approx(0.45) and r["selected_on"] == "val" for r in rows)
