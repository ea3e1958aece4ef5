"""``csseg report DIR``: the report of a sweep folder (or of a run folder, see :mod:`csseg_core.report`).

    csseg report sweeps/<name>                 # -> sweeps/<name>/report/{report.html, *.png, report.md}
    csseg report sweeps/<name> --out paper/    # elsewhere

Reads ``sweep.json``, ``trials.parquet``, ``steps.parquet``, the per-trial fragments of trials
still running (``rows/<trial>/step-*.json``), the Optuna journals (``optuna-<cell>.log``) and
``final.parquet`` when ``csseg final`` wrote one into the sweep folder. Never starts Ray, so it
works on a finished sweep and on one that is still running (partial tables).

Per grid cell: mIoU per step per trial (validation and test; old / new / all), old vs new on
the selection split with the Pareto front, Optuna's parallel coordinates and hyperparameter
importances on the cell's study, the objective per trial number with the best so far, and
the per-class IoU of the best trial.
"""

from __future__ import annotations

import html
import os
import warnings
from pathlib import Path

from csseg_core.errors import ConfigError
from csseg_core.metrics import STEP_KINDS
from csseg_core.report import (
    Figure,
    Section,
    class_iou_heatmap,
    class_names,
    final_table,
    finite,
    miou_per_step,
    mpl_figure,
    palette,
    pct,
    report_run,
    require_libraries,
    safe,
    write_report,
)
from csseg_core.results import read_rows

from .export import best_entries, leaderboard, pareto_front, selection, sweep_info
from .tables import STEPS, TRIALS, read_json, read_table, started_trials, step_fragments


def report(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
           final: str | os.PathLike | None = None) -> dict:
    """Report of a sweep folder (``sweep.json``) or a run folder (``steps.parquet``).

    Args:
        path: the folder.
        out_dir: where to write (default ``<path>/report``).
        final: a ``final.parquet`` of ``csseg final`` (sweeps; default: ``<path>/final/final.parquet``
            when it exists); its rows of the sweep's grid cells go into the report.

    Returns:
        ``{"html", "pngs", "figures", "md"}`` (paths and the figure count).

    Raises:
        ConfigError: the folder is neither, or plotly / matplotlib is missing.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist; pass a sweep folder (sweeps/<name>) or a run folder (runs/<run>)")
    if (path / "sweep.json").is_file():
        return report_sweep(path, out_dir, final=final)
    if (path / "steps.parquet").is_file():
        return report_run(path, out_dir)
    raise ConfigError(f"{path} is neither a sweep folder (no sweep.json) nor a run folder (no steps.parquet)")


# ---------------------------------------------------------------------------- inputs
def load_study(sweep_dir: Path, cell: str):
    """The cell's Optuna study from its journal file, or None (nothing searched)."""
    journal = sweep_dir / f"optuna-{cell}.log"
    if not journal.is_file():
        return None
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=cell, storage=JournalStorage(JournalFileBackend(str(journal))))


