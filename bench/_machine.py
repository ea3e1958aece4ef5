"""What a benchmark row says about the machine, and how busy its CPUs are (no Ray, no torch).

* :func:`machine` / :func:`versions`: what a row of ``BENCHMARKS.md`` says about the box;
* :func:`loadavg` / :func:`wait_for_load`: wait (poll every 30 s, up to 15 min) for a quiet shared machine;
* :class:`CpuMeter`: CPU utilisation from ``/proc/stat`` deltas (psutil when available);
* :class:`TreeCpu`: CPU-seconds of a process tree, per process name.

Re-exported by ``_common`` (the scripts use them as ``C.loadavg``, ``C.TreeCpu``, ...).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path


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
