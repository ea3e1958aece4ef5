"""Shared helpers of the benchmark scripts (no Ray, no torch at import time).

* :func:`machine` / :func:`versions`: what a row of ``BENCHMARKS.md`` says about the box;
* :func:`wait_for_load`: wait (poll every 30 s, up to 15 min) for a quiet shared machine;
* :class:`CpuMeter`: CPU utilisation from ``/proc/stat`` deltas (psutil when available);
* :class:`Phases`: ``time.perf_counter`` phase timer;
* :func:`print_table` (rich) and :func:`append_row` (a dated line appended to ``BENCHMARKS.md``);
* :func:`bench_home`: a private ``$CSSEG_HOME`` for the benchmarks (synthetic data + filter
  caches), so they never touch the user's cache nor race with other jobs' files.
"""

from __future__ import annotations

import argparse
import contextlib
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


class Phases:
    """Named ``time.perf_counter`` phases: ``with ph("imports"): ...``; ``ph.as_dict()``."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        return dict(self.times)


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
