"""``run_sweep(spec)``: one Tuner + one Optuna study per grid cell, resumable, never stopped by a trial.

    from sweeper import SweepSpec, run_sweep
    sweep_dir = run_sweep(SweepSpec(scenarios=("voc-15-1",), method="sdr", trials=50))

Layout of ``<storage>/<name>/``: ``sweep.json`` (spec, identity, progress, step-0 counts),
``steps.parquet`` + ``trials.parquet``, ``optuna-<cell>.log`` (Optuna journal, readable by
optuna-dashboard), ``tune/<cell>/`` (Tune experiment), ``train/<trial_id>/`` (Ray Train runs
and step checkpoints), ``step0/<key>.pt`` (shared step-0 states), ``tb/`` (TensorBoard) and
``rows/`` (per-trial fragments merged into the tables).

``sweep.log`` holds Ray's, Tune's and Optuna's output (and the workers' prints, appended at
the end when the sweep started Ray) while the terminal shows the live table of ``live.py``;
``SweepSpec.verbose >= 1`` (``csseg sweep --verbose``) restores Ray's own console output.

The driver trainable asks for no CPU (``{"CPU": 0, "memory": 1 MiB}``): with 2 CPUs and two
1-CPU trials even a fractional driver CPU (2 × 1.01 > 2) leaves a Train worker unplaced
forever (the deadlock of ray#54305); concurrency is sized from the workers' needs instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from csseg_core.errors import ConfigError
from search_spaces import GridCell, to_optuna

from .live import LiveView, SweepProgress, append_worker_logs, prints_to_file, ray_output_to_file
from .ray_session import init_ray, log, probe_address, ray_logs_dir
from .spec import ASHA_NEEDS_DASHBOARD, TEST_PROTOCOL_NOTE, Plan, SweepSpec, plan_sweep, spec_to_dict
from .step0_cache import get_cache, kill_cache, step0_dir
from .tables import STEPS, TRIALS, merge_trial, read_json, read_table, record_end, started_trials, write_json
from .trial import step0_threads, trains_in_process, trial_driver

DRIVER_RESOURCES = {"CPU": 0, "memory": 1 << 20}

# Tune pickles the callbacks below into a cell's experiment (tuner.pkl); experiments interrupted
# before this module was renamed from ``sweeper.runner`` name them there: let them restore.
sys.modules.setdefault(f"{__package__}.runner", sys.modules[__name__])


def _error_line(trial) -> str | None:
    """The last non-empty line of Tune's ``error.txt`` for ``trial`` (a traceback ends with the error)."""
    path = getattr(trial, "error_file", None)
    with contextlib.suppress(OSError):
        if path and Path(path).exists():
            lines = [ln for ln in Path(path).read_text().strip().splitlines() if ln.strip()]
            return lines[-1] if lines else None
    return None


class TablesCallback(tune.Callback):
    """Records how Tune ended each trial, then merges its fragments into the Parquet tables (driver process only).

    Tune calls ``on_trial_complete`` for a trial the scheduler stops *before* it stops the trial's
    actor, so the record (``tune.json``, see ``tables.py``) exists before the driver can see its
    Train controller die: the trial is ``stopped``, not an error.
    """

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = sweep_dir

    def _merge(self, trial, ended: str) -> None:
        try:
            line = _error_line(trial) if ended == "error" else None
            error = line[:500] if line else None
            last = getattr(trial, "last_result", None) or {}
            step, wall = last.get("step"), last.get("time_total_s")
            record_end(self.sweep_dir, trial.trial_id, ended, error=error,
                       reported_step=int(step) if step is not None else None,
                       wall_s=float(wall) if wall is not None else None)
            merge_trial(self.sweep_dir, trial.trial_id)
        except Exception as err:  # noqa: BLE001 - a table problem must never stop the sweep
            log(f"could not record trial {trial.trial_id}: {type(err).__name__}: {err} (merged again at the cell's end)")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._merge(trial, "complete")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._merge(trial, "error")


