"""Noise-aware choice: re-run the best trials of a sweep over seeds and pick by the mean.

The top trials of a sweep often differ by less than the seed spread (one run per
configuration ranks noise). ``csseg export-best DIR --top K --seeds S`` runs the K best
trials of every grid cell again over S seeds (``seed, seed + 1, ...``; the first one is the
sweep's own), as a small sweep of its own under ``DIR/reeval/`` that runs exactly those
points (``SweepSpec.only_points``): on Ray, the K candidates of a seed concurrently, step 0
trained once per seed and shared (the sweep's own step-0 files are reused). The choice is the
best mean on the sweep's selection split (validation unless the sweep was made with
``--select-on test``); mean ± std of every metric goes into best.yaml and ``DIR/reeval.json``,
which ``csseg results`` shows beside the leaderboard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from csseg_core.errors import ConfigError
from csseg_core.metrics import ALL_METRICS
from search_spaces import param_from_dict

from .export import best_entries, selection, sweep_info
from .spec import SweepSpec, plan_sweep
from .tables import TRIALS, read_json, read_table, write_json

REEVAL_JSON = "reeval.json"


def mean_std(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}`` over the finite values (sample std; 0 for one value)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0, "values": list(values)}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "n": len(finite), "values": list(values)}


def _point_key(hp: dict) -> str:
    return json.dumps({k: v for k, v in hp.items() if k != "seed"}, sort_keys=True, default=str)


def _share_step0(src: Path, dst: Path) -> None:
    """Make the sweep's step-0 files visible to the re-evaluation (same keys, no retraining)."""
    dst.mkdir(parents=True, exist_ok=True)
    for state in src.glob("*.pt") if src.is_dir() else []:
        meta = state.with_suffix(".json")  # the cache loads a key only with its metrics file
        for f in (state, meta) if meta.exists() else ():
            target = dst / f.name
            if not target.exists():
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copyfile(f, target)


def _cell_spec(sweep_dir: Path, info: dict, cell_entries: list[dict], seeds: list[int], metric: str, select_on: str,
               concurrency: int | None, address: str | None) -> SweepSpec:
    spec0, identity = info.get("spec", {}), info["identity"]
    points = []
    for e in cell_entries:
        meta = read_json(sweep_dir / "rows" / e["trial_id"] / "meta.json") or {}
        points.append({k: v for k, v in meta.get("hp", {}).items() if k != "seed"})
    if not any(points):
        raise ConfigError(f"cell {cell_entries[0]['cell']} has no searched hyperparameters to re-evaluate "
                          "(a sweep of a method without a search space); drop --top/--seeds")
    space = {k: param_from_dict(v) for k, v in identity.get("space", {}).items()}
    return SweepSpec(
        scenarios=(cell_entries[0]["scenario"],), modes=(cell_entries[0]["mode"],), method=identity["method"],
        trials=len(points), metric=metric, select_on=select_on, protocol=identity.get("protocol", "end-of-training"),
        only_points=True, points=tuple(tuple(sorted(p.items())) for p in points), space=space,
        grid_seeds=tuple(seeds), overrides=identity.get("overrides", {}), profile=identity.get("profile", "smoke"),
        data_root=identity.get("data_root"), seed=int(identity.get("seed", 0)),
        storage=str(sweep_dir / "reeval"), concurrency=concurrency, address=address,
        workers_per_trial=int(spec0.get("workers_per_trial", 1)), gpus_per_worker=float(spec0.get("gpus_per_worker", 0)),
        cpus_per_worker=float(spec0.get("cpus_per_worker", 1)), max_failures=int(spec0.get("max_failures", 1)),
        verbose=int(spec0.get("verbose", 1)), dashboard=False)


