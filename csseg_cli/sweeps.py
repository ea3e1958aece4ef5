"""``csseg`` commands of sweeps: spaces, sweep, results, export-best, report, dashboard, final."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import common
from .common import app, pct, user_errors


def _csv(value: Optional[str]) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@app.command()
@user_errors
def spaces(method: Optional[str] = typer.Argument(None, help="Only this method.")):
    """Print the search spaces a sweep explores (ranges, distributions, the preset)."""
    import search_spaces

    rows = search_spaces.describe(method)
    table = Table(title="csseg search spaces (the preset is always the first trial)")
    columns = list(rows[0]) if rows else ["method", "param", "distribution", "range", "preset"]
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    common.console.print(table)


@app.command()
@user_errors
def sweep(scenarios: str = typer.Argument(..., help="Scenario(s), comma separated: voc-15-1,voc-15-5."),
          method: str = typer.Option("sdr", "--method", "-m", help="Method whose loss weights are searched."),
          trials: int = typer.Option(20, help="Trials per grid cell (the first is the reference preset)."),
          mode: str = typer.Option("disjoint", help="Mode(s), comma separated: disjoint,overlapped,sequential."),
          metric: str = typer.Option("all", help="Objective at the last step run: all|old|new|avg (mIoU), on --select-on."),
          objectives: Optional[str] = typer.Option(None, help="Multi-objective, e.g. old,new (Pareto front reported)."),
          select_on: str = typer.Option("val", help="val (held-out train images, default) or test (the literature's "
                                                     "protocol: tunes on the reported images)."),
          protocol: str = typer.Option("end-of-training", help="end-of-training (all steps, select on the last) or "
                                                                 "first-step (step 1 only; `csseg final` runs all steps)."),
          scheduler: str = typer.Option("fifo", help="fifo or asha (stops weak trials at step boundaries)."),
          concurrency: Optional[int] = typer.Option(None, help="Concurrent trials; default: what the cluster holds."),
          workers_per_trial: int = typer.Option(1, help="DDP workers per trial (Ray Train)."),
          gpus_per_worker: float = typer.Option(0.0, help="GPUs per worker (0 = CPU, gloo)."),
          cpus_per_worker: float = typer.Option(1.0, help="CPUs per worker."),
          address: Optional[str] = typer.Option(None, help="Join a Ray cluster: auto or HOST:PORT."),
          storage: str = typer.Option("sweeps", help="Parent folder of the sweep folder: a path every node sees."),
          name: Optional[str] = typer.Option(None, help="Sweep name; default derived from the sweep's content."),
          resume: bool = typer.Option(False, help="Continue an interrupted sweep (same --name does too)."),
          seed: int = typer.Option(0, help="Seed of the runs and of the TPE sampler."),
          seeds: Optional[str] = typer.Option(None, help="Seeds as a grid axis, e.g. 0,1,2."),
          max_failures: int = typer.Option(1, help="Retries of a failed trial, from its last finished step."),
          data_root: Optional[Path] = typer.Option(None, help="Dataset root; default: the synthetic dataset."),
          profile: str = typer.Option("smoke", help="smoke, small or paper."),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="key=value pinned for every trial (repeatable)."),
          no_dashboard: bool = typer.Option(False, "--no-dashboard", help="Start Ray without its dashboard."),
          verbose: bool = typer.Option(False, "--verbose", help="Ray's own output (Tune tables, worker prints) "
                                                                "here instead of the live table + sweep.log.")):
    """Sweep loss weights over a scenario grid: Ray Tune + Optuna, one TorchTrainer per trial."""
    from csseg_core.config import parse_set
    from sweeper import SweepSpec, run_sweep

    try:
        grid_seeds = tuple(int(s) for s in _csv(seeds)) or (None,)
    except ValueError:
        from csseg_core.errors import ConfigError

        raise ConfigError(f"--seeds {seeds!r} is not a comma-separated list of integers; e.g. --seeds 0,1,2") from None
    spec = SweepSpec(scenarios=_csv(scenarios), method=method, modes=_csv(mode), trials=trials, metric=metric,
                     objectives=_csv(objectives), select_on=select_on, protocol=protocol, scheduler=scheduler, concurrency=concurrency,
                     workers_per_trial=workers_per_trial, gpus_per_worker=gpus_per_worker,
                     cpus_per_worker=cpus_per_worker, address=address, storage=str(storage), name=name,
                     resume=resume, seed=seed, max_failures=max_failures,
                     data_root=str(data_root) if data_root else None, profile=profile,
                     overrides=tuple(parse_set(set_ or []).items()), grid_seeds=grid_seeds,
                     dashboard=not no_dashboard, verbose=1 if verbose else 0)
    sweep_dir = run_sweep(spec)
    _print_leaderboard(sweep_dir, None, top=5)
    typer.echo(f"next: csseg results {sweep_dir} | csseg export-best {sweep_dir} --out best.yaml")


def _print_leaderboard(sweep_dir: Path, metric: Optional[str], top: Optional[int], select_on: Optional[str] = None,
                       wide: bool = False, fmt: str = "table") -> None:
    from sweeper import board, leaderboard, read_reeval, unranked_note

    rows = leaderboard(sweep_dir, metric, top=top, select_on=select_on)
    if fmt != "table":
        typer.echo(board.text(rows, fmt, wide=wide), nl=False)
        return
    note = unranked_note(sweep_dir)
    if not rows:
        typer.echo(f"{sweep_dir}: no trial has finished every step yet" + (f" ({note})" if note else ""))
        return
    split_name = "validation" if rows[0]["select_on"] == "val" else "TEST (the literature's protocol)"
    title = f"{Path(sweep_dir).name} · {{cell}}: mIoU % at step {{step}}, ranked by {{metric}} on {split_name}"
    for cell, table in board.tables(rows, title, wide=wide):
        out = common.console
        if wide:  # the table at its natural width (the terminal wraps long lines), never squeezed into columns of 2
            natural = common.console.measure(table, options=common.console.options.update(width=10_000)).maximum
            out = Console(width=max(common.console.width, natural))
        out.print(table)
        _print_noise([r for r in rows if r["cell"] == cell], (read_reeval(sweep_dir) or {}), cell)
    if note:
        typer.echo(note)


def _print_noise(cell_rows: list, reeval: dict, cell: str) -> None:
    """Seed spread of the cell's top trials, when `export-best --top K --seeds S` measured it."""
    from csseg_core.metrics import STEP_KINDS

    metric = cell_rows[0]["metric"]
    gap = (cell_rows[0][metric] or 0) - (cell_rows[1][metric] or 0) if len(cell_rows) > 1 else None
    summary = next((c for c in reeval.get("cells", []) if c["cell"] == cell), None)
    if summary is None:
        if gap is not None:
            typer.echo(f"  top-2 gap {100 * gap:.1f} points on one seed each; measure the seed spread with "
                       f"`csseg export-best DIR --top 3 --seeds 3` before trusting the ranking")
        return
    table = Table(title=f"{cell}: top trials re-run over seeds {summary['seeds']} (mean ± std, mIoU %)")
    for col in ("trial", "val all", "val old", "val new", "test all", "test old", "test new"):
        table.add_column(col)
    for c in summary["candidates"]:
        m, sd = c["metrics"], c["metrics_std"]
        table.add_row(str(c["trial_id"]).split("_")[-1], *(f"{pct(m[k])} ± {pct(sd[k])}" for k in (
            f"{prefix}miou_{kind}" for prefix in ("val_", "") for kind in STEP_KINDS)))
    common.console.print(table)
    spread = max((c["metrics_std"][summary["metric"]] for c in summary["candidates"]), default=0.0)
    if gap is not None and gap <= spread:
        typer.echo(f"  the top-2 single-seed gap ({100 * gap:.1f} points) is within the seed spread "
                   f"(std up to {100 * spread:.1f}): the re-run's mean decides (best: {summary['best']['trial_id']})")