#: the live views of the sweeps running in this process, by sweep name (see :class:`LiveCallback`)
_VIEWS: dict[str, LiveView] = {}


class LiveCallback(tune.Callback):
    """Feeds the sweep's :class:`~sweeper.live.LiveView` from Tune's trial events (driver process).

    It holds names only: Tune pickles its callbacks into the experiment (``tuner.pkl``), and a
    restored experiment then finds the view of the sweep running now, if any.
    """

    def __init__(self, sweep: str, cell: str) -> None:
        self.sweep, self.cell = sweep, cell

    def _view(self) -> LiveView | None:
        return _VIEWS.get(self.sweep)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if (view := self._view()) is not None:
            view.update(view.progress.start(self.cell, trial.trial_id, time.time()))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if (view := self._view()) is not None:
            view.update(view.progress.result(self.cell, trial.trial_id, result, time.time()))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if (view := self._view()) is not None:
            view.update(view.progress.end(self.cell, trial.trial_id, time.time()), ended=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if (view := self._view()) is None:
            return
        line = _error_line(trial)
        message = line.split("TrialError: ", 1)[-1][:300] if line else None
        view.update(view.progress.end(self.cell, trial.trial_id, time.time(), error=message or "failed",
                                      error_path=getattr(trial, "error_file", None)), ended=True)


def announce_data(plan: Plan) -> None:
    """Without ``--data-root``: make the synthetic datasets here, once, before any trial (one note line)."""
    if plan.spec.data_root:
        return
    from csseg_core.data import default_data_root
    from csseg_core.scenarios import get_scenario

    for dataset in dict.fromkeys(get_scenario(c.scenario).dataset for c in plan.cells):
        default_data_root(dataset)


def size_concurrency(spec: SweepSpec, resources: dict[str, float]) -> int:
    """Concurrent trials the cluster holds (each needs all its workers at once), capped by spec and trials."""
    need_cpu = spec.workers_per_trial * spec.cpus_per_worker
    need_gpu = spec.workers_per_trial * spec.gpus_per_worker
    fits = math.floor(resources.get("CPU", 0.0) / need_cpu + 1e-9)
    if need_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / need_gpu + 1e-9))
    if fits < 1:
        raise ConfigError(
            f"a trial needs {spec.workers_per_trial} worker(s) x ({spec.cpus_per_worker:g} CPU, {spec.gpus_per_worker:g} GPU) "
            f"but the cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs; "
            "lower --workers-per-trial / --gpus-per-worker or join a bigger cluster")
    if spec.concurrency is not None and spec.concurrency > fits:
        log(f"concurrency {spec.concurrency} lowered to {fits}: the cluster holds {fits} trial(s) at once")
    return max(1, min(fits if spec.concurrency is None else min(spec.concurrency, fits), spec.trials))


def driver_resources(ctx: dict) -> tune.PlacementGroupFactory:
    """Each trial's driver on this (the sweep's) node when it can (a soft hint): :data:`DRIVER_RESOURCES`,
    or the worker's CPUs when it trains in process (:func:`sweeper.trial.trains_in_process`). On a
    cluster the drivers and their Train controllers (pinned to the driver's node) live beside the
    sweep and its step-0 cache; worker nodes only hold Train workers, which Ray Train restarts from
    the trial's last step checkpoint when a node is lost (``--max-failures``)."""
    here = ray.get_runtime_context().get_node_id()
    bundle = {**DRIVER_RESOURCES, "CPU": ctx["cpus_per_worker"]} if ctx.get("in_process") else DRIVER_RESOURCES
    return tune.PlacementGroupFactory([bundle], strategy="STRICT_PACK", _soft_target_node_id=here)