def reevaluate(sweep_dir: str | os.PathLike, *, top: int, seeds: int, metric: str | None = None,
               select_on: str | None = None, concurrency: int | None = None, address: str | None = None,
               out_path: str = "best.yaml") -> list[dict]:
    """Re-run the ``top`` best trials of every cell over ``seeds`` seeds; pick by the mean.

    Returns:
        Per cell: ``{"cell", "metric", "select_on", "seeds", "best": entry, "candidates": [...]}``
        where each candidate is its export entry with ``metrics`` (means), ``metrics_std`` and
        ``seed_values``; ``best`` is the candidate with the highest mean ``metric``. Also
        written to ``<sweep_dir>/reeval.json``.

    Raises:
        ConfigError: bad ``top``/``seeds``, no finished trial, or nothing to re-evaluate.
    """
    if top < 1 or seeds < 1:
        raise ConfigError(f"--top and --seeds must be >= 1 (got --top {top} --seeds {seeds})")
    sweep_dir = Path(sweep_dir).resolve()
    info = sweep_info(sweep_dir)
    select_on, metric, _ = selection(info, metric, select_on)
    entries = best_entries(sweep_dir, metric, out_path, select_on=select_on, top=top)
    if not entries:
        raise ConfigError(f"no trial of {sweep_dir} finished every step; nothing to re-evaluate")
    seed_list = [int(info["identity"].get("seed", 0)) + i for i in range(seeds)]
    cells = {}
    for e in entries:
        cells.setdefault(e["cell"], []).append(e)
    specs = {cell: _cell_spec(sweep_dir, info, es, seed_list, metric, select_on, concurrency, address) for cell, es in cells.items()}

    import ray

    from .ray_session import init_ray
    from .step0_cache import step0_dir
    from .sweep import run_sweep

    own_ray, _ = init_ray(next(iter(specs.values())))
    try:
        out = []
        for cell, spec in specs.items():
            plan = plan_sweep(spec)
            _share_step0(step0_dir(sweep_dir), step0_dir(plan.sweep_dir))
            run_dir = run_sweep(spec)
            out.append(_summarise(sweep_dir, cell, cells[cell], run_dir, seed_list, metric, select_on))
    finally:
        if own_ray:
            ray.shutdown()
    write_json(sweep_dir / REEVAL_JSON, {"metric": metric, "select_on": select_on, "top": top, "seeds": seed_list,
                                         "cells": out})
    return out


def _summarise(sweep_dir: Path, cell: str, cands: list[dict], run_dir: Path, seeds: list[int], metric: str,
               select_on: str) -> dict:
    by_point: dict[str, list[dict]] = {}
    for row in read_table(run_dir, TRIALS):
        if row.get("status") != "ok":
            continue
        meta = read_json(run_dir / "rows" / row["trial_id"] / "meta.json") or {}
        by_point.setdefault(_point_key(meta.get("hp", {})), []).append(row)
    summarised = []
    for e in cands:
        meta = read_json(sweep_dir / "rows" / e["trial_id"] / "meta.json") or {}
        rows = by_point.get(_point_key(meta.get("hp", {})), [])
        stats = {k: mean_std([r.get(k) for r in rows]) for k in ALL_METRICS}
        summarised.append({**e, "metrics": {k: s["mean"] for k, s in stats.items()},
                           "metrics_std": {k: s["std"] for k, s in stats.items()},
                           "seed_values": {k: s["values"] for k, s in stats.items()}, "seeds": seeds,
                           "reeval_sweep": run_dir.name})
    ranked = sorted(summarised, key=lambda c: c["metrics"][metric] if math.isfinite(c["metrics"][metric]) else -math.inf,
                    reverse=True)
    return {"cell": cell, "metric": metric, "select_on": select_on, "seeds": seeds, "best": ranked[0],
            "candidates": ranked}


def read_reeval(sweep_dir: str | os.PathLike) -> dict | None:
    """The last re-evaluation of a sweep (``reeval.json``), or None."""
    return read_json(Path(sweep_dir) / REEVAL_JSON)
