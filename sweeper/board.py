"""The leaderboard as text: a compact terminal table (one line per trial), ``--wide``, or csv / json / md.

    csseg results sweeps/<name>                  # searched hyperparameters only, short names, 3 significant digits
    csseg results sweeps/<name> --wide           # every column, full names
    csseg results sweeps/<name> --format csv     # machine-readable: every column, IoUs as fractions

The rows are those of :func:`sweeper.export.leaderboard`; this module only formats them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Sequence

from rich import box
from rich.table import Table

from csseg_core.metrics import ALL_METRICS, KINDS, STEP_KINDS, format_percent
from csseg_core.results import markdown_table

FORMATS = ("table", "csv", "json", "md")
#: Leaderboard columns that are not hyperparameters.
FIXED = ("cell", "rank", "trial_id", "scenario", "mode", "method", "seed", "pareto", "wall_s", "metric", "select_on",
         "final_step", *ALL_METRICS)
_SPLITS = (("val", "val_"), ("test", ""))
#: (column header, metric) of the leaderboard table: all / old / new (+ avg when wide), validation then test.
COMPACT_METRICS = tuple((f"{split}\n{k}", f"{prefix}miou_{k}") for split, prefix in _SPLITS for k in STEP_KINDS)
WIDE_METRICS = tuple((f"{split}\n{k}", f"{prefix}miou_{k}") for split, prefix in _SPLITS for k in KINDS)


def params_of(rows: Sequence[dict]) -> list[str]:
    """The searched hyperparameters (the leaderboard's non-fixed columns), in row order."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in FIXED))


pct = format_percent  # IoU fraction as a percentage with one decimal (``–`` when missing)


def sig3(v: Any) -> str:
    """3 significant digits, as short as possible: ``100``, ``0.0123``, ``1.5e-4``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "–" if v is None else str(v)
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    text = f"{v:.3g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        text = f"{mantissa}e{int(exp)}"
    return text


def short_names(names: Sequence[str], width: int = 6) -> dict[str, str]:
    """Unique column names of at most ``width`` characters: ``sparsity_norm`` -> ``s_norm``, ``attraction`` -> ``attrac``."""
    out: dict[str, str] = {}
    for name in names:
        parts = name.split("_")
        short = name if len(name) <= width else (
            "_".join(p[0] for p in parts[:-1]) + "_" + parts[-1] if len(parts) > 1 else name)[:width]
        base, i = short, 2
        while short in out.values():
            short, i = f"{base[: width - len(str(i))]}{i}", i + 1
        out[name] = short
    return out


def trial_label(trial_id: Any, wide: bool) -> str:
    text = str(trial_id)
    return text if wide else text.split("_")[-1][-8:]


def tables(rows: Sequence[dict], title: str, *, wide: bool = False) -> list[tuple[str, Table]]:
    """One rich table per grid cell: compact (one line per trial) unless ``wide``."""
    params = params_of(rows)
    names = {p: p for p in params} if wide else short_names(params)
    out = []
    for cell in dict.fromkeys(r["cell"] for r in rows):
        cell_rows = [r for r in rows if r["cell"] == cell]
        first = cell_rows[0]
        abbreviated = ", ".join(f"{s}={p}" for p, s in names.items() if s != p)
        caption = "* on the Pareto front of the objectives (old vs new by default), on the selection split"
        table = Table(title=title.format(cell=cell, step=first["final_step"], metric=first["metric"]),
                      caption=caption + (f"; {abbreviated}" if abbreviated else "") + ("" if wide else "; --wide: all"),
                      box=box.SIMPLE_HEAD, padding=(0, 1) if wide else (0, 0), show_edge=False, title_justify="left",
                      caption_justify="left")
        overflow: Any = "fold" if wide else "ellipsis"
        table.add_column("#", justify="right", no_wrap=not wide)
        table.add_column("trial", no_wrap=not wide, overflow=overflow, max_width=None if wide else 8)
        if wide:
            table.add_column("seed", justify="right")
        for header, _ in WIDE_METRICS if wide else COMPACT_METRICS:
            table.add_column(header, justify="right", no_wrap=not wide)
        for p in params:  # wrappable, so rich narrows these first; values have no spaces: one line, ellipsis
            table.add_column(names[p], justify="right", overflow=overflow, max_width=None if wide else 7)
        if wide:
            table.add_column("wall s", justify="right")
        for r in cell_rows:
            cells = [f"{r['rank']}{'*' if r.get('pareto') else ''}", trial_label(r["trial_id"], wide)]
            if wide:
                cells.append(str(r.get("seed")))
            cells += [pct(r.get(k)) for _, k in (WIDE_METRICS if wide else COMPACT_METRICS)]
            cells += [(f"{r[p]:.6g}" if isinstance(r[p], float) else str(r[p])) if wide else sig3(r.get(p)) for p in params]
            if wide:
                cells.append(sig3(r.get("wall_s")))
            table.add_row(*cells)
        out.append((cell, table))
    return out


def text(rows: Sequence[dict], fmt: str, *, wide: bool = False) -> str:
    """``csv`` / ``json``: every leaderboard column, raw values (IoUs as fractions in [0, 1]).
    ``md``: the terminal table's columns (``--wide``: all), IoUs in %, one table for all cells."""
    if fmt == "json":
        return json.dumps(list(rows), indent=1, default=str)
    if fmt == "csv":
        buf = io.StringIO()
        columns = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r}")
    params = params_of(rows)
    metrics = WIDE_METRICS if wide else COMPACT_METRICS
    head = ["cell", "rank", "trial", *(h.replace("\n", " ") for h, _ in metrics), *params]
    body = [[r["cell"], f"{r['rank']}{'*' if r.get('pareto') else ''}", trial_label(r["trial_id"], wide),
             *(pct(r.get(k)) for _, k in metrics), *(sig3(r.get(p)) for p in params)] for r in rows]
    return markdown_table(head, body) + "\n"