# ---------------------------------------------------------------------------- sweep folder
def _json_roundtrip(d: Any) -> Any:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def prepare_dir(plan: Plan) -> dict:
    """Create ``sweep.json`` or check it belongs to the same sweep; returns its content."""
    path = plan.sweep_dir / "sweep.json"
    state = read_json(path)
    identity = _json_roundtrip(plan.identity)
    if state is None:
        if plan.spec.resume:
            raise ConfigError(f"nothing to resume: no sweep at {plan.sweep_dir}; drop --resume to start it")
        state = {"name": plan.name, "identity": identity, "cells": [c.name for c in plan.cells], "cells_done": []}
    elif state.get("identity") != identity:
        old = state.get("identity", {})
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise ConfigError(f"sweep {plan.name!r} in {plan.sweep_dir} was made with a different spec "
                          f"({', '.join(diff)} differ); pass another --name or the original options")
    else:
        log(f"resuming sweep {plan.name} ({len(state.get('cells_done', []))}/{len(plan.cells)} cells done)")
    state["spec"] = _json_roundtrip(spec_to_dict(plan.spec))
    state["status"] = "running"
    write_json(path, state)
    return state


# ---------------------------------------------------------------------------- one cell
def _cell_ctx(plan: Plan, cell: GridCell) -> dict[str, Any]:
    s = plan.spec
    return {"sweep": plan.name, "sweep_dir": str(plan.sweep_dir), "cell": cell.name, "scenario": cell.scenario,
            "mode": cell.mode, "method": plan.method, "profile": s.profile, "data_root": s.data_root,
            "overrides": plan.overrides, "seed": plan.cell_seed(cell), "workers_per_trial": s.workers_per_trial,
            "gpus_per_worker": s.gpus_per_worker, "cpus_per_worker": s.cpus_per_worker,
            "max_failures": s.max_failures, "poll_s": 1.0, "last_step": plan.last_step(cell), "protocol": s.protocol}


def _searcher(plan: Plan, cell: GridCell):
    from optuna.samplers import TPESampler
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray.tune.search.optuna import OptunaSearch

    storage = JournalStorage(JournalFileBackend(str(plan.sweep_dir / f"optuna-{cell.name}.log")))
    metric: Any = list(plan.objectives) if plan.multi_objective else plan.metric
    mode: Any = ["max"] * len(plan.objectives) if plan.multi_objective else "max"
    return OptunaSearch(space=to_optuna(plan.space), metric=metric, mode=mode,
                        points_to_evaluate=[dict(p) for p in plan.points] or None,
                        sampler=TPESampler(seed=plan.spec.seed), study_name=cell.name, storage=storage)


def tune_config(plan: Plan, cell: GridCell, concurrency: int) -> tuple[tune.TuneConfig, dict | None]:
    """The cell's ``TuneConfig`` (searcher, scheduler, samples, concurrency) and its ``param_space``.

    With a search space: ``OptunaSearch`` (seeded TPE, journal storage, the preset first) for
    ``trials`` samples. Without one (FT): the preset over ``trials`` consecutive seeds.
    With ``only_points``: exactly the given points, as a grid (the re-evaluation of the best
    trials over seeds). ASHA (``time_attr="step"``) is used only when a trial runs at least
    2 incremental steps. Without a scheduler Tune reuses a finished trial's actor for the next
    trial (``reuse_actors``: 2–3 s less per trial on 2 cores, BENCHMARKS.md); not under ASHA,
    where only killing a stopped trial's actor stops its Train workers at once.
    """
    spec = plan.spec
    last_step = plan.last_step(cell)
    scheduler = None
    if spec.scheduler == "asha" and last_step >= 2:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", metric=plan.metric, mode="max", max_t=last_step,
                                  grace_period=1, reduction_factor=2)
    if spec.only_points:
        searcher, param_space, samples = None, {"point": tune.grid_search([dict(p) for p in plan.points])}, 1
    elif plan.space:
        searcher, param_space, samples = _searcher(plan, cell), None, spec.trials
    else:  # nothing to search (FT): the preset over consecutive seeds
        seeds = [plan.cell_seed(cell) + i for i in range(spec.trials)]
        searcher, param_space, samples = None, {"seed": tune.grid_search(seeds)}, 1
    config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=samples,
                             max_concurrent_trials=concurrency, reuse_actors=scheduler is None)
    return config, param_space


