"""Report pages for results on disk: one self-contained ``report.html`` (plotly) + the same figures as PNG (matplotlib).

    csseg report runs/<run>         # a `csseg train` folder (or a `csseg final` folder): mIoU per step, per-class IoU
    csseg report sweeps/<name>      # a sweep folder: see sweeper/report.py, which builds on this module

Reads ``steps.parquet`` (and ``final.parquet`` when present) only: no torch, no Ray. Each figure
is drawn twice, interactively with plotly (its JavaScript inlined once, so the page opens
offline) and statically with matplotlib's Agg backend (for papers and terminals).
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .atomic import atomic_path
from .errors import ConfigError
from .metrics import KINDS as METRIC_KINDS
from .metrics import STEP_KINDS
from .results import markdown_table, read_rows

INSTALL_HINT = "pip install -e '.[report]'"
SPLITS = (("val", "val_", "validation"), ("test", "", "test"))
KINDS = ("old", "new", "all")


def require_libraries() -> None:
    """ConfigError (one line) when plotly or matplotlib is missing."""
    missing = []
    for module in ("plotly", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"csseg report needs {' and '.join(missing)}: {INSTALL_HINT}")
    import matplotlib

    matplotlib.use("Agg")


@dataclass
class Figure:
    """One figure of a report: its file stem, its heading, a plotly figure and a matplotlib one."""

    name: str
    title: str
    plotly: Any
    mpl: Any
    note: str = ""


@dataclass
class Section:
    """A heading with figures, free HTML (tables) and notes (e.g. why a figure is missing)."""

    title: str
    figures: list[Figure] = field(default_factory=list)
    html: str = ""
    notes: list[str] = field(default_factory=list)


def pct(x: Any) -> float | None:
    """IoU fraction -> percent (None for missing / NaN)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else 100.0 * float(x)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mpl_figure(w: float, h: float):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(w, h), dpi=110, layout="constrained")


def palette(n: int) -> list[str]:
    import plotly.colors

    base = plotly.colors.qualitative.Plotly
    return [base[i % len(base)] for i in range(n)]