@app.command()
@user_errors
def results(sweep_dir: Path = typer.Argument(..., help="A sweep folder (sweeps/<name>)."),
            metric: Optional[str] = typer.Option(None, help="Rank by this metric (all|old|new|avg); default: the sweep's."),
            select_on: Optional[str] = typer.Option(None, help="val or test; default: the sweep's (val)."),
            top: Optional[int] = typer.Option(None, help="Rows per grid cell."),
            wide: bool = typer.Option(False, "--wide", help="Every column, full names and values (may wrap)."),
            fmt: str = typer.Option("table", "--format", help="table, or csv|json (every column, IoUs as fractions) "
                                                             "or md (the table's columns, IoUs in %).")):
    """Print the leaderboard of a sweep, per grid cell (trials that finished every step), one line per trial."""
    from csseg_core.errors import ConfigError
    from sweeper.board import FORMATS

    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if select_on == "test":
        from sweeper.spec import TEST_PROTOCOL_NOTE

        typer.echo(f"note: {TEST_PROTOCOL_NOTE}", err=True)
    _print_leaderboard(sweep_dir, metric, top, select_on, wide=wide, fmt=fmt)


@app.command("export-best")
@user_errors
def export_best(sweep_dir: Path = typer.Argument(..., help="A sweep folder."),
                metric: Optional[str] = typer.Option(None, help="Best by this metric (all|old|new|avg); default: the sweep's."),
                select_on: Optional[str] = typer.Option(None, help="val or test; default: the sweep's (val)."),
                top: int = typer.Option(1, help="With --seeds: re-run the K best trials of each cell."),
                seeds: int = typer.Option(0, help="Re-run the --top trials over S seeds (on Ray) and pick the best mean."),
                concurrency: Optional[int] = typer.Option(None, help="Concurrent re-runs (with --seeds)."),
                address: Optional[str] = typer.Option(None, help="Ray cluster for the re-runs (with --seeds)."),
                out: Path = typer.Option(Path("best.yaml"), help="Where to write the YAML.")):
    """Write the best configuration of each grid cell, its metrics and the command that reruns it."""
    from sweeper import export_best as export

    if select_on == "test":
        from sweeper.spec import TEST_PROTOCOL_NOTE

        typer.echo(f"note: {TEST_PROTOCOL_NOTE}", err=True)
    path = export(sweep_dir, metric, out, select_on=select_on, top=top, seeds=seeds, concurrency=concurrency,
                  address=address)
    if seeds:
        _print_leaderboard(sweep_dir, metric, top, select_on)
    typer.echo(f"wrote {path}; run it with: csseg train --config {path}  (or csseg final {path} --seeds 3)")


