"""Result rows as Arrow tables, appended to Parquet files atomically.

One row per (run or trial) × step: ``val_miou_*`` (held-out validation split, what sweeps
select on) beside ``miou_*`` (test). Hyperparameters are flattened into ``param_<name>``
columns, per-class IoU is a list column, loss terms are ``loss_<term>`` columns. Files are
rewritten through a temporary file and ``os.replace``, so a reader never sees half a file and
an interrupted write never loses rows already there.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path
from .metrics import ALL_METRICS as METRIC_KEYS


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def markdown_table(head: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    """A Markdown table (header, separator, one line per row), without a trailing newline."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body])


def step_row(cfg, metrics: dict, **extra: Any) -> dict:
    """Flatten one step's config and metrics into a Parquet row.

    Args:
        cfg: the :class:`~csseg_core.config.ExperimentConfig` of the run.
        metrics: the metrics dict returned by :func:`csseg_core.engine.run_step`.
        **extra: further columns (sweep name, trial id, status, ...).
    """
    row: dict[str, Any] = {
        "scenario": cfg.scenario,
        "mode": cfg.mode,
        "method": cfg.method,
        "profile": cfg.profile,
        "seed": cfg.seed,
        "step": int(metrics["step"]),
        "step_key": cfg.step_key(int(metrics["step"])),
    }
    for k in METRIC_KEYS:
        row[k] = _clean(float(metrics[k])) if metrics.get(k) is not None else None
    for k in ("val_class_iou", "class_iou"):
        row[k] = [_clean(float(x)) for x in metrics.get(k, [])]
    row["val_fraction"] = cfg.val_fraction
    for name, value in sorted(cfg.method_params.items()):
        row[f"param_{name}"] = value
    for name, value in sorted(metrics.get("losses", {}).items()):
        row[f"loss_{name}"] = _clean(float(value))
    row["wall_s"] = float(metrics.get("wall_s", 0.0))
    row["images_per_s"] = float(metrics.get("images_per_s", 0.0))
    row["n_train_images"] = int(metrics.get("n_train_images", 0))
    row.update(extra)
    return row


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a Parquet file, ``[]`` when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return pq.read_table(path).to_pylist()


def write_rows(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write ``rows`` as the whole content of ``path``, atomically."""
    path = Path(path)
    table = pa.Table.from_pylist(list(_unify(rows)))
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return path


def append_rows(path: str | os.PathLike, rows: Iterable[dict], key: Sequence[str] | None = None) -> Path:
    """Append rows to a Parquet file atomically; with ``key``, a new row replaces an old one
    with the same key values (so a retried step is never duplicated)."""
    new = list(rows)
    old = read_rows(path)
    if key:
        keys = {tuple(r.get(k) for k in key) for r in new}
        old = [r for r in old if tuple(r.get(k) for k in key) not in keys]
    return write_rows(path, old + new)


def _unify(rows: Sequence[dict]) -> Iterable[dict]:
    """Give every row the union of columns (missing values -> None) so Arrow infers one schema."""
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    for r in rows:
        yield {c: r.get(c) for c in columns}
