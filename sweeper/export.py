"""Reading a sweep: leaderboard, Pareto front, best-config export and final multi-seed runs.

    rows = leaderboard("sweeps/sdr-1a2b3c4d5e", "miou_all")
    export_best("sweeps/sdr-1a2b3c4d5e", "miou_all", "best.yaml")
    summary = run_final("best.yaml", seeds=3)

Only trials that finished every step count (ASHA-stopped trials carry partial metrics, and
Optuna records them as COMPLETE anyway).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from csseg_core.atomic import atomic_path
from csseg_core.errors import ConfigError
from csseg_core.metrics import ALL_METRICS, split_metric

from .spec import metric_name
from .tables import TRIALS, read_json, read_table

_PARAM = "param_"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sweep_info(sweep_dir: Path) -> dict:
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


def selection(info: dict, metric: str | None = None, select_on: str | None = None) -> tuple[str, str, list[str]]:
    """``(select_on, metric column, Pareto objectives)`` of a sweep, optionally overridden.

    Sweeps made before the held-out split existed (no ``select_on`` in their identity)
    selected on test, and say so.
    """
    identity = info["identity"]
    select_on = select_on or identity.get("select_on", "test")
    metric = metric_name(metric, select_on) if metric else split_metric(identity["metric"], select_on)
    objectives = [split_metric(o, select_on) for o in identity.get("objectives") or ["old", "new"]]
    return select_on, metric, objectives


def leaderboard(sweep_dir: str | os.PathLike, metric: str | None = None, *, top: int | None = None,
                select_on: str | None = None) -> list[dict]:
    """Finished trials ranked per grid cell, best first.

    Args:
        sweep_dir: the sweep folder.
        metric: ranking metric kind (default: the sweep's); ``old`` / ``miou_old`` etc.
        top: keep the best ``top`` per cell (None = all).
        select_on: ``val`` or ``test`` (default: the sweep's, ``val`` unless it was made with
            ``--select-on test``).

    Returns:
        Flat rows: ``cell, rank, trial_id, scenario, mode, method, seed, val_miou_*, miou_*,
        metric, select_on, pareto`` (on the cell's Pareto front of the sweep's objectives,
        or of old vs new, on the selection split), then one column per searched
        hyperparameter (without the ``param_`` prefix), then ``wall_s``.
    """
    sweep_dir = Path(sweep_dir)
    info = sweep_info(sweep_dir)
    select_on, metric, objectives = selection(info, metric, select_on)
    searched = sorted(info["identity"].get("space", {}))
    rows = [r for r in read_table(sweep_dir, TRIALS) if r.get("status") == "ok"]
    out: list[dict] = []
    for cell in dict.fromkeys(r["cell"] for r in rows):
        cell_rows = [r for r in rows if r["cell"] == cell]
        front = {id(r) for r in pareto_front(cell_rows, objectives)}
        cell_rows.sort(key=lambda r: r[metric] if _finite(r.get(metric)) else -math.inf, reverse=True)
        for rank, r in enumerate(cell_rows[:top] if top else cell_rows, start=1):
            row = {"cell": cell, "rank": rank, "trial_id": r["trial_id"], "scenario": r["scenario"], "mode": r["mode"],
                   "method": r["method"], "seed": r["seed"]}
            row.update({k: r.get(k) for k in ALL_METRICS})
            row.update(metric=metric, select_on=select_on, final_step=r.get("final_step"), pareto=id(r) in front)
            row.update({k: r.get(_PARAM + k) for k in searched})
            row["wall_s"] = r.get("wall_s")
            out.append(row)
    return out


def unranked_note(sweep_dir: str | os.PathLike) -> str | None:
    """``not ranked: 2 stopped by the scheduler (ASHA), 1 error`` for the trials the leaderboard leaves out, or None."""
    counts: dict[str, int] = {}
    for r in read_table(Path(sweep_dir), TRIALS):
        if r.get("status") != "ok":
            counts[r.get("status") or "?"] = counts.get(r.get("status") or "?", 0) + 1
    if not counts:
        return None
    names = {"stopped": "stopped by the scheduler (ASHA)"}
    return "not ranked: " + ", ".join(f"{n} {names.get(s, s)}" for s, n in sorted(counts.items(), key=lambda x: x[0] != "stopped"))


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


def best_entries(sweep_dir: str | os.PathLike, metric: str | None = None, out_path: str = "best.yaml", *,
                 select_on: str | None = None, top: int = 1) -> list[dict]:
    """The ``top`` best finished trials of every cell as export entries (see :func:`export_best`)."""
    sweep_dir = Path(sweep_dir)
    info = sweep_info(sweep_dir)
    select_on, metric, _ = selection(info, metric, select_on)
    identity = info["identity"]
    overrides = identity.get("overrides", {})
    trials = {r["trial_id"]: r for r in read_table(sweep_dir, TRIALS)}
    entries = []
    for row in leaderboard(sweep_dir, metric, top=top, select_on=select_on):
        t = trials[row["trial_id"]]
        meta = read_json(sweep_dir / "rows" / t["trial_id"] / "meta.json") or {}
        params = {**overrides, **meta.get("hp", {})}
        params.pop("seed", None)
        entry = {
            "scenario": t["scenario"], "mode": t["mode"], "method": t["method"], "profile": t["profile"],
            "seed": _plain(t["seed"]), "params": {k: _plain(v) for k, v in sorted(params.items())},
            "metrics": {k: _plain(t.get(k)) for k in ALL_METRICS},
            "command": f"csseg train {t['scenario']} --method {t['method']} --mode {t['mode']} --config {out_path}",
            "sweep": info["name"], "cell": t["cell"], "trial_id": t["trial_id"], "metric": metric,
            "selected_on": select_on, "protocol": identity.get("protocol", "end-of-training"),
            "selected_at_step": _plain(t.get("final_step")),
        }
        data_root = identity.get("data_root")
        if data_root:
            entry["data_root"] = data_root
        entries.append(entry)
    return entries


def export_best(sweep_dir: str | os.PathLike, metric: str | None, out_path: str | os.PathLike, *,
                select_on: str | None = None, top: int = 1, seeds: int = 0, concurrency: int | None = None,
                address: str | None = None) -> Path:
    """Write the best configuration of every grid cell as YAML (``yaml.safe_dump``).

    One cell: a mapping with ``scenario, mode, method, profile, seed, params, metrics,
    command, metric, selected_on, protocol`` (+ ``sweep, cell, trial_id`` and ``data_root``
    when the sweep had one); ``metrics`` holds validation (``val_miou_*``) and test
    (``miou_*``) values. Several cells: ``{"cells": [mapping, ...]}``. ``params`` holds every
    ``--set`` value of the trial (searched hyperparameters and the sweep's overrides).

    With ``seeds > 0`` the ``top`` best trials of each cell are first re-run over ``seeds``
    seeds (:func:`sweeper.reeval.reevaluate`, on Ray) and the best *mean* wins; ``metrics``
    are then means, with ``metrics_std`` and ``seeds`` beside them.

    Raises:
        ConfigError: no trial finished every step.
    """
    out_path = Path(out_path)
    if seeds > 0:
        from .reeval import reevaluate

        summaries = reevaluate(sweep_dir, top=top, seeds=seeds, metric=metric, select_on=select_on,
                               concurrency=concurrency, address=address, out_path=str(out_path))
        entries = [{k: v for k, v in s["best"].items() if k != "seed_values"} for s in summaries]
    else:
        if top != 1:
            raise ConfigError("--top needs --seeds S (re-run the top trials over S seeds and pick by the mean)")
        entries = best_entries(sweep_dir, metric, str(out_path), select_on=select_on)
    if not entries:
        raise ConfigError(f"no trial of {sweep_dir} finished every step; nothing to export")
    doc: Any = entries[0] if len(entries) == 1 else {"cells": entries}
    with atomic_path(out_path) as tmp:
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out_path


def load_best(path: str | os.PathLike, *, scenario: str | None = None, mode: str | None = None) -> list[dict]:
    """Entries of a file written by :func:`export_best` (always a list).

    Args:
        path: the YAML file.
        scenario, mode: keep only the entries of this scenario (aliases accepted) / mode.

    Raises:
        ConfigError: missing or malformed file, or no entry matches.
    """
    from csseg_core.config import config_entries, read_config_file, select_entries

    doc = read_config_file(path, what="best-config file", hint="write it with `csseg export-best`")
    entries = config_entries(doc, path)
    for e in entries:
        if not {"scenario", "method"} <= set(e):
            raise ConfigError(f"{path} is not a best-config file (each entry needs scenario, method, params)")
    if scenario is not None or mode is not None:
        entries = select_entries(entries, scenario, mode)
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
              data_root: str | None = None, overrides: dict | None = None, progress: bool = False,
              scenarios: Sequence[str] | None = None) -> list[dict]:
    """Run every exported configuration over several seeds with the engine, in this process.

    Args:
        best_yaml: a file written by :func:`export_best`.
        seeds: a count N (seeds 0..N-1) or explicit seeds.
        out_dir: where ``final.parquet``, ``steps.parquet`` and the runs go (default:
            ``<yaml dir>/final``).
        data_root, overrides: applied on top of the file.
        progress: show the engine's progress bars.
        scenarios: run the configuration on these scenarios / class orders instead of the
            one it was tuned on (GTEP transfer, e.g. ``voc-15-1b,voc-15-1c``); same dataset.

    Returns:
        Per entry × scenario: ``{"cell", "tuned_on", "scenario", "transfer", "mode", "method",
        "seeds", "metrics": {m: {"mean", "std", "n", "values"}}}`` over the last step's
        ``val_miou_*`` and ``miou_*`` (std: sample std, 0 for one seed). The same rows go to
        ``final.parquet`` (one per entry × scenario, ``<metric>_mean`` / ``<metric>_std``; a rerun of the
        same configuration replaces its row, another configuration adds one).
    """
    from csseg_core.results import append_rows, read_rows
    from csseg_core.scenario_run import run_scenario
    from csseg_core.scenarios import get_scenario

    from .reeval import mean_std

    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError("run_final needs at least one seed")
    entries = load_best(best_yaml)
    targets = [get_scenario(s).name for s in scenarios or ()]
    for entry in entries:
        for name in targets:
            if get_scenario(name).dataset != get_scenario(entry["scenario"]).dataset:
                raise ConfigError(f"--scenarios {name} is a {get_scenario(name).dataset} scenario but the configuration "
                                  f"was tuned on {entry['scenario']}; pick scenarios of the same dataset")
    out_dir = Path(out_dir) if out_dir else Path(best_yaml).resolve().parent / "final"
    summaries = []
    for entry in entries:
        tuned_on = get_scenario(entry["scenario"]).name
        for scenario in targets or [tuned_on]:
            finals: dict[str, list[float]] = {k: [] for k in ALL_METRICS}
            for seed in seed_list:
                cfg = best_config({**entry, "scenario": scenario}, seed=seed, data_root=data_root, overrides=overrides)
                # one resumable run folder per seed: checkpoints, TensorBoard, steps.parquet
                run_dir = out_dir / f"{cfg.run_name()}-s{seed}"
                metrics = run_scenario(cfg, run_dir, progress=progress)[-1]
                rows = [{**r, "status": "ok"} for r in read_rows(run_dir / "steps.parquet")]
                append_rows(out_dir / "steps.parquet", rows, key=("run", "step"))  # every seed in one table
                for k in finals:
                    finals[k].append(float(metrics.get(k, math.nan)))
            summary = {
                "cell": entry.get("cell", f"{entry['scenario']}-{entry.get('mode', 'disjoint')}"),
                "tuned_on": tuned_on, "scenario": scenario, "transfer": scenario != tuned_on,
                "mode": entry.get("mode"), "method": entry["method"], "seeds": seed_list,
                "metrics": {k: mean_std(v) for k, v in finals.items()},
            }
            summaries.append(summary)
            row = {k: summary[k] for k in ("cell", "tuned_on", "scenario", "transfer", "mode", "method", "seeds")}
            row.update(selected_on=entry.get("selected_on", "test"), protocol=entry.get("protocol", "end-of-training"),
                       params=json.dumps(entry.get("params", {}), sort_keys=True))
            for k, st in summary["metrics"].items():
                row[f"{k}_mean"], row[f"{k}_std"] = st["mean"], st["std"]
            append_rows(out_dir / "final.parquet", [row], key=("cell", "scenario", "mode", "method", "params"))
    return summaries