# ---------------------------------------------------------------------------- figures
def miou_per_step(groups: dict[str, list[dict]], title: str, name: str = "miou-per-step") -> Figure:
    """mIoU (old / new / all) per step, validation above test, one line per trial or run.

    Args:
        groups: label -> step rows (``step``, ``val_miou_*``, ``miou_*``), any order.
        title: the figure's heading.
    """
    from plotly.subplots import make_subplots

    labels = list(groups)
    colors = palette(len(labels))
    fig = make_subplots(rows=2, cols=3, shared_xaxes=True, shared_yaxes=True, vertical_spacing=0.1,
                        subplot_titles=[f"{split} mIoU {k}" for _, _, split in SPLITS for k in KINDS])
    mfig = mpl_figure(11, 5.6)
    axes = mfig.subplots(2, 3, sharex=True, sharey=True)
    for li, label in enumerate(labels):
        rows = sorted(groups[label], key=lambda r: r["step"])
        steps = [int(r["step"]) for r in rows]
        for si, (_, prefix, split) in enumerate(SPLITS):
            for ki, kind in enumerate(KINDS):
                ys = [pct(r.get(f"{prefix}miou_{kind}")) for r in rows]
                fig.add_scatter(x=steps, y=ys, mode="lines+markers", name=label, legendgroup=label,
                                showlegend=si == 0 and ki == 0, line={"color": colors[li]}, row=si + 1, col=ki + 1,
                                hovertemplate=f"{label}<br>step %{{x}}<br>{split} {kind} %{{y:.1f}}<extra></extra>")
                ax = axes[si][ki]
                ax.plot(steps, [math.nan if y is None else y for y in ys], marker="o", ms=3, lw=1.2,
                        color=colors[li], label=label if si == 0 and ki == 0 else None)
                ax.set_title(f"{split} mIoU {kind}", fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("mIoU (%)")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
    if len(labels) <= 12:
        mfig.legend(loc="outside right upper", fontsize=7, frameon=False)
    mfig.suptitle(title, fontsize=10)
    fig.update_layout(title=title, height=560, yaxis_title="mIoU (%)", yaxis4_title="mIoU (%)",
                      xaxis4_title="step", xaxis5_title="step", xaxis6_title="step", legend={"font": {"size": 10}})
    fig.update_xaxes(dtick=1)
    return Figure(name, title, fig, mfig)


def class_iou_heatmap(rows: Sequence[dict], class_names: Sequence[str], title: str, name: str = "class-iou",
                      split: str = "test") -> Figure:
    """Per-class IoU (%) of one run or trial, step by step (classes not yet seen are blank)."""
    import numpy as np
    import plotly.graph_objects as go

    key = "class_iou" if split == "test" else "val_class_iou"
    rows = sorted(rows, key=lambda r: r["step"])
    width = max([len(r.get(key) or []) for r in rows] + [0])
    z = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        for j, v in enumerate(r.get(key) or []):
            z[i, j] = pct(v) if pct(v) is not None else np.nan
    names = [class_names[j] if j < len(class_names) else str(j) for j in range(width)]
    steps = [f"step {int(r['step'])}" for r in rows]
    text = [["" if math.isnan(v) else f"{v:.0f}" for v in line] for line in z]
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=names, y=steps, text=text, texttemplate="%{text}", zmin=0, zmax=100,
                               colorscale="Viridis", colorbar={"title": "IoU %"},
                               hovertemplate="%{y} · %{x}: %{z:.1f}%<extra></extra>"))
    fig.update_layout(title=title, height=220 + 28 * len(rows), yaxis={"autorange": "reversed"})
    mfig = mpl_figure(min(16.0, max(6.0, 0.42 * width + 2.0)), 1.8 + 0.34 * len(rows))
    ax = mfig.subplots()
    im = ax.imshow(np.ma.masked_invalid(z), vmin=0, vmax=100, cmap="viridis", aspect="auto", interpolation="nearest")
    every = max(1, math.ceil(width / 40))  # ADE's 150 classes: every 4th name
    ax.set_xticks(range(0, width, every), names[::every], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), steps, fontsize=8)
    ax.grid(False)
    for i in range(len(rows)):
        for j in range(width):
            if width <= 40 and not math.isnan(z[i, j]):
                ax.text(j, i, f"{z[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if z[i, j] > 60 else "white")
    mfig.colorbar(im, ax=ax, label="IoU (%)")
    ax.set_title(title, fontsize=10)
    return Figure(name, title, fig, mfig)


def final_table(rows: Sequence[dict]) -> tuple[str, str]:
    """``csseg final``'s mean ± std per configuration and scenario, as (HTML, Markdown)."""
    head = ["tuned on", "run on", "seeds", "split", "all", "old", "new", "avg"]
    body = []
    for r in rows:
        for split, prefix, _ in SPLITS:
            cells = []
            for k in METRIC_KINDS:
                mean, std = pct(r.get(f"{prefix}miou_{k}_mean")), pct(r.get(f"{prefix}miou_{k}_std"))
                cells.append("–" if mean is None else f"{mean:.1f} ± {std or 0.0:.1f}")
            body.append([str(r.get("tuned_on", r.get("cell"))), str(r.get("scenario")) + ("*" if r.get("transfer") else ""),
                         str(len(r.get("seeds") or [])), split, *cells])
    md = markdown_table(head, body)
    table = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    table = f"<table class='final'><thead><tr>{table}</tr></thead><tbody>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in b) + "</tr>" for b in body) + "</tbody></table>"
    return table + "<p class='note'>mIoU %, last step, mean ± std over seeds; * a scenario the sweep never saw.</p>", md


# ---------------------------------------------------------------------------- writing
PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }}
.note {{ color: #666; font-size: .9em; }} pre {{ background: #f6f6f6; padding: .6em; overflow-x: auto; }}
table {{ border-collapse: collapse; font-size: .9em; }} td, th {{ border: 1px solid #ccc; padding: .25em .6em; }}
</style></head><body>
<h1>{title}</h1>
{summary}
{body}
</body></html>
"""


def write_report(out_dir: str | os.PathLike, title: str, sections: Sequence[Section], summary_html: str = "") -> dict:
    """Write ``report.html`` and one PNG per figure to ``out_dir``.

    Returns:
        ``{"html": path, "pngs": [paths], "figures": count}``.
    """
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts, pngs, index = [], [], 0
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts.extend(f"<p class='note'>{html.escape(n)}</p>" for n in section.notes)
        parts.append(section.html)
        for fig in section.figures:
            index += 1
            div = fig.plotly.to_html(full_html=False, include_plotlyjs=index == 1, div_id=f"fig-{index:02d}-{fig.name}",
                                     config={"displaylogo": False, "responsive": True})
            parts.append(f"<div class='figure'>{div}</div>")
            if fig.note:
                parts.append(f"<p class='note'>{html.escape(fig.note)}</p>")
            png = out / f"{index:02d}-{fig.name}.png"
            fig.mpl.savefig(png, bbox_inches="tight", pad_inches=0.15)
            plt.close(fig.mpl)  # optuna's matplotlib figures live in pyplot's registry; ours are free-standing
            pngs.append(png)
    page = out / "report.html"
    with atomic_path(page) as tmp:
        tmp.write_text(PAGE.format(title=html.escape(title), summary=summary_html, body="\n".join(parts)), encoding="utf-8")
    return {"html": page, "pngs": pngs, "figures": index}


def safe(notes: list[str], what: str, build: Callable[..., Figure | None], *args: Any) -> list[Figure]:
    """``[build(*args)]``; a failure becomes a line in ``notes`` instead of stopping the report."""
    try:
        fig = build(*args)
    except Exception as err:  # noqa: BLE001 - one figure must never sink the report
        notes.append(f"{what}: not drawn ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
        return []
    return [fig] if fig is not None else []


# ---------------------------------------------------------------------------- run folders
def class_names(scenario: str | None) -> tuple[str, ...]:
    from .scenarios import get_scenario

    try:
        return get_scenario(scenario).class_names() if scenario else ()
    except ConfigError:
        return ()


def report_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Report of a ``csseg train`` folder (or a ``csseg final`` folder: one line per seed run).

    Raises:
        ConfigError: no ``steps.parquet`` or no rows in it; plotly / matplotlib missing.
    """
    require_libraries()
    run_dir = Path(run_dir)
    rows = [r for r in read_rows(run_dir / "steps.parquet") if r.get("status", "ok") == "ok"]
    if not rows:
        raise ConfigError(f"{run_dir}/steps.parquet holds no finished step yet; rerun when a step has finished")
    out = Path(out_dir) if out_dir else run_dir / "report"
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get("run") or run_dir.name), []).append(r)
    first = rows[0]
    names = class_names(first.get("scenario"))
    section = Section(f"{first.get('scenario')} · {first.get('mode')} · {first.get('method')}")
    section.figures += safe(section.notes, "mIoU per step", miou_per_step, groups, "mIoU per step")
    for label, steps in groups.items():
        section.figures += safe(section.notes, "per-class IoU", class_iou_heatmap, steps, names,
                                f"per-class test IoU (%) · {label}")
    sections = [section]
    md = [f"# Report of {run_dir.name}", "", f"Scenario `{first.get('scenario')}`, mode `{first.get('mode')}`, "
          f"method `{first.get('method')}`, profile `{first.get('profile')}`, {len(groups)} run(s).", ""]
    finals = read_rows(run_dir / "final.parquet")
    if finals:
        table_html, table_md = final_table(finals)
        sections.append(Section("csseg final: mean ± std over seeds", html=table_html))
        md += ["## Final runs (mIoU %, last step, mean ± std)", "", table_md, ""]
    md += ["## mIoU per step (%)", "", "| run | step | val all | val old | val new | test all | test old | test new |",
           "|---|---|---|---|---|---|---|---|"]
    for label, steps in groups.items():
        for r in sorted(steps, key=lambda r: r["step"]):
            values = [pct(r.get(f"{p}miou_{k}")) for _, p, _ in SPLITS for k in STEP_KINDS]
            md.append(f"| {label} | {r['step']} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in values) + " |")
    written = write_report(out, f"csseg report · {run_dir.name}", sections)
    md += ["", "Figures: " + ", ".join(f"`{p.name}`" for p in written["pngs"]) + "; interactive: `report.html`.", ""]
    (out / "report.md").write_text("\n".join(md))
    return {**written, "md": out / "report.md"}
