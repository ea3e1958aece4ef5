"""Shared helpers of the benchmark scripts (no Ray, no torch at import time).

* :mod:`_machine` (re-exported): :func:`machine` / :func:`versions`, :func:`wait_for_load`,
  :class:`CpuMeter` and :class:`TreeCpu`;
* :func:`print_table` (rich) and :func:`append_row` (a dated line appended to ``BENCHMARKS.md``);
* :func:`bench_home`: a private ``$CSSEG_HOME`` for the benchmarks (synthetic data + filter
  caches), so they never touch the user's cache nor race with other jobs' files.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

_HEADER = """# Benchmarks

Appended by the scripts in `bench/` (see `bench/README.md`): one dated row per run, both sides
of every comparison measured in the same run. `load` is the 1-minute load average at start → end
(the 2-core machine is shared; a load above ~2 means other jobs competed for the cores).

| date | benchmark | machine | versions | settings | figures | load |
|---|---|---|---|---|---|---|
"""


from _machine import CpuMeter, TreeCpu, cpu_model, import_psutil, loadavg, machine, versions, wait_for_load  # noqa: E402,F401


def timed_run_step(cfg, step: int, prev_state, **kwargs):
    """``csseg_core.engine.run_step`` with a phase breakdown (``csseg_core.engine.timed_phases``).

    Returns ``(state, metrics, phases)`` with phases in seconds: ``datasets``, ``model build``,
    ``train loop`` (from the engine's own images/s), ``evaluate`` and ``other`` (the rest of
    ``run_step``'s wall time).
    """
    from csseg_core.engine import run_step, timed_phases

    t0 = time.perf_counter()
    with timed_phases() as timed:
        state, metrics = run_step(cfg, step, prev_state, **kwargs)
    phases = dict(timed)
    wall = time.perf_counter() - t0
    ips = float(metrics.get("images_per_s") or 0.0)
    n_img = int(metrics.get("iterations", 0)) * int(cfg.batch_size)
    phases["train loop"] = n_img / ips if ips > 0 else 0.0
    phases["other"] = max(0.0, wall - sum(phases.values()))
    phases["run_step"] = wall
    return state, metrics, phases


# --------------------------------------------------------------------------- set-up
def bench_home() -> Path:
    """A private ``$CSSEG_HOME`` (``$CSSEG_BENCH_HOME`` or ``~/.cache/csseg-bench``), exported."""
    home = Path(os.environ.get("CSSEG_BENCH_HOME") or "~/.cache/csseg-bench").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["CSSEG_HOME"] = str(home)
    return home


def parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--profile", default="smoke", choices=("smoke", "small", "paper"),
                   help="csseg profile (small/paper: for a GPU machine)")
    p.add_argument("--quick", action="store_true", help="shrink everything for a sanity run (no row is appended)")
    p.add_argument("--no-append", action="store_true", help="do not append a row to BENCHMARKS.md")
    p.add_argument("--no-wait", action="store_true", help="start at once, whatever the load")
    p.add_argument("--max-load", type=float, default=2.5, help="wait until the 1-min load is below this")
    return p


def add_run_args(p: argparse.ArgumentParser, trials: int | None = None) -> argparse.ArgumentParser:
    """Options of the benchmarks that run continual steps (``--scenario``, ``--method``, ``--set``, ...)."""
    p.add_argument("--scenario", default="voc-15-5")
    p.add_argument("--method", default="sdr")
    if trials is not None:
        p.add_argument("--trials", type=int, default=trials, help="trials per sweep (N)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="key=value engine/method override")
    p.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                   help="start Ray without the dashboard (`csseg sweep` starts it)")
    p.add_argument("--json", default=None, help="also write every raw figure as JSON")
    return p


def bench_config(a: argparse.Namespace, overrides: Mapping[str, Any], quick: Mapping[str, Any]):
    """The benchmark's ``ExperimentConfig`` and overrides: its defaults, then ``--quick``'s shrink (at
    most 2 trials), then ``--set``; profiles other than smoke start from random weights."""
    from csseg_core.config import parse_set, resolve_config

    bench_home()
    overrides = {**overrides, **({"pretrained": "none"} if a.profile != "smoke" else {})}
    if a.quick:
        overrides.update(quick)
        if hasattr(a, "trials"):
            a.trials = min(a.trials, 2)
    overrides.update(parse_set(a.sets))
    return resolve_config(a.scenario, a.method, profile=a.profile, overrides=overrides), overrides


def warm_data(cfg, steps: Iterable[int]) -> None:
    """Generate the default synthetic data and fill the filter caches (outside every measurement)."""
    from csseg_core.data import build_datasets, default_data_root
    from csseg_core.scenarios import get_scenario

    sc = get_scenario(cfg.scenario)
    root = cfg.data_root or str(default_data_root(sc.dataset))
    for step in steps:
        build_datasets(sc.dataset, root, sc, cfg.mode, step, crop_size=cfg.crop_size, crop_val=cfg.crop_val,
                       cache_images=False)


def fixed_step0(cfg) -> tuple[dict, Path]:
    """The step-0 state of ``cfg`` with every statistic (for any method) and its file: the shared
    step-0 state of the bench home, trained there once per step-0 key."""
    from csseg_core.methods import STATISTICS
    from csseg_core.scenario_run import shared_step0, shared_step0_path

    path = shared_step0_path(cfg)
    if not path.exists():
        print(f"[bench] training the fixed step-0 state once (every statistic, for any method) -> {path}", flush=True)
    return shared_step0(cfg, collect=STATISTICS), path


def seed_step0(sweep_dir: Path, cfg, state_file: Path) -> None:
    """Put a step-0 state where a sweep's cache actor loads it (``sweeper.step0_cache.seed_state``).

    Then no trial of that sweep trains step 0 (the cache answers "ready" from the file).
    """
    from csseg_core.state import load_state
    from sweeper.step0_cache import seed_state, step0_dir
    from sweeper.trial import portable_metrics

    metrics = portable_metrics(load_state(state_file)["metrics"])
    seed_state(step0_dir(sweep_dir), cfg.step_key(0), state_file, metrics, trained_by="bench")


def start_ray(dashboard: bool = True, scenario: str = "voc-15-5") -> float:
    """Start Ray exactly as ``csseg sweep`` does (``sweeper.ray_session.init_ray``), with ``bench/`` on
    the workers' PYTHONPATH; returns the seconds ``ray.init`` took."""
    bench = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in [str(ROOT), bench, os.environ.get("PYTHONPATH", "")] if x)
    from sweeper import SweepSpec
    from sweeper.ray_session import init_ray

    t0 = time.perf_counter()
    init_ray(SweepSpec(scenarios=(scenario,), dashboard=dashboard))
    return time.perf_counter() - t0