def run_cell(plan: Plan, cell: GridCell, concurrency: int):
    """Fit (or restore and finish) the Tuner of one grid cell; returns its ResultGrid.

    A restored experiment keeps the callbacks it was started with (Tune pickles them).
    """
    ctx = _cell_ctx(plan, cell)
    ctx["step0_threads"] = step0_threads(ctx, {} if plan.spec.only_points else plan.space, plan.points,
                                         seeds=plan.spec.trials, concurrency=concurrency)
    ctx["in_process"] = trains_in_process(ctx)
    trainable = tune.with_resources(tune.with_parameters(trial_driver, ctx=ctx), driver_resources(ctx))
    exp_dir = plan.sweep_dir / "tune" / cell.name
    if tune.Tuner.can_restore(str(exp_dir)):
        log(f"{cell.name}: restoring the interrupted Tune experiment")
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True).fit()
    config, param_space = tune_config(plan, cell, concurrency)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=config,
        run_config=tune.RunConfig(name=cell.name, storage_path=str(plan.sweep_dir / "tune"),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[TablesCallback(str(plan.sweep_dir)), LiveCallback(plan.name, cell.name)],
                                  verbose=plan.spec.verbose),
    )
    return tuner.fit()


def expected_trials(plan: Plan) -> int:
    """How many trials a cell runs: the given points (``only_points``), else ``trials``."""
    return len(plan.points) if plan.spec.only_points else plan.spec.trials


def cell_finished(grid, expected: int) -> bool:
    """Whether every trial of a cell's ResultGrid ended (finished, stopped by ASHA, or errored) and
    there are as many as the cell was to run. An interrupted ``fit()`` (Ctrl-C) returns normally
    with trials still running or never started: such a cell is not done, and the next run of the
    same command restores its Tune experiment instead of skipping it."""
    return len(grid) >= expected and grid.num_terminated + grid.num_errors == len(grid)


# ---------------------------------------------------------------------------- the sweep
def run_sweep(spec: SweepSpec) -> Path:
    """Run (or resume) a sweep and return its folder.

    Every cell of ``scenarios × modes × grid_seeds`` gets one Tuner and one Optuna study
    (seeded TPE, journal file in the sweep folder, the preset as first trial). Cells already
    finished are skipped; an interrupted cell is restored (finished trials are not run again,
    errored ones are retried). A failing trial is recorded and never stops the sweep.

    Args:
        spec: the sweep; validated before Ray starts (ConfigError, one line).

    Returns:
        The sweep folder (``<storage>/<name>``).
    """
    plan = plan_sweep(spec)
    if not ray.is_initialized():  # a dead --address fails before the sweep folder is made
        probe_address(spec.address or os.environ.get("RAY_ADDRESS"))
    if spec.select_on == "test":
        log(TEST_PROTOCOL_NOTE)
    state = prepare_dir(plan)
    announce_data(plan)
    started = time.perf_counter()
    calm = spec.verbose < 1
    log_path = plan.sweep_dir / "sweep.log"
    if calm:
        log(f"Ray/Tune output: {log_path}  (--verbose shows it here)")
    own_ray = killed = False
    with (ray_output_to_file(log_path) if calm else contextlib.nullcontext()):
        try:
            own_ray, url = init_ray(spec)
            logs_dir = ray_logs_dir()
            logging.getLogger("ray.csseg").info(f"sweep {plan.name}: Ray session logs (worker output) in {logs_dir}")
            if own_ray and url is None and spec.scheduler == "asha":  # the dashboard failed to start
                raise ConfigError(ASHA_NEEDS_DASHBOARD)
            concurrency = size_concurrency(spec, ray.cluster_resources())
            log(f"sweep {plan.name}: {len(plan.cells)} cell(s) x {spec.trials} trial(s) of {plan.method}, "
                f"{concurrency} at once -> {plan.sweep_dir}")
            get_cache(plan.name, step0_dir(plan.sweep_dir))
            todo = [c for c in plan.cells if c.name not in state["cells_done"]]
            for cell in plan.cells:
                if cell.name in state["cells_done"]:
                    log(f"{cell.name}: already complete, skipped")
            progress = SweepProgress(cells=[c.name for c in todo], trials_per_cell=spec.trials,
                                     last_step={c.name: plan.last_step(c) for c in todo}, metric=plan.metric,
                                     dashboard_url=url, log_path=str(log_path) if calm else None)
            if calm:
                _VIEWS[plan.name] = LiveView(progress)
            with (_VIEWS[plan.name] if calm else contextlib.nullcontext()):
                for cell in todo:
                    with (prints_to_file(log_path) if calm else contextlib.nullcontext()):
                        grid = run_cell(plan, cell, concurrency)
                    for trial_id in started_trials(plan.sweep_dir, cell.name):  # catch anything a callback missed,
                        merge_trial(plan.sweep_dir, trial_id)  # and the steps a stopped trial finished meanwhile
                    if not cell_finished(grid, expected_trials(plan)):  # Ctrl-C: Tune's fit() returns early
                        raise KeyboardInterrupt(f"{cell.name}: {grid.num_terminated + grid.num_errors} of "
                                                f"{expected_trials(plan)} trials ended")
                    state["cells_done"].append(cell.name)
                    write_json(plan.sweep_dir / "sweep.json", state)
            stats, killed = kill_cache(plan.name) or {}, True
        finally:
            _VIEWS.pop(plan.name, None)
            if not killed:
                kill_cache(plan.name)
            if own_ray:
                if calm:
                    append_worker_logs(log_path, ray_logs_dir())
                ray.shutdown()
    state.update(status="complete", step0=_step0_summary(plan, stats), wall_s=time.perf_counter() - started)
    write_json(plan.sweep_dir / "sweep.json", state)
    _closing_note(plan, state)
    return plan.sweep_dir