def sweep_rows(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    """``(trial rows, step rows)``; trials still running appear with ``status="running"`` and their
    finished steps read from their fragments."""
    trials, steps = read_table(sweep_dir, TRIALS), read_table(sweep_dir, STEPS)
    known = {t["trial_id"] for t in trials}
    for trial_id in started_trials(sweep_dir):
        if trial_id in known:
            continue
        meta = read_json(sweep_dir / "rows" / trial_id / "meta.json") or {}
        trials.append({"trial_id": trial_id, "cell": meta.get("cell"), "status": "running",
                       "scenario": meta.get("scenario"), "num_steps": meta.get("num_steps"),
                       **{f"param_{k}": v for k, v in (meta.get("hp") or {}).items()}})
        steps += [{**r, "cell": r.get("cell") or meta.get("cell")} for r in step_fragments(sweep_dir, trial_id)]
    return trials, [s for s in steps if s.get("status", "ok") == "ok"]


def find_final(sweep_dir: Path, final: str | os.PathLike | None, cells: list[str]) -> list[dict]:
    """Rows of ``final`` (or of the sweep folder's ``final/final.parquet``) that belong to ``cells``."""
    if final is not None and not Path(final).is_file():
        raise ConfigError(f"--final {final} does not exist; `csseg final` writes final.parquet into its --out folder")
    for candidate in [Path(final)] if final else [sweep_dir / "final.parquet", sweep_dir / "final" / "final.parquet"]:
        if candidate.is_file():
            return [r for r in read_rows(candidate) if r.get("cell") in cells]
    return []


# ---------------------------------------------------------------------------- sweep figures
def old_vs_new(rows: list[dict], objectives: list[str], select_on: str, title: str) -> Figure:
    """Old vs new mIoU of the finished trials on the selection split, the Pareto front joined by a line."""
    prefix = "val_" if select_on == "val" else ""
    x_key, y_key = f"{prefix}miou_old", f"{prefix}miou_new"
    pts = [r for r in rows if finite(r.get(x_key)) and finite(r.get(y_key))]
    front = sorted(pareto_front(pts, [x_key, y_key]), key=lambda r: r[x_key])
    ids = {id(r) for r in front}
    rest = [r for r in pts if id(r) not in ids]
    import plotly.graph_objects as go

    fig = go.Figure()
    for group, name, color, size in ((rest, "trial", "#7f8c8d", 9), (front, "Pareto front", "#d62728", 12)):
        fig.add_scatter(x=[pct(r[x_key]) for r in group], y=[pct(r[y_key]) for r in group], mode="markers",
                        name=name, marker={"color": color, "size": size}, text=[r["trial_id"] for r in group],
                        hovertemplate="trial %{text}<br>old %{x:.1f}<br>new %{y:.1f}<extra></extra>")
    fig.add_scatter(x=[pct(r[x_key]) for r in front], y=[pct(r[y_key]) for r in front], mode="lines",
                    line={"color": "#d62728", "dash": "dot"}, showlegend=False, hoverinfo="skip")
    split = "validation" if select_on == "val" else "test"
    fig.update_layout(title=title, xaxis_title=f"{split} mIoU old (%)", yaxis_title=f"{split} mIoU new (%)", height=450)
    mfig = mpl_figure(6, 4.5)
    ax = mfig.subplots()
    ax.scatter([pct(r[x_key]) for r in rest], [pct(r[y_key]) for r in rest], c="#7f8c8d", s=30, label="trial")
    ax.plot([pct(r[x_key]) for r in front], [pct(r[y_key]) for r in front], "o:", c="#d62728", ms=7, label="Pareto front")
    for r in front:
        ax.annotate(str(r["trial_id"])[-5:], (pct(r[x_key]), pct(r[y_key])), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel(f"{split} mIoU old (%)")
    ax.set_ylabel(f"{split} mIoU new (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    note = "" if objectives == [x_key, y_key] else f"the sweep's own objectives: {', '.join(objectives)}"
    return Figure("old-vs-new", title, fig, mfig, note)


def history(study, metric: str, title: str) -> Figure | None:
    """Objective (first one) per Optuna trial number, and the best so far."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.values]
    if not done:
        return None
    xs, ys = [t.number for t in done], [100 * t.values[0] for t in done]
    best = [max(ys[: i + 1]) for i in range(len(ys))]
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_scatter(x=xs, y=ys, mode="markers", name="trial", marker={"size": 9},
                    hovertemplate="trial %{x}<br>%{y:.1f}<extra></extra>")
    fig.add_scatter(x=xs, y=best, mode="lines", name="best so far", line={"shape": "hv", "color": "#d62728"})
    fig.update_layout(title=title, xaxis_title="Optuna trial number", yaxis_title=f"{metric} (%)", height=400)
    mfig = mpl_figure(6, 3.8)
    ax = mfig.subplots()
    ax.scatter(xs, ys, s=25, label="trial", color=palette(1)[0])
    ax.step(xs, best, where="post", color="#d62728", label="best so far")
    ax.set_xlabel("Optuna trial number")
    ax.set_ylabel(f"{metric} (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return Figure("history", title, fig, mfig)


def optuna_figure(kind: str, study, metric: str, title: str) -> Figure:
    """Optuna's own plotly and matplotlib version of ``plot_<kind>`` on the first objective.

    Importances use Optuna's default evaluator (PED-ANOVA), which explains *low* targets: the
    objective is negated so that they explain a high mIoU. Optuna's warnings (e.g. too few
    trials to tell the parameters apart) become the figure's note.
    """
    import optuna.visualization as ov
    import optuna.visualization.matplotlib as ovm

    if kind == "param_importances":
        kwargs = {"target": lambda t: -t.values[0], "target_name": metric}
    else:
        kwargs = {"target": lambda t: 100 * t.values[0], "target_name": f"{metric} (%)"}
    import matplotlib

    with warnings.catch_warnings(record=True) as caught, matplotlib.rc_context():  # optuna switches pyplot to ggplot
        warnings.simplefilter("always")
        fig = getattr(ov, f"plot_{kind}")(study, **kwargs)
        ax = getattr(ovm, f"plot_{kind}")(study, **kwargs)
    fig.update_layout(title=title, height=450)
    ax = ax[0] if hasattr(ax, "__len__") else ax
    mfig = ax.figure
    mfig.set_size_inches(13 if kind == "parallel_coordinate" else 6.5, 4.5)
    for artist in ax.collections:  # optuna's pale "Blues" hides the best lines on white: viridis, best in yellow
        if hasattr(artist, "set_cmap") and artist.get_array() is not None:
            artist.set_cmap("viridis")
    mfig.set_dpi(110)
    for loc in ("left", "center"):
        ax.set_title("", loc=loc)
    if kind == "param_importances" and ax.get_legend() is not None:
        ax.get_legend().remove()  # one objective: the title names it
    mfig.suptitle(title, fontsize=10)
    notes = dict.fromkeys(str(w.message).splitlines()[0] for w in caught
                          if "experimental" not in str(w.message) and "low `target`" not in str(w.message))
    return Figure(kind.replace("_", "-"), title, fig, mfig, " ".join(f"Optuna: {n}" for n in notes))


# ---------------------------------------------------------------------------- the sweep report
def report_sweep(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 final: str | os.PathLike | None = None) -> dict:
    """Write ``report.html``, the PNGs and ``report.md`` of a sweep (see the module docstring)."""
    require_libraries()
    import optuna

    sweep_dir = Path(sweep_dir)
    info = sweep_info(sweep_dir)
    identity = info["identity"]
    select_on, metric, objectives = selection(info)
    searched = sorted(identity.get("space", {}))
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    trials, steps = sweep_rows(sweep_dir)
    board = leaderboard(sweep_dir)
    entries = {e["cell"]: e for e in best_entries(sweep_dir)} if board else {}
    cells = list(dict.fromkeys([t["cell"] for t in trials if t.get("cell")] + [r["cell"] for r in steps if r.get("cell")]))
    header = _md_header(info, trials, select_on, metric)
    sections, md = [], list(header)
    for cell in cells:
        section = Section(cell)
        notes = section.notes
        cell_trials = [t for t in trials if t.get("cell") == cell]
        status = {t["trial_id"]: t.get("status") for t in cell_trials}
        groups: dict[str, list[dict]] = {}
        for r in steps:
            if r.get("cell") == cell:
                tag = "" if status.get(r["trial_id"]) == "ok" else f" ({status.get(r['trial_id'], 'running')})"
                groups.setdefault(f"{r['trial_id']}{tag}", []).append(r)
        if groups:
            section.figures += safe(notes, "mIoU per step", miou_per_step, groups, f"{cell}: mIoU per step per trial")
        finished = [t for t in cell_trials if t.get("status") == "ok"]
        if finished:
            section.figures += safe(notes, "old vs new", old_vs_new, finished, objectives, select_on, f"{cell}: old vs new")
        else:
            notes.append("no trial has finished every step yet: no scatter, no best trial")
        study = load_study(sweep_dir, cell)
        n_done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) if study else 0
        target = metric if study is None or len(study.directions) == 1 else f"{objectives[0]} (objective 1)"
        if study is None or not searched:
            notes.append("nothing searched in this cell (no Optuna study): no parallel coordinates, importances or "
                         "optimisation history")
        else:
            if n_done < 2:
                notes.append(f"{n_done} finished Optuna trial(s): parallel coordinates and importances need 2")
            else:
                section.figures += safe(notes, "parallel coordinates", optuna_figure, "parallel_coordinate", study,
                                        target, f"{cell}: hyperparameters vs {target}")
                section.figures += safe(notes, "importances", optuna_figure, "param_importances", study, target,
                                        f"{cell}: hyperparameter importances ({target})")
            section.figures += safe(notes, "history", history, study, target, f"{cell}: {target} per trial")
        best = next((r for r in board if r["cell"] == cell and r["rank"] == 1), None)
        if best is not None:
            best_steps = [r for r in steps if r["trial_id"] == best["trial_id"]]
            section.figures += safe(notes, "per-class IoU", class_iou_heatmap, best_steps, class_names(best["scenario"]),
                                    f"{cell}: per-class test IoU (%) of the best trial {best['trial_id']}")
        sections.append(section)
        md += _md_cell(cell, cell_trials, best, entries.get(cell), metric, searched)
    finals = find_final(sweep_dir, final, cells)
    if finals:
        table_html, table_md = final_table(finals)
        sections.append(Section("csseg final: mean ± std over seeds", html=table_html))
        md += ["## Final runs (`csseg final`, mIoU %, last step, mean ± std)", "", table_md, ""]
    if not cells:
        sections.append(Section("no trial has started yet", notes=["rerun `csseg report` once a trial has finished a step"]))
    summary = "<pre>" + html.escape("\n".join(line for line in header[2:] if line)) + "</pre>"
    written = write_report(out, f"csseg report · sweep {info.get('name', sweep_dir.name)}", sections, summary)
    md += ["Figures: " + (", ".join(f"`{p.name}`" for p in written["pngs"]) or "none yet") + "; interactive: `report.html`.", ""]
    (out / "report.md").write_text("\n".join(md))
    return {**written, "md": out / "report.md"}


def _md_header(info: dict, trials: list[dict], select_on: str, metric: str) -> list[str]:
    identity = info["identity"]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.get("status") or "?"] = counts.get(t.get("status") or "?", 0) + 1
    wall = info.get("wall_s")
    wall_text = f"{wall / 60:.1f} min" if isinstance(wall, (int, float)) else \
        f"running; {sum(t.get('wall_s') or 0 for t in trials) / 60:.1f} trial-min so far"
    step0 = info.get("step0") or {}
    reuse = (f"step 0 trained {step0.get('trained', 0)} time(s), reused {step0.get('reused', 0)} time(s)"
             if step0 else "step-0 reuse not recorded yet")
    failures = [t for t in trials if t.get("status") == "error"]
    lines = [f"# Sweep {info.get('name')}", "",
             f"- method `{identity.get('method', trials[0].get('method') if trials else '?')}`, "
             f"status {info.get('status', 'running')}, wall time {wall_text}",
             f"- trials: {len(trials)} (" + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none") + ")",
             f"- selected on {'validation (held-out train images)' if select_on == 'val' else 'TEST'} by `{metric}`",
             f"- {reuse}"]
    lines += [f"- failure {t['trial_id']}: {str(t.get('error') or '').splitlines()[0][:160] if t.get('error') else '?'}"
              for t in failures[:5]]
    return lines + [""]


def _md_cell(cell: str, trials: list[dict], best: dict | None, entry: dict | None, metric: str,
             searched: list[str]) -> list[str]:
    ok = sum(t.get("status") == "ok" for t in trials)
    lines = [f"## {cell}", "", f"{len(trials)} trial(s), {ok} finished every step, "
             f"{sum(t.get('status') == 'error' for t in trials)} failed.", ""]
    if best is None or entry is None:
        return lines + ["No best configuration yet.", ""]
    lines += [f"Best trial `{best['trial_id']}`: {metric} = {pct(best[metric]):.1f} %, test mIoU all / old / new = "
              + " / ".join("–" if pct(best.get(k)) is None else f"{pct(best.get(k)):.1f}"
                           for k in (f"miou_{k}" for k in STEP_KINDS)) + " %.", "",
              "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {k} | {entry['params'].get(k)} |" for k in searched if k in entry["params"]]
    sets = " ".join(f"--set {k}={v}" for k, v in entry["params"].items())
    data_root = f" --data-root {entry['data_root']}" if entry.get("data_root") else ""
    lines += ["", "```", f"csseg train {entry['scenario']} --method {entry['method']} --mode {entry['mode']} "
              f"--profile {entry['profile']} --seed {entry['seed']}{data_root} {sets}", "```", ""]
    return lines