@app.command()
@user_errors
def report(folder: Path = typer.Argument(..., help="A sweep folder (sweeps/<name>) or a run folder (runs/<run>)."),
           out: Optional[Path] = typer.Option(None, help="Output folder; default: FOLDER/report."),
           final: Optional[Path] = typer.Option(None, help="final.parquet of `csseg final` (default: "
                                                           "FOLDER/final/final.parquet when it exists).")):
    """Plots of a sweep or a run: report.html (interactive, works offline), PNGs and report.md."""
    from sweeper.report import report as make_report

    written = make_report(folder, out, final=final)
    typer.echo(f"wrote {written['html']} ({written['figures']} figures), {len(written['pngs'])} PNGs and {written['md']}")


@app.command()
@user_errors
def dashboard(sweep_dir: Path = typer.Argument(..., help="A sweep folder."),
              cell: Optional[str] = typer.Option(None, help="Grid cell whose study to show (when there are several)."),
              port: int = typer.Option(8080, help="Port on 127.0.0.1.")):
    """Optuna dashboard on the sweep's journal storage (127.0.0.1, live while the sweep runs)."""
    from sweeper.dashboard import serve

    serve(sweep_dir, cell, port, echo=typer.echo)


@app.command()
@user_errors
def final(best: Path = typer.Argument(..., help="A file written by `csseg export-best`."),
          seeds: int = typer.Option(3, help="Number of seeds (0..N-1)."),
          scenarios: Optional[str] = typer.Option(None, help="Evaluate on these scenarios / class orders instead "
                                                              "(transfer), e.g. voc-15-1b,voc-15-1c."),
          data_root: Optional[Path] = typer.Option(None, help="Dataset root; default: the file's."),
          out: Optional[Path] = typer.Option(None, help="Output folder; default: <file dir>/final."),
          progress: bool = typer.Option(True, help="Show progress bars.")):
    """Run the exported configuration(s) over several seeds; report mean ± std per metric (val and test)."""
    from csseg_core.metrics import KINDS, METRICS
    from sweeper import run_final

    summaries = run_final(best, seeds, out_dir=out, data_root=str(data_root) if data_root else None, progress=progress,
                          scenarios=_csv(scenarios) or None)
    table = Table(title=f"final runs of {summaries[0]['method']} over {seeds} seed(s) (mIoU %, last step, mean ± std)",
                  caption="* a scenario / class order the sweep never saw (transfer)")
    for col in ("tuned on", "run on", "split", *KINDS):
        table.add_column(col)
    for s in summaries:
        m = s["metrics"]
        for split, prefix in (("val", "val_"), ("test", "")):
            table.add_row(s["cell"], s["scenario"] + ("*" if s["transfer"] else ""), split,
                          *(f"{pct(m[prefix + k]['mean'])} ± {pct(m[prefix + k]['std'])}" for k in METRICS))
    common.console.print(table)
    typer.echo(f"tables: {(out or best.resolve().parent / 'final') / 'final.parquet'}")
