"""Sweep results as Parquet: ``steps.parquet`` (trial × step) and ``trials.parquet`` (trial).

Trials do not write the shared tables themselves. Rank 0 of each trial writes one small JSON
*fragment* per step under ``<sweep dir>/rows/<trial_id>/`` (a retried step overwrites its
fragment) and the driver adds ``meta.json`` / ``trial.json``. When a trial ends, the sweep's
Tune callback (one process, one writer) merges its fragments into both tables with
:func:`csseg_core.results.append_rows`: tmp file + rename, rows keyed on ``(trial_id, step)``
and ``trial_id`` so nothing is ever duplicated. At the end of each grid cell the sweep merges
again every trial of the cell (a no-op unless a callback was missed, e.g. after a crash).

How a trial ended is Tune's decision, recorded by that callback as ``tune.json`` (``ended``:
``complete`` or ``error``, and the last step Tune received) before Tune stops the trial's
actor. A trial Tune ended without an error before its last step was stopped by the scheduler
(ASHA): it is ``stopped`` even if its driver then saw the Train controller die under it
(``ActorDiedError`` from ``fit()``, written to ``trial.json`` as an error, or a step that failed
while being killed); its finished steps are kept, the failed ones dropped. ASHA also stops the
trials that report their last step (``max_t``), killing the driver in ``fit()``'s teardown:
they finished (``ok``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from csseg_core.atomic import atomic_path
from csseg_core.results import METRIC_KEYS, append_rows, read_rows

STEPS, TRIALS = "steps.parquet", "trials.parquet"
STEP_KEY, TRIAL_KEY = ("trial_id", "step"), ("trial_id",)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (tmp file in the same folder + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, default=str))
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Parsed JSON, or None when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def rows_dir(sweep_dir: str | os.PathLike, trial_id: str) -> Path:
    """Fragment folder of one trial."""
    return Path(sweep_dir) / "rows" / trial_id


def write_step_fragment(sweep_dir: str | os.PathLike, trial_id: str, row: Mapping[str, Any]) -> Path:
    """Store one step row (from :func:`csseg_core.results.step_row`) of a trial."""
    return write_json(rows_dir(sweep_dir, trial_id) / f"step-{int(row['step']):03d}.json", dict(row))


def step_fragments(sweep_dir: str | os.PathLike, trial_id: str) -> list[dict]:
    """The step rows of a trial, in step order."""
    folder = rows_dir(sweep_dir, trial_id)
    return [json.loads(p.read_text()) for p in sorted(folder.glob("step-*.json"))] if folder.is_dir() else []


def trial_row(meta: Mapping[str, Any], steps: list[dict], status: str, error: str | None,
              wall_s: float | None) -> dict[str, Any]:
    """One ``trials.parquet`` row from the trial's meta data and its step rows.

    ``node_ids`` are the nodes its workers ran on (all steps, all ranks; a trial restarted on
    another node has both); ``step0_source`` / ``step0_node_id`` come from its step-0 row
    (``trained`` or ``object_store``; the node that trained the state; the node of the cache
    actor that owns it).
    ``status`` is ``ok`` only if every step the trial was to run finished (all of them, or
    step 1 under the first-step protocol); ``val_miou_*`` / ``miou_*`` are those of the last
    finished step (``final_step``); hyperparameters are ``param_<name>`` columns.
    """
    done = [r for r in steps if r.get("status") == "ok"]
    num_steps = int(meta["num_steps"])
    if status == "ok" and len(done) < num_steps:
        status = "stopped"
    last = done[-1] if done else {}
    row: dict[str, Any] = {
        "sweep": meta["sweep"], "cell": meta["cell"], "trial_id": meta["trial_id"],
        "scenario": meta["scenario"], "mode": meta["mode"], "method": meta["method"],
        "profile": meta["profile"], "seed": meta["seed"], "status": status, "error": error,
        "steps_done": len(done), "num_steps": num_steps, "final_step": last.get("step"),
        "protocol": meta.get("protocol") or "end-of-training",
    }
    for k in METRIC_KEYS:
        row[k] = last.get(k)
    row["step0_trained"] = any(r.get("step") == 0 and not r.get("cached", True) for r in steps)
    first = next((r for r in steps if r.get("step") == 0), {})
    row["step0_source"] = first.get("step0_source")
    row["step0_node_id"] = first.get("step0_node_id")
    row["step0_store_node_id"] = first.get("step0_store_node_id")
    row["node_ids"] = sorted({n for r in steps for n in (r.get("worker_node_ids") or [r.get("node_id")]) if n})
    params = {k: v for k, v in (last or (steps[-1] if steps else {})).items() if k.startswith("param_")}
    row.update(params or {f"param_{k}": v for k, v in meta.get("params", {}).items()})
    row["searched"] = sorted(meta.get("hp", {}))
    row["wall_s"] = float(wall_s) if wall_s is not None else float(sum(r.get("wall_s") or 0.0 for r in steps))
    return row


def record_end(sweep_dir: str | os.PathLike, trial_id: str, ended: str, *, error: str | None = None,
               reported_step: int | None = None, wall_s: float | None = None) -> Path:
    """Record how Tune ended a trial (``complete`` or ``error``), the last step it received and
    its run time (used when the driver was killed before writing its own)."""
    if ended not in ("complete", "error"):
        raise ValueError(f"ended must be 'complete' or 'error', not {ended!r}")
    return write_json(rows_dir(sweep_dir, trial_id) / "tune.json",
                      {"ended": ended, "error": error, "reported_step": reported_step, "wall_s": wall_s})


def tune_end(sweep_dir: str | os.PathLike, trial_id: str) -> dict | None:
    """What :func:`record_end` recorded for the trial, or None (still running, or never recorded)."""
    return read_json(rows_dir(sweep_dir, trial_id) / "tune.json")


def merge_trial(sweep_dir: str | os.PathLike, trial_id: str, *, ended: str | None = None,
                error: str | None = None) -> dict | None:
    """Merge a finished trial's fragments into both tables (idempotent).

    The status follows Tune's recorded end (:func:`record_end`) when there is one, else
    ``ended``, else the driver's own ``trial.json``:

    * ended ``complete`` (finished, or stopped by the scheduler): ``ok`` when the trial's last
      step was received and the driver finished, otherwise ``stopped``; a stopped trial keeps
      its finished steps and loses the rows of steps that failed while it was being stopped;
    * ended ``error``: ``error``, with the driver's one-line message (or Tune's, or the step's).

    Args:
        sweep_dir: the sweep folder.
        trial_id: the Tune trial id.
        ended: how Tune saw it end, when :func:`record_end` was not called: ``complete`` or ``error``.
        error: Tune's error message, used when the driver could not write its own.

    Returns:
        The trial row, or None if the trial never started (no ``meta.json``).
    """
    folder = rows_dir(sweep_dir, trial_id)
    meta = read_json(folder / "meta.json")
    if meta is None:
        return None
    steps = step_fragments(sweep_dir, trial_id)
    end = read_json(folder / "trial.json") or {}
    verdict = tune_end(sweep_dir, trial_id) or {}
    ended = verdict.get("ended") or ended
    error = verdict.get("error") or error
    last_step = int(meta["num_steps"]) - 1
    if ended == "complete":  # Tune saw no error: the trial finished or the scheduler stopped it
        # ASHA also "stops" a trial at its last report (max_t): it finished, though Tune killed its
        # driver during fit()'s teardown, before it could write trial.json
        reported = verdict.get("reported_step")
        finished = int(reported) >= last_step if reported is not None else end.get("status") == "ok"
        status, err = ("ok" if finished else "stopped"), None
        if status == "stopped":
            steps = [r for r in steps if r.get("status") == "ok"]
    elif ended == "error":
        status, err = "error", end.get("error") or error
    else:  # no word from Tune (a crash before its callback): the driver's own record
        status = end.get("status") or "ok"
        err = end.get("error") if status == "error" else None
    if status == "error" and err is None:
        err = next((r.get("error") for r in reversed(steps) if r.get("error")), "unknown error")
    row = trial_row(meta, steps, status, err, end.get("wall_s", verdict.get("wall_s")))
    if steps:
        append_rows(Path(sweep_dir) / STEPS, steps, key=STEP_KEY)
    append_rows(Path(sweep_dir) / TRIALS, [row], key=TRIAL_KEY)
    return row


def started_trials(sweep_dir: str | os.PathLike, cell: str | None = None) -> list[str]:
    """Trial ids that wrote a ``meta.json`` (optionally only those of ``cell``)."""
    root = Path(sweep_dir) / "rows"
    ids = []
    for meta_file in sorted(root.glob("*/meta.json")) if root.is_dir() else []:
        meta = json.loads(meta_file.read_text())
        if cell is None or meta.get("cell") == cell:
            ids.append(meta["trial_id"])
    return ids


def read_table(sweep_dir: str | os.PathLike, name: str = TRIALS) -> list[dict]:
    """Rows of ``trials.parquet`` or ``steps.parquet`` (``[]`` when absent)."""
    return read_rows(Path(sweep_dir) / name)
