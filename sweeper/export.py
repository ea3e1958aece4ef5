"""Reading a sweep: leaderboard, Pareto front, best-config export and final multi-seed runs.

    rows = leaderboard("sweeps/sdr-1a2b3c4d5e", "miou_all")
    export_best("sweeps/sdr-1a2b3c4d5e", "miou_all", "best.yaml")
    summary = run_final("best.yaml", seeds=3)

Only trials that finished every step count (ASHA-stopped trials carry partial metrics, and
Optuna records them as COMPLETE anyway).
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

import yaml

from csseg_core.errors import ConfigError, first_line

from .spec import metric_name
from .tables import TRIALS, read_json, read_table

_PARAM = "param_"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sweep_info(sweep_dir: Path) -> dict:
    info = read_json(sweep_dir / "sweep.json")
    if info is None:
        raise ConfigError(f"{sweep_dir} is not a sweep folder (no sweep.json); pass the folder `csseg sweep` printed")
    return info


def pareto_front(rows: Sequence[dict], objectives: Sequence[str]) -> list[dict]:
    """Rows not dominated by any other row (all objectives maximised)."""
    pts = [r for r in rows if all(_finite(r.get(o)) for o in objectives)]

    def dominates(a: dict, b: dict) -> bool:
        return all(a[o] >= b[o] for o in objectives) and any(a[o] > b[o] for o in objectives)

    return [r for r in pts if not any(dominates(o, r) for o in pts if o is not r)]


def leaderboard(sweep_dir: str | os.PathLike, metric: str | None = None, *, top: int | None = None) -> list[dict]:
    """Finished trials ranked per grid cell, best first.

    Args:
        sweep_dir: the sweep folder.
        metric: ranking metric (default: the sweep's); ``old`` / ``miou_old`` etc.
        top: keep the best ``top`` per cell (None = all).

    Returns:
        Flat rows: ``cell, rank, trial_id, scenario, mode, method, seed, miou_all, miou_old,
        miou_new, miou_avg, pareto`` (on the cell's Pareto front of the sweep's objectives,
        or of ``(miou_old, miou_new)`` for a single-objective sweep), then one column per
        searched hyperparameter (without the ``param_`` prefix), then ``wall_s``.
    """
    sweep_dir = Path(sweep_dir)
    info = _sweep_info(sweep_dir)
    identity = info["identity"]
    metric = metric_name(metric or identity["metric"])
    objectives = identity.get("objectives") or ["miou_old", "miou_new"]
    searched = sorted(identity.get("space", {}))
    rows = [r for r in read_table(sweep_dir, TRIALS) if r.get("status") == "ok"]
    out: list[dict] = []
    for cell in dict.fromkeys(r["cell"] for r in rows):
        cell_rows = [r for r in rows if r["cell"] == cell]
        front = {id(r) for r in pareto_front(cell_rows, objectives)}
        cell_rows.sort(key=lambda r: r[metric] if _finite(r.get(metric)) else -math.inf, reverse=True)
        for rank, r in enumerate(cell_rows[:top] if top else cell_rows, start=1):
            row = {"cell": cell, "rank": rank, "trial_id": r["trial_id"], "scenario": r["scenario"], "mode": r["mode"],
                   "method": r["method"], "seed": r["seed"]}
            row.update({k: r.get(k) for k in ("miou_all", "miou_old", "miou_new", "miou_avg")})
            row["pareto"] = id(r) in front
            row.update({k: r.get(_PARAM + k) for k in searched})
            row["wall_s"] = r.get("wall_s")
            out.append(row)
    return out


def _plain(v: Any) -> Any:
    """YAML-safe python scalars (numpy/pyarrow values become float/int/str)."""
    if isinstance(v, (bool, str)) or v is None:
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if hasattr(v, "item"):
        return v.item()
    return v


def best_entries(sweep_dir: str | os.PathLike, metric: str | None = None, out_path: str = "best.yaml") -> list[dict]:
    """The best finished trial of every cell as export entries (see :func:`export_best`)."""
    sweep_dir = Path(sweep_dir)
    info = _sweep_info(sweep_dir)
    metric = metric_name(metric or info["identity"]["metric"])
    overrides = info["identity"].get("overrides", {})
    trials = {r["trial_id"]: r for r in read_table(sweep_dir, TRIALS)}
    entries = []
    for row in leaderboard(sweep_dir, metric, top=1):
        t = trials[row["trial_id"]]
        meta = read_json(sweep_dir / "rows" / t["trial_id"] / "meta.json") or {}
        params = {**overrides, **meta.get("hp", {})}
        params.pop("seed", None)
        entry = {
            "scenario": t["scenario"], "mode": t["mode"], "method": t["method"], "profile": t["profile"],
            "seed": _plain(t["seed"]), "params": {k: _plain(v) for k, v in sorted(params.items())},
            "metrics": {k: _plain(t.get(k)) for k in ("miou_all", "miou_old", "miou_new", "miou_avg")},
            "command": f"csseg train {t['scenario']} --method {t['method']} --mode {t['mode']} --config {out_path}",
            "sweep": info["name"], "cell": t["cell"], "trial_id": t["trial_id"], "metric": metric,
        }
        data_root = info["identity"].get("data_root")
        if data_root:
            entry["data_root"] = data_root
        entries.append(entry)
    return entries


def export_best(sweep_dir: str | os.PathLike, metric: str | None, out_path: str | os.PathLike) -> Path:
    """Write the best configuration of every grid cell as YAML (``yaml.safe_dump``).

    One cell: a mapping with ``scenario, mode, method, profile, seed, params, metrics,
    command`` (+ ``sweep, cell, trial_id, metric`` and ``data_root`` when the sweep had one).
    Several cells: ``{"cells": [mapping, ...]}``. ``params`` holds every ``--set`` value of
    the trial (searched hyperparameters and the sweep's overrides).

    Raises:
        ConfigError: no trial finished every step.
    """
    out_path = Path(out_path)
    entries = best_entries(sweep_dir, metric, str(out_path))
    if not entries:
        raise ConfigError(f"no trial of {sweep_dir} finished every step; nothing to export")
    doc: Any = entries[0] if len(entries) == 1 else {"cells": entries}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, out_path)
    return out_path


def load_best(path: str | os.PathLike, *, scenario: str | None = None, mode: str | None = None) -> list[dict]:
    """Entries of a file written by :func:`export_best` (always a list).

    Args:
        path: the YAML file.
        scenario, mode: keep only the entries of this scenario (aliases accepted) / mode.

    Raises:
        ConfigError: missing or malformed file, or no entry matches.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"best-config file {path} does not exist; write it with `csseg export-best`")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({first_line(err)}); write it with `csseg export-best`") from None
    entries = doc.get("cells") if isinstance(doc, dict) and "cells" in doc else [doc]
    for e in entries:
        if not isinstance(e, dict) or not {"scenario", "method"} <= set(e):
            raise ConfigError(f"{path} is not a best-config file (each entry needs scenario, method, params)")
    if scenario is not None or mode is not None:
        from csseg_core.scenarios import get_scenario

        want = get_scenario(scenario).name if scenario else None
        entries = [e for e in entries if (want is None or get_scenario(e["scenario"]).name == want)
                   and (mode is None or e.get("mode", "disjoint") == mode)]
        if not entries:
            raise ConfigError(f"{path} has no configuration for {scenario or 'any scenario'} / {mode or 'any mode'}")
    return entries


def best_config(entry: dict, *, seed: int | None = None, data_root: str | None = None,
                overrides: dict | None = None):
    """The ``ExperimentConfig`` of one exported entry (``seed`` / ``data_root`` / ``overrides`` win)."""
    from csseg_core.config import resolve_config

    return resolve_config(entry["scenario"], entry["method"], profile=entry.get("profile", "smoke"),
                          mode=entry.get("mode"), seed=entry.get("seed") if seed is None else seed,
                          data_root=data_root or entry.get("data_root"),
                          overrides={**entry.get("params", {}), **(overrides or {})})


def run_final(best_yaml: str | os.PathLike, seeds: int | Sequence[int] = 3, *, out_dir: str | os.PathLike | None = None,
              data_root: str | None = None, overrides: dict | None = None, progress: bool = False) -> list[dict]:
    """Run every exported configuration over several seeds with the engine, in this process.

    Args:
        best_yaml: a file written by :func:`export_best`.
        seeds: a count N (seeds 0..N-1) or explicit seeds.
        out_dir: where ``steps.parquet`` and TensorBoard logs go (default: ``<yaml dir>/final``).
        data_root, overrides: applied on top of the file.
        progress: show the engine's progress bars.

    Returns:
        Per entry: ``{"cell", "scenario", "mode", "method", "seeds", "metrics": {m: {"mean",
        "std", "values"}}}`` over the last step's ``miou_all/old/new/avg`` (std: sample std,
        0 for one seed).
    """
    from csseg_core.results import append_rows, read_rows
    from csseg_core.runner import run_scenario

    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError("run_final needs at least one seed")
    out_dir = Path(out_dir) if out_dir else Path(best_yaml).resolve().parent / "final"
    summaries = []
    for entry in load_best(best_yaml):
        finals: dict[str, list[float]] = {k: [] for k in ("miou_all", "miou_old", "miou_new", "miou_avg")}
        for seed in seed_list:
            cfg = best_config(entry, seed=seed, data_root=data_root, overrides=overrides)
            # one resumable run folder per seed: checkpoints, TensorBoard, steps.parquet
            run_dir = out_dir / f"{cfg.run_name()}-s{seed}"
            metrics = run_scenario(cfg, run_dir, progress=progress)[-1]
            rows = [{**r, "status": "ok"} for r in read_rows(run_dir / "steps.parquet")]
            append_rows(out_dir / "steps.parquet", rows, key=("run", "step"))  # every seed in one table
            for k in finals:
                finals[k].append(float(metrics.get(k, math.nan)))
        summaries.append({
            "cell": entry.get("cell", f"{entry['scenario']}-{entry.get('mode', 'disjoint')}"),
            "scenario": entry["scenario"], "mode": entry.get("mode"), "method": entry["method"], "seeds": seed_list,
            "metrics": {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                            "values": v} for k, v in finals.items()},
        })
    return summaries
