"""``SweepSpec``: the frozen description of a sweep, validated up front into a :class:`Plan`.

Every problem is a one-line :class:`~csseg_core.errors.ConfigError` raised before Ray starts:
unknown scenario/mode/method/metric/scheduler/key, ``trials < 1``, bad resources, an
unwritable storage folder, a name already used by a different sweep.

The sweep's name is ``<method>-<hash>`` of its identity (what it searches and how), never the
clock; resources (concurrency, workers, address, ...) are not part of it, so a sweep can be
resumed with other resources.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from csseg_core.config import resolve_config
from csseg_core.errors import ConfigError
from csseg_core.metrics import ALL_METRICS as _ALL
from csseg_core.metrics import METRICS as _METRICS
from csseg_core.metrics import split_metric
from search_spaces import (
    GridCell,
    Param,
    canonical,
    check_point,
    check_space,
    get_space,
    grid,
    param_to_dict,
    preset,
)

METRICS = _METRICS
SCHEDULERS = ("fifo", "asha")
ASHA_NEEDS_DASHBOARD = ("--scheduler asha needs the Ray dashboard: Ray Train frees the CPUs of a trial ASHA stops "
                        "through the dashboard's State API, so without it later trials wait forever; drop --no-dashboard "
                        "(or install ray[default])")
SPLITS = ("val", "test")
PROTOCOLS = ("end-of-training", "first-step")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TEST_PROTOCOL_NOTE = ("selecting on test (the dataset's evaluation images): the literature's test-set protocol "
                      "(SDR, MiB, PLOP), so the choice is tuned on the images its numbers are reported on")


def metric_name(name: str, select_on: str = "val") -> str:
    """The column a sweep ranks by: the metric's kind from ``name``, its split from ``select_on``.

    ``all`` / ``miou_all`` -> ``val_miou_all`` (or ``miou_all`` with ``select_on="test"``);
    an explicit ``val_miou_*`` stays a validation metric. ConfigError for anything else.
    """
    if select_on not in SPLITS:
        raise ConfigError(f"unknown split {select_on!r} for --select-on; choose val (default) or test")
    key = str(name).strip().lower()
    if key.startswith("val_") and select_on == "test":
        raise ConfigError(f"metric {name!r} is a validation metric but --select-on test was given; pass --metric "
                          f"{key[len('val_'):]}")
    out = split_metric(key, "val" if key.startswith("val_") else select_on)
    if out not in _ALL:
        raise ConfigError(f"unknown metric {name!r}; choose one of: all, old, new, avg (or {', '.join(_METRICS)}); "
                          "the split comes from --select-on")
    return out


def _tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def _pairs(value: Any) -> tuple[tuple[str, Any], ...]:
    items = value.items() if isinstance(value, Mapping) else (value or ())
    return tuple(sorted((str(k), v) for k, v in items))


@dataclass(frozen=True)
class SweepSpec:
    """Everything ``csseg sweep`` needs. Lists and dicts are accepted and frozen to tuples.

    Attributes:
        scenarios: scenario names (aliases allowed). modes: modes of the grid.
        method: the continual method whose hyperparameters are searched.
        trials: trials per grid cell (the first evaluates the reference preset).
        metric: objective kind ``all|old|new|avg`` (``miou_*`` accepted), maximised at the last
            step run, on the split ``select_on``; also the ASHA metric and the export default.
        select_on: ``val`` (default: the held-out validation split, see ``val_fraction``) or
            ``test`` (the literature's protocol: tunes on the reported images; says so).
        protocol: ``end-of-training`` (every step, select on the last) or ``first-step``
            (step 1 only from the shared step 0, select on it; ``csseg final`` runs all steps).
        only_points: run exactly ``points`` (no preset, no sampler): the re-evaluation of the
            best trials over seeds by ``export-best --top K --seeds S``.
        objectives: two or more metrics for a multi-objective search (e.g. ``("old", "new")``);
            the Pareto front is reported. Empty = single objective ``metric``.
        scheduler: ``fifo`` or ``asha`` (stops weak trials at step boundaries).
        concurrency: concurrent trials; None = as many as the cluster's CPUs/GPUs hold.
        workers_per_trial, gpus_per_worker, cpus_per_worker: the Ray Train scaling of a trial.
        address: None = start a local Ray (dashboard on 127.0.0.1); ``auto``/``HOST:PORT`` = join.
        storage: parent folder of the sweep folder. name: None = ``<method>-<hash of spec>``.
        resume: continue the sweep ``name`` (an existing sweep of the same name resumes anyway).
        seed: seed of the runs (unless a grid seed is given) and of the TPE sampler.
        max_failures: retries of a failed trial, from its last finished step.
        data_root, profile: passed to ``resolve_config``. overrides: ``--set`` pairs; a key set
            here is pinned and removed from the search space.
        grid_seeds: seeds as a grid axis (``(None,)`` = one cell per scenario × mode).
        space: a custom search space (name -> primitive) instead of ``search_spaces/<method>.py``.
        points: extra points evaluated after the preset (custom spaces: the only points).
        verbose: 0 = the calm live table, Ray/Tune/worker output in ``<sweep>/sweep.log``;
            1+ = Ray's own console output (Tune's verbosity: 1 status table, 2-3 more).
        dashboard: start the Ray dashboard when Ray is started locally.
    """

    scenarios: tuple[str, ...]
    method: str = "sdr"
    modes: tuple[str, ...] = ("disjoint",)
    trials: int = 20
    metric: str = "miou_all"
    objectives: tuple[str, ...] = ()
    select_on: str = "val"
    protocol: str = "end-of-training"
    only_points: bool = False
    scheduler: str = "fifo"
    concurrency: int | None = None
    workers_per_trial: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    address: str | None = None
    storage: str = "sweeps"
    name: str | None = None
    resume: bool = False
    seed: int = 0
    max_failures: int = 1
    data_root: str | None = None
    profile: str = "smoke"
    overrides: tuple[tuple[str, Any], ...] = ()
    grid_seeds: tuple[int | None, ...] = (None,)
    space: tuple[tuple[str, Param], ...] | None = None
    points: tuple[tuple[tuple[str, Any], ...], ...] = ()
    verbose: int = 0
    dashboard: bool = True

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("scenarios", _tuple(self.scenarios))
        set_("modes", _tuple(self.modes))
        set_("objectives", _tuple(self.objectives))
        set_("grid_seeds", _tuple(self.grid_seeds) or (None,))
        set_("overrides", _pairs(self.overrides))
        if self.space is not None:
            set_("space", _pairs(self.space))
        set_("points", tuple(_pairs(p) for p in (self.points or ())))
        if self.storage is not None:
            set_("storage", str(self.storage))


@dataclass(frozen=True)
class Plan:
    """A validated sweep: derived names, folders, cells, space and points."""

    spec: SweepSpec
    name: str
    sweep_dir: Path
    method: str
    metric: str
    objectives: tuple[str, ...]
    cells: tuple[GridCell, ...]
    space: dict = field(hash=False)
    points: tuple[dict, ...] = field(hash=False)
    overrides: dict = field(hash=False)
    identity: dict = field(hash=False)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def last_step(self, cell: GridCell) -> int:
        """The last step a trial of ``cell`` runs (1 under the first-step protocol)."""
        from csseg_core.scenarios import get_scenario

        num_steps = get_scenario(cell.scenario).num_steps
        return min(1, num_steps - 1) if self.spec.protocol == "first-step" else num_steps - 1

    def cell_seed(self, cell: GridCell) -> int:
        return self.spec.seed if cell.seed is None else cell.seed


def _check_storage(storage: str) -> Path:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(storage)):  # s3://, gs://, hdfs:// (a Path keeps one slash)
        raise ConfigError(f"storage {storage!r} is a URI; the sweep folder must be a path every node sees: mount the "
                          "bucket or share (NFS, gcsfuse, mountpoint-s3) and pass --storage /mnt/DIR (docs/CLUSTER.md)")
    root = Path(storage).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".csseg-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"storage directory {root} is not writable ({err.strerror or err}); pass --storage DIR") from None
    return root


def _identity(spec: SweepSpec, method: str, metric: str, objectives: tuple, cells, space, points, overrides) -> dict:
    return {
        "method": method, "cells": [c.to_dict() for c in cells], "trials": spec.trials, "metric": metric,
        "select_on": spec.select_on, "protocol": spec.protocol, "only_points": spec.only_points,
        "objectives": list(objectives), "scheduler": spec.scheduler, "seed": spec.seed, "profile": spec.profile,
        "data_root": spec.data_root, "overrides": overrides, "points": list(points),
        "space": {k: param_to_dict(v) for k, v in sorted(space.items())},
    }


def plan_sweep(spec: SweepSpec) -> Plan:
    """Validate ``spec`` (no Ray needed) and derive its name, folder, cells, space and points.

    Raises:
        ConfigError: one line naming the bad value.
    """
    method = canonical(spec.method)
    if not isinstance(spec.trials, int) or spec.trials < 1:
        raise ConfigError(f"trials must be an integer >= 1 (got {spec.trials!r})")
    if spec.protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {spec.protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    metric = metric_name(spec.metric, spec.select_on)
    objectives = tuple(dict.fromkeys(metric_name(o, spec.select_on) for o in spec.objectives))
    if len(objectives) == 1:
        metric, objectives = objectives[0], ()
    if spec.scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {spec.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if spec.scheduler == "asha" and not spec.dashboard and spec.address is None and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(ASHA_NEEDS_DASHBOARD)
    if spec.concurrency is not None and spec.concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1 or unset (got {spec.concurrency})")
    if spec.workers_per_trial < 1:
        raise ConfigError(f"workers_per_trial must be >= 1 (got {spec.workers_per_trial})")
    if spec.gpus_per_worker < 0 or spec.cpus_per_worker <= 0:
        raise ConfigError("gpus_per_worker must be >= 0 and cpus_per_worker > 0")
    if spec.max_failures < -1:
        raise ConfigError(f"max_failures must be >= 0 (or -1 = retry forever), got {spec.max_failures}")
    if spec.name is not None and not _NAME_RE.match(spec.name):
        raise ConfigError(f"sweep name {spec.name!r} may only hold letters, digits, '.', '_' and '-'")
    if not spec.storage:
        raise ConfigError("storage must be a directory")
    cells = tuple(grid(spec.scenarios, spec.modes, spec.grid_seeds))
    overrides = dict(spec.overrides)
    if spec.only_points and not spec.points:
        raise ConfigError("only_points needs at least one point to run")
    if spec.only_points:
        full_space, first = get_space(method) if spec.space is None else check_space(dict(spec.space)), []
    elif spec.space is None:
        full_space, first = get_space(method), [preset(method)]
    else:
        full_space, first = check_space(dict(spec.space), where="custom search space"), []
    space = {k: v for k, v in full_space.items() if k not in overrides}
    points = [{k: v for k, v in p.items() if k in space} for p in first]
    for i, p in enumerate(spec.points):
        points.append(check_point(space, {k: v for k, v in p if k in space}, where=f"point {i + 1}"))
    points = [p for p in dict.fromkeys(json.dumps(p, sort_keys=True) for p in points if p)]
    points = tuple(json.loads(p) for p in points)
    for cell in cells:  # unknown keys / bad values fail here, before Ray starts
        for point in points or ({},):
            cfg = resolve_config(cell.scenario, method, profile=spec.profile, mode=cell.mode, seed=cell.seed,
                                 data_root=spec.data_root, overrides={**overrides, **point})
            if spec.select_on == "val" and cfg.val_fraction <= 0:
                raise ConfigError("val_fraction=0 leaves no validation split to select on; drop --set val_fraction=0 "
                                  "or pass --select-on test")
    identity = _identity(spec, method, metric, objectives, cells, space, points, overrides)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = spec.name or f"{method}-{digest}"
    sweep_dir = _check_storage(spec.storage) / name
    return Plan(spec=spec, name=name, sweep_dir=sweep_dir, method=method, metric=metric, objectives=objectives,
                cells=cells, space=space, points=points, overrides=overrides, identity=identity)


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """JSON-friendly dict of a spec (custom spaces as primitive descriptions)."""
    d = asdict(spec)
    if spec.space is not None:
        d["space"] = {k: param_to_dict(v) for k, v in spec.space}
    d["overrides"] = dict(spec.overrides)
    d["points"] = [dict(p) for p in spec.points]
    return d