def _step0_summary(plan: Plan, stats: dict) -> dict[str, Any]:
    """Step-0 counts: trainings, cache hits, states the cache loaded from files, and the trials'
    reads through the object store (``steps.parquet``), those that pulled it from another node's."""
    saved = read_json(step0_dir(plan.sweep_dir) / "stats.json") or {}
    rows = [r for r in read_table(plan.sweep_dir, STEPS) if r.get("step") == 0 and r.get("step0_source") == "object_store"]
    return {"trained": int(saved.get("trained", stats.get("trained", 0))),
            "trained_this_run": int(stats.get("trained", 0)) if stats else 0,
            "reused": int(stats.get("hits", 0)), "loaded_from_files": int(stats.get("loaded", 0)),
            "object_store_reads": len(rows),
            "cross_node_reads": sum(1 for r in rows if r.get("node_id") != r.get("step0_store_node_id"))}


def _closing_note(plan: Plan, state: dict) -> None:
    rows = read_table(plan.sweep_dir, TRIALS)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
    s0 = state["step0"]
    log(f"done in {state['wall_s']:.0f} s: {status}; step 0 trained {s0['trained']} time(s) "
        f"for {len(plan.cells)} cell(s), read {s0['object_store_reads']} time(s) from the object store "
        f"({s0['cross_node_reads']} from another node), loaded {s0['loaded_from_files']} time(s) from files")
    from .export import leaderboard

    board = leaderboard(plan.sweep_dir)
    for row in (r for r in board if r["rank"] == 1):
        log(f"best {row['cell']}: {plan.metric}={row[plan.metric]:.3f} (trial {row['trial_id']}, selected on "
            f"{'validation' if plan.spec.select_on == 'val' else 'TEST'}; test miou_all={row['miou_all'] or 0:.3f})")
    if plan.multi_objective:
        for cell in dict.fromkeys(r["cell"] for r in board):
            front = [r for r in board if r["cell"] == cell and r["pareto"]]
            points = ", ".join(f"{r['trial_id']} ({'/'.join(f'{r[o]:.3f}' for o in plan.objectives)})" for r in front)
            log(f"Pareto front {cell} ({'/'.join(plan.objectives)}): {points}")
    log(f"tables: {plan.sweep_dir / 'trials.parquet'}, {plan.sweep_dir / 'steps.parquet'}")
