"""One trial = one Tune function trainable (the *driver*) that runs one Ray Train ``TorchTrainer``.

Driver (:func:`trial_driver`, in the Tune trial actor; asks for no CPU, see ``sweep.py``):
resolves the trial's config and builds ONE ``TorchTrainer`` named after the Tune trial id.

Workers (:func:`train_worker`, one per DDP rank): obtain the step-0 state from the sweep's
cache actor (rank 0 asks; if this trial is the first, all ranks train it and rank 0 publishes
it; if another trial is training it, rank 0 waits, so the worker group's start-up overlaps
that training; otherwise every rank ``ray.get``s the cached ref), then run steps 1..T-1 with
:func:`csseg_core.engine.run_step`,
calling ``ray.train.report`` once per step with the scalar metrics and a checkpoint of the
state (rank 0 writes it). ``TuneReportCallback`` turns each report into one Tune result, so
ASHA stops weak trials at step boundaries (``time_attr="step"``): Tune then kills the trial
actor, and with it the Train controller and workers, so ``fit()`` may raise in the driver;
the sweep's callback has recorded the stop first (``tables.record_end``), so the driver
records the trial as stopped, not failed. A failed worker group is
restarted by Ray Train from the last step checkpoint (``ray.train.get_checkpoint()``).
Per-class IoU and loss terms never go through ``report``: rank 0 writes them as row
fragments (``tables.py``) that the sweep merges into Parquet.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import ray
import ray.train
from ray import tune

from csseg_core.config import ExperimentConfig, resolve_config
from csseg_core.errors import first_line
from csseg_core.metrics import ALL_METRICS
from csseg_core.results import step_row

from .step0_cache import READY, Lease, lookup_cache, state_path, step0_dir
from .tables import rows_dir, tune_end, write_json, write_step_fragment

SCALARS = ("step", *ALL_METRICS, "wall_s", "images_per_s")


class TrialError(RuntimeError):
    """A trial failed; the message is one line (the worker's exception type and message)."""


def scalar_metrics(metrics: dict) -> dict[str, float | int]:
    """The scalar metrics that go through ``ray.train.report`` (NaN stays NaN)."""
    out: dict[str, float | int] = {}
    for k in SCALARS:
        v = metrics.get(k)
        if v is not None:
            out[k] = int(v) if k == "step" else float(v)
    return out


def portable_metrics(metrics: dict) -> dict[str, Any]:
    """Step metrics as plain python values (for the cache actor and JSON)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out[k] = {kk: float(vv) for kk, vv in v.items()}
        elif isinstance(v, (list, tuple)):
            out[k] = [float(x) for x in v]
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        else:
            out[k] = float(v)
    return out


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err)}".strip()


# ---------------------------------------------------------------------------- workers
def train_worker(loop: dict) -> None:
    """Ray Train worker function: steps 1..T-1 of one trial (all ranks call it)."""
    from csseg_core.engine import run_step
    from csseg_core.state import load_state, save_state

    cfg = ExperimentConfig.from_dict(loop["config"])
    in_process = bool(loop.get("in_process"))  # Train's local mode: no Train context inside Tune, rank 0 of 1
    rank = 0 if in_process else ray.train.get_context().get_world_rank()
    sweep_dir, trial_id = loop["sweep_dir"], loop["trial_id"]
    node_id = ray.get_runtime_context().get_node_id()
    extra = {"sweep": loop["sweep"], "trial_id": trial_id, "cell": loop["cell"], "status": "ok", "error": None,
             "node_id": node_id, "worker_node_ids": _gather(node_id, rank)}
    tb_dir = str(Path(sweep_dir) / "tb" / trial_id)

    last_file = Path(loop["last_file"])
    checkpoint = None if in_process else ray.train.get_checkpoint()
    metrics0 = None
    if checkpoint is not None:  # a restarted worker group: go on after the last finished step
        with checkpoint.as_directory() as d:
            state = load_state(Path(d) / "state.pt")
    elif in_process and last_file.is_file():  # a retried in-process trial, likewise
        state = load_state(last_file)
    else:
        state, metrics0 = _step0(cfg, loop, rank, extra)
    last_step = int(loop["last_step"])
    if last_step == 0:  # nothing incremental: the step-0 result is the trial's result
        (tune.report if in_process else ray.train.report)(scalar_metrics(metrics0 or {"step": 0}))
        return
    for step in range(int(state["step"]) + 1, last_step + 1):
        try:
            state, metrics = run_step(cfg, step, state, log_dir=tb_dir)
        except Exception as err:
            if rank == 0:
                write_step_fragment(sweep_dir, trial_id, step_row(
                    cfg, {"step": step}, cached=False, **{**extra, "status": "error", "error": _one_line(err)}))
            raise
        if rank == 0:
            write_step_fragment(sweep_dir, trial_id, step_row(cfg, portable_metrics(metrics), cached=False, **extra))
        if in_process:  # Train's local mode keeps no checkpoint: the trial's own file
            save_state(state, last_file)
            tune.report(scalar_metrics(metrics))
            continue
        with tempfile.TemporaryDirectory(prefix="csseg-ckpt-") as d:
            checkpoint = None
            if rank == 0:
                save_state(state, Path(d) / "state.pt")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(scalar_metrics(metrics), checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:03d}")


def _broadcast(value: str, rank: int) -> str:
    """Rank 0's ``value`` on every rank (no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: str, rank: int) -> list[str]:
    """Every rank's ``value``, in rank order (``[value]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _step0(cfg: ExperimentConfig, loop: dict, rank: int, extra: dict) -> tuple[dict, dict]:
    """The step-0 state from the sweep's cache, training it (all ranks) if this trial is first.

    Rank 0 talks to the cache (waiting while another trial trains the key, keeping its own
    lease alive while it trains) and tells the other ranks what it decided. A READY key stays
    READY, so the other ranks then fetch the same ref.

    The step-0 row records how rank 0 got the state: ``step0_source`` is ``trained`` (this
    trial trained it) or ``object_store`` (a ``ray.get`` of the cache's ref, taking
    ``step0_get_s``); ``step0_node_id`` is the node that trained it and ``step0_store_node_id``
    the node of the cache actor that owns the ref (where ``ray.get`` pulls it from);
    ``step0_threads`` the intra-op threads it was trained with (:func:`step0_threads`).
    """
    from csseg_core.engine import run_step
    from csseg_core.state import save_state, state_from_numpy, state_to_numpy

    sweep_dir, trial_id, key0 = loop["sweep_dir"], loop["trial_id"], loop["key0"]
    cache = lookup_cache(loop["sweep"])
    lease = Lease(cache, key0, trial_id, poll_s=loop.get("poll_s", 1.0))
    decision, ref_list, metrics0 = lease.wait() if rank == 0 else (None, None, None)
    decision = _broadcast(decision, rank)
    store_node = ray.get(cache.node_id.remote()) if rank == 0 else None
    if decision == READY:
        if rank != 0:
            _, ref_list, metrics0 = ray.get(cache.acquire.remote(key0, trial_id))
        started = time.perf_counter()
        arrays = ray.get(ref_list[0])
        get_s = time.perf_counter() - started
        state = state_from_numpy(arrays)
        if rank == 0:
            write_step_fragment(sweep_dir, trial_id, step_row(
                cfg, metrics0, cached=True, step0_source="object_store", step0_node_id=metrics0.get("trained_on_node"),
                step0_store_node_id=store_node, step0_get_s=get_s, **extra))
        return state, metrics0
    try:  # collects what the sweep's one method needs (every trial of a sweep runs the same method)
        with intra_op_threads(_lent_threads(loop)) as threads:
            state, metrics0 = run_step(cfg, 0, None, log_dir=str(Path(sweep_dir) / "tb" / f"step0-{key0}"))
        metrics0 = {**portable_metrics(metrics0), "trained_on_node": extra["node_id"]}
        if rank == 0:
            save_state(state, state_path(step0_dir(sweep_dir), key0))
            ray.get(cache.put.remote(key0, state_to_numpy(state), metrics0, trial_id))
            write_step_fragment(sweep_dir, trial_id, step_row(
                cfg, metrics0, cached=False, step0_source="trained", step0_node_id=extra["node_id"],
                step0_store_node_id=store_node, step0_get_s=None, step0_threads=threads, **extra))
    except BaseException as err:
        if rank == 0:
            write_step_fragment(sweep_dir, trial_id, step_row(
                cfg, {"step": 0}, cached=False, **{**extra, "status": "error", "error": _one_line(err)}))
        lease.close(failed=True)  # another trial (or this one's retry) trains it
        raise
    lease.close(failed=False)
    return state, metrics0


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[int]:
    """``torch.set_num_threads(n)`` inside the block (``n <= 0``: unchanged), restored after;
    yields the block's thread count."""
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _lent_threads(loop: dict) -> int:
    """The cell's step-0 thread count (:func:`step0_threads`), capped by this node's CPUs per worker."""
    want = int(loop.get("step0_threads", 0))
    if want <= 0:
        return 0
    me = ray.get_runtime_context().get_node_id()
    node_cpus = next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == me), 1.0)
    world = 1 if loop.get("in_process") else ray.train.get_context().get_world_size()
    return max(1, min(want, int(node_cpus // world)))


def step0_threads(ctx: dict, space: Mapping[str, Any], points: Sequence[Mapping[str, Any]], *, seeds: int,
                  concurrency: int) -> int:
    """Threads per worker for training a cell's step 0 on CPU: ``cpus_per_worker x concurrency``
    when every trial of the cell continues from one step-0 state, else 0 (the worker's own CPUs).

    With one step-0 key per cell, whichever trial trains it is the only one computing: every other
    running trial of the cell waits for that same state (cells run one after the other), so their
    reserved cores would idle. The rule is fixed by the sweep, not by counting waiters at run
    time, because the thread count changes the state at rounding level (it must not depend on
    timing). Shared means: every searched value (each option, each range's bounds), every given
    point and, without a space, every seed (``seeds`` trials of the preset) give the same
    ``step_key(0)``. GPU trials keep their CPUs (their step 0 does not run on them).
    """
    if ctx["gpus_per_worker"] or concurrency <= 1 or (not space and not points and seeds > 1):
        return 0
    probes: list[Mapping[str, Any]] = [{}, *points]
    for name, param in space.items():
        values = param.options if hasattr(param, "options") else (param.lo, param.hi)
        probes.extend({name: v} for v in values)
    keys = {trial_config(ctx, dict(p))[0].step_key(0) for p in probes}
    return int(ctx["cpus_per_worker"] * concurrency) if len(keys) == 1 else 0


def trains_in_process(ctx: dict) -> bool:
    """Whether the cell's trials train in their Tune trial actor (Ray Train's local mode,
    ``ScalingConfig(num_workers=0)``) instead of a Train controller and worker group.

    True for a single-worker CPU trial on a one-node cluster. Such a ``TorchTrainer`` starts no
    process: the controller, the worker and Train's helper actors (placement-group cleaner,
    synchronisation, dataset manager) cost 11-25 s and ~15 CPU-s per trial on 2 cores
    (BENCHMARKS.md, sessions 12-13), more than a smoke step. The trial then reserves the worker's
    CPUs itself, reports each step to Tune directly and retries a failed step ``max_failures``
    times from its last finished step (``train/<trial>/last-step.pt``), as Ray Train would
    restart its worker group. Multi-worker (DDP), GPU and multi-node sweeps keep the worker
    group, whose restarts survive a lost node.
    """
    if ctx["workers_per_trial"] != 1 or ctx["gpus_per_worker"]:
        return False
    return sum(1 for n in ray.nodes() if n.get("Alive")) == 1


def _fit_in_process(trainer, retries: int, threads: int, stopped) -> None:
    """``trainer.fit()`` in Train's local mode with ``threads`` intra-op threads, retried up to
    ``retries`` times (-1: forever) after an exception unless Tune ``stopped()`` the trial; the
    last exception is raised."""
    attempt = 0
    while True:
        try:
            with intra_op_threads(threads):
                trainer.fit()
            return
        except Exception:
            attempt += 1
            if 0 <= retries < attempt or stopped():
                raise


# ---------------------------------------------------------------------------- driver
def trial_config(ctx: dict, config: dict) -> tuple[ExperimentConfig, dict]:
    """The trial's ``ExperimentConfig`` and its searched values (``seed`` is a run seed, not a param)."""
    hp = dict(config)
    hp.update(hp.pop("point", None) or {})  # a re-evaluated point (export-best --top/--seeds)
    seed = int(hp.pop("seed", ctx["seed"]))
    cfg = resolve_config(ctx["scenario"], ctx["method"], profile=ctx["profile"], mode=ctx["mode"], seed=seed,
                         data_root=ctx["data_root"], overrides={**ctx["overrides"], **hp})
    return cfg, hp


def trial_driver(config: dict, ctx: dict) -> None:
    """Tune function trainable: one trial of a grid cell (see the module docstring).

    Args:
        config: the values Tune/Optuna chose (searched hyperparameters, or ``seed`` for FT).
        ctx: the cell's constants, bound with ``tune.with_parameters`` by ``sweep.py``.

    Raises:
        TrialError: the TorchTrainer failed after its retries (one-line message).
    """
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    started = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    sweep_dir = Path(ctx["sweep_dir"])
    cfg, hp = trial_config(ctx, config)
    last_step = int(ctx["last_step"])  # the scenario's last step, or 1 under the first-step protocol
    folder = rows_dir(sweep_dir, trial_id)
    for name in ("trial.json", "tune.json"):  # a restarted trial starts undecided
        (folder / name).unlink(missing_ok=True)
    write_json(folder / "meta.json", {
        "sweep": ctx["sweep"], "cell": ctx["cell"], "trial_id": trial_id, "scenario": cfg.scenario,
        "mode": cfg.mode, "method": cfg.method, "profile": cfg.profile, "seed": cfg.seed,
        "num_steps": last_step + 1, "protocol": ctx["protocol"], "hp": hp,
        "params": cfg.method_params, "config": cfg.to_dict()})

    workers, gpus, cpus = ctx["workers_per_trial"], ctx["gpus_per_worker"], ctx["cpus_per_worker"]
    per_worker = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    in_process = bool(ctx.get("in_process"))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.to_dict(), "sweep": ctx["sweep"], "sweep_dir": str(sweep_dir), "trial_id": trial_id,
            "cell": ctx["cell"], "key0": cfg.step_key(0), "poll_s": ctx.get("poll_s", 1.0),
            "last_step": last_step, "step0_threads": ctx.get("step0_threads", 0), "in_process": in_process,
            "last_file": str(sweep_dir / "train" / trial_id / "last-step.pt")},
        scaling_config=ray.train.ScalingConfig(num_workers=0) if in_process else ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpus > 0, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=str(sweep_dir / "train"),
            failure_config=ray.train.FailureConfig(max_failures=ctx["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[] if in_process else [TuneReportCallback()]),
    )

    def stopped_by_tune() -> bool:
        return (tune_end(sweep_dir, trial_id) or {}).get("ended") == "complete"

    try:
        if in_process:
            _fit_in_process(trainer, ctx["max_failures"], max(1, int(cpus)), stopped_by_tune)
        else:
            trainer.fit()
    except Exception as err:  # noqa: BLE001 - every failure is recorded, then re-raised for Tune
        if stopped_by_tune():
            # Tune (ASHA) stopped this trial (after a step, or at its last one) and is tearing its
            # actor down: the Train controller and workers die with it and fit() raises
            # (ActorDiedError, ...). Not a failure: tables.py decides ok/stopped from Tune's record.
            return
        message = _worker_error(err, sweep_dir, trial_id)
        write_json(folder / "trial.json", {"status": "error", "error": message,
                                           "wall_s": time.perf_counter() - started})
        raise TrialError(message) from None
    write_json(folder / "trial.json", {"status": "ok", "error": None, "wall_s": time.perf_counter() - started})


def _worker_error(err: BaseException, sweep_dir: Path, trial_id: str) -> str:
    """One line for a failed fit: the worker's own message if rank 0 recorded one."""
    from .tables import step_fragments

    for row in reversed(step_fragments(sweep_dir, trial_id)):
        if row.get("status") == "error" and row.get("error"):
            return row["error"]
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = failures[rank]
        cause = getattr(cause, "cause", None) or cause
        return _one_line(cause)
    return _one_line(err)