def sweep_figures(sweep_dir: Path) -> dict[str, Any]:
    """Counts and times read back from a finished sweep's tables and ``sweep.json``."""
    from sweeper.tables import STEPS, TRIALS, read_json, read_table

    steps = read_table(sweep_dir, STEPS)
    trials = read_table(sweep_dir, TRIALS)
    info = read_json(Path(sweep_dir) / "sweep.json") or {}
    trained = [r for r in steps if r.get("status") == "ok" and not r.get("cached")]
    return {
        "trials": len(trials), "trials_ok": sum(t["status"] == "ok" for t in trials),
        "step_rows": len(steps), "trained_steps": len(trained),
        "incremental_steps": sum(1 for r in trained if r["step"] > 0),
        "step0_trained": sum(1 for r in trained if r["step"] == 0),
        "step0_wall_s": [r["wall_s"] for r in trained if r["step"] == 0],
        "inc_wall_s": [r["wall_s"] for r in trained if r["step"] > 0],
        "trial_wall_s": [t["wall_s"] for t in trials],
        "sweep_wall_s": info.get("wall_s"),
        "images_per_s": [r["images_per_s"] for r in trained],
    }


# --------------------------------------------------------------------------- output
def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.{digits}g}"
    return str(x)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a rich table (plain text when rich is missing)."""
    rows = [[fmt(c) for c in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        print(" | ".join(columns))
        for r in rows:
            print(" | ".join(r))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def _cell(d: Mapping[str, Any] | str) -> str:
    if isinstance(d, str):
        return d.replace("|", "/").replace("\n", " ")
    return "; ".join(f"{k}={fmt(v)}" for k, v in d.items()).replace("|", "/")


def append_row(benchmark: str, settings: Mapping[str, Any], figures: Mapping[str, Any], load: tuple[float, float],
               *, path: Path = BENCHMARKS_MD, libs: Sequence[str] = ("torch", "ray")) -> None:
    """Append one dated row to ``BENCHMARKS.md`` (creates the file with its header)."""
    if not path.exists():
        path.write_text(_HEADER)
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    row = [date, benchmark, machine(), versions(*libs), _cell(settings), _cell(figures),
           f"{load[0]:.2f} → {load[1]:.2f}"]
    with path.open("a") as f:
        f.write("| " + " | ".join(row) + " |\n")
    print(f"[bench] appended a row to {path}")


def dump_json(path: str | os.PathLike | None, data: Any) -> None:
    """Write the raw figures as JSON too (``--json FILE``)."""
    if path:
        Path(path).write_text(json.dumps(data, indent=1, default=str))
