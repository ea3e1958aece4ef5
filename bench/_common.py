"""Shared helpers of the benchmark scripts (no Ray, no torch at import time).

* :func:`machine` / :func:`versions`: what a row of ``BENCHMARKS.md`` says about the box;
* :func:`wait_for_load`: wait (poll every 30 s, up to 15 min) for a quiet shared machine;
* :class:`CpuMeter`: CPU utilisation from ``/proc/stat`` deltas (psutil when available);
* :func:`print_table` (rich) and :func:`append_row` (a dated line appended to ``BENCHMARKS.md``);
* :func:`bench_home`: a private ``$CSSEG_HOME`` for the benchmarks (synthetic data + filter
  caches), so they never touch the user's cache nor race with other jobs' files.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
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


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """``2 cpu AMD EPYC, 23 GiB, no GPU`` (GPU name when torch sees one)."""
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    gpu = "no GPU"
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} cpu {cpu_model()}{mem}, {gpu}"


def versions(*names: str) -> str:
    """``torch 2.14.1, ray 2.60.0`` for the given distributions (installed metadata, no import)."""
    from importlib import metadata

    out = []
    for name in names or ("torch", "ray"):
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} -")
    return ", ".join(out)


def loadavg() -> float:
    """1-minute load average."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return os.getloadavg()[0]


def wait_for_load(limit: float = 2.5, *, poll_s: float = 30.0, max_wait_s: float = 900.0, enabled: bool = True) -> float:
    """Wait until the 1-minute load is below ``limit`` (polling), at most ``max_wait_s``.

    Returns the load when the benchmark starts (it starts anyway after ``max_wait_s``: the row
    records the load, so a noisy figure is visible as such).
    """
    load = loadavg()
    if not enabled:
        return load
    waited = 0.0
    while load >= limit and waited < max_wait_s:
        print(f"[bench] load {load:.2f} >= {limit}; waiting ({waited:.0f}/{max_wait_s:.0f} s)", flush=True)
        time.sleep(poll_s)
        waited += poll_s
        load = loadavg()
    if load >= limit:
        print(f"[bench] load still {load:.2f} after {max_wait_s:.0f} s: starting anyway", flush=True)
    return load


# --------------------------------------------------------------------------- CPU utilisation
def _proc_stat() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs together."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def import_psutil():
    """psutil, or the copy Ray vendors in ``ray/thirdparty_files`` (importable once ray is); None."""
    import importlib

    for first in (None, "ray"):  # importing ray puts ray/thirdparty_files on sys.path
        try:
            if first:
                importlib.import_module(first)
            return importlib.import_module("psutil")
        except ImportError:
            continue
    return None


class CpuMeter:
    """Whole-machine CPU utilisation between ``start()`` and ``stop()`` (0..1 of all cores).

    Note: on a shared machine this counts other users' processes too; :attr:`own` is the
    CPU time of this process and its children (``os.times``; children only once they are
    reaped, so Ray workers are not in it) and is reported for reference only.
    """

    def start(self) -> "CpuMeter":
        self._busy0, self._total0 = _proc_stat()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> dict[str, float]:
        busy1, total1 = _proc_stat()
        wall = time.perf_counter() - self._t0
        total = max(total1 - self._total0, 1e-9)
        return {"cpu_util": (busy1 - self._busy0) / total, "wall_s": wall}


def _proc_name(proc) -> str:
    """``ray::RayTrainWorker`` / ``raylet`` / ``python bench/x.py`` -> a short, groupable name."""
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001
        cmd = []
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split(".")[0].split(":")[-1] or cmd[0]  # ray::TrainController.run -> TrainController
    if cmd:
        exe = os.path.basename(cmd[0])
        for part in cmd[1:3]:
            if part.endswith(".py"):
                return f"{exe} {os.path.basename(part)}"
        return exe
    try:
        return proc.name()
    except Exception:  # noqa: BLE001
        return "?"


class TreeCpu:
    """CPU time used by this process and all its descendants (Ray's raylet, workers, ...).

    A background thread samples ``psutil`` every ``interval`` seconds and keeps the last CPU
    time of every pid it saw, so processes that exit between samples lose at most one
    interval. ``stop()`` returns ``tree_cpu_util`` = CPU seconds / (wall × cpu count), the share
    of the machine this benchmark used, unlike ``/proc/stat`` which counts every user.
    Without psutil it returns NaN.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._seen: dict[tuple[int, float], float] = {}
        self._names: dict[tuple[int, float], str] = {}
        self._stop = None
        self._thread = None

    def _sample(self) -> None:
        psutil = import_psutil()
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                key = (proc.pid, proc.create_time())
                t = proc.cpu_times()
                self._seen[key] = t.user + t.system
                name = _proc_name(proc)  # Ray workers start as setup_worker.py, then become ray::<Actor>
                if key not in self._names or not name.endswith("setup_worker.py"):
                    self._names[key] = name
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "TreeCpu":
        import threading

        if import_psutil() is None:
            return self
        self._sample()
        self._base = dict(self._seen)
        self._t0 = time.perf_counter()
        self._proc = CpuMeter().start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        if self._thread is None:
            return {"tree_cpu_s": float("nan"), "tree_cpu_util": float("nan"), "machine_cpu_util": float("nan")}
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.perf_counter() - self._t0
        used = sum(v - self._base.get(k, 0.0) for k, v in self._seen.items())
        machine_util = self._proc.stop()["cpu_util"]
        by_name: dict[str, float] = {}
        for k, v in self._seen.items():
            name = self._names.get(k, "?")
            by_name[name] = by_name.get(name, 0.0) + v - self._base.get(k, 0.0)
        return {"tree_cpu_s": used, "tree_cpu_util": used / (wall * (os.cpu_count() or 1)),
                "machine_cpu_util": machine_util, "cpu_wall_s": wall,
                "cpu_s_by_process": dict(sorted(by_name.items(), key=lambda kv: -kv[1]))}


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
    """The step-0 state of ``cfg``, trained once per step-0 key and kept in the bench home."""
    from csseg_core.state import load_state, save_state

    path = Path(os.environ["CSSEG_HOME"]) / "states" / f"bench-step0-{cfg.step_key(0)}.pt"
    from csseg_core.collectors import held_statistics
    from csseg_core.methods import STATISTICS

    if path.exists():
        state = load_state(path)
        if "metrics" in state and held_statistics(state) >= set(STATISTICS):
            return state, path
    print(f"[bench] training the fixed step-0 state once (every statistic, for any method) -> {path}", flush=True)
    from csseg_core.engine import run_step

    state, _ = run_step(cfg, 0, collect=STATISTICS)
    save_state(state, path)
    return state, path


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
