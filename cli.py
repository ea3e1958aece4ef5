"""csseg command line: a thin Typer layer (parse -> frozen config -> call csseg_core / sweeper).

    csseg scenarios                                   # every scenario, its steps and aliases
    csseg methods                                     # every method and its hyperparameters
    csseg data synth --dataset voc --root DIR         # the synthetic dataset in the real layout
    csseg train voc-15-1 --method sdr --profile smoke # all steps of one configuration
    csseg test runs/<run>/checkpoints/step5-<key>.pt  # evaluate a checkpoint
    csseg sweep voc-15-1 --method sdr --trials 8      # Ray Tune + Optuna sweep
    csseg results DIR | csseg export-best DIR --out best.yaml | csseg final best.yaml --seeds 3
    csseg report DIR                                  # report.html + PNGs + report.md of a sweep or a run
    csseg dashboard DIR                               # optuna-dashboard on the sweep's journal (127.0.0.1)

Bad input ends with one line on stderr naming the problem and the fix, and a non-zero exit.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
from rich.table import Table


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value, missing argument) as one ``error:`` line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as err:
            from typer import rich_utils

            rich_utils.rich_format_error(err)
            sys.exit(err.exit_code)
        except ClickException as err:
            where = f" (see `{err.ctx.command_path} --help`)" if getattr(err, "ctx", None) else ""
            typer.echo(f"error: {err.format_message()}{where}", err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continual semantic segmentation (SDR and baselines) with Ray sweeps.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic one.")
app.add_typer(data_app, name="data")
console = Console()


def user_errors(fn):
    """Turn csseg errors (and Ctrl-C) into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from csseg_core.errors import CssegError

        try:
            return fn(*args, **kwargs)
        except CssegError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished steps and trials are kept on disk; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


def pct(x) -> str:
    """IoU fraction as a percentage with one decimal (:func:`csseg_core.metrics.format_percent`, imported late)."""
    from csseg_core.metrics import format_percent

    return format_percent(x)


@app.command()
@user_errors
def scenarios(dataset: Optional[str] = typer.Option(None, help="Only this dataset (voc or ade).")):
    """Print every scenario: name, steps, classes per step, aliases."""
    from csseg_core.errors import ConfigError
    from csseg_core.scenarios import list_scenarios

    if dataset is not None and dataset not in ("voc", "ade"):
        raise ConfigError(f"unknown dataset {dataset!r}; choose voc or ade")
    table = Table(title="csseg scenarios")
    for col in ("name", "dataset", "steps", "classes per step", "aliases"):
        table.add_column(col)
    for s in list_scenarios():
        if dataset and s.dataset != dataset:
            continue
        per_step = s.classes_per_step
        shown = ", ".join(map(str, per_step)) if len(per_step) <= 8 else f"{per_step[0]}, {per_step[1]} × {len(per_step) - 1}"
        table.add_row(s.name, s.dataset, str(s.num_steps), shown, ", ".join(s.aliases))
    console.print(table)


@app.command()
@user_errors
def methods():
    """Print every method with its hyperparameters and reference defaults."""
    from csseg_core.methods import get_method, list_methods, method_defaults

    table = Table(title="csseg methods (set with --set key=value)")
    for col in ("method", "hyperparameters (defaults)", "collects"):
        table.add_column(col)
    for name in list_methods():
        params = ", ".join(f"{k}={v}" for k, v in method_defaults(name).items()) or "—"
        table.add_row(name, params, ", ".join(get_method(name).collects) or "—")
    console.print(table)


@data_app.command("synth")
@user_errors
def data_synth(root: Path = typer.Option(..., help="Where to write the dataset."),
               dataset: str = typer.Option("voc", help="voc or ade."),
               train: Optional[int] = typer.Option(None, help="Training images."),
               val: Optional[int] = typer.Option(None, help="Validation images."),
               size: int = typer.Option(96, help="Image side in pixels."),
               seed: int = typer.Option(0, help="Generator seed."),
               style: str = typer.Option("default", help="Look: default, blobs or polygons (shapes, textures, "
                                                         "colours and backgrounds differ).")):
    """Write a synthetic dataset in the real VOC (or ADE20K) on-disk layout."""
    from csseg_core.data import synth
    from csseg_core.errors import ConfigError

    if dataset not in ("voc", "ade"):
        raise ConfigError(f"unknown dataset {dataset!r}; choose voc or ade")
    kwargs = {k: v for k, v in (("n_train", train), ("n_val", val)) if v is not None}
    path = synth.generate(root, dataset=dataset, size=size, seed=seed, style=style, **kwargs)
    typer.echo(f"wrote a synthetic {dataset} dataset ({style} style) to {path}")


#: Keys of an export-best entry that describe the choice, not the configuration.
EXPORT_ONLY_KEYS = ("metrics", "metrics_std", "seeds", "reeval_sweep", "command", "params", "trial_id", "sweep", "cell",
                    "metric", "selected_on", "protocol", "selected_at_step")


def load_config_file(path: Path, scenario: Optional[str], mode: Optional[str]) -> dict:
    """Read a ``--config`` YAML (a run's config.yaml or export-best output), safely.

    Of an export-best file with several cells, the one cell of ``scenario`` (any alias, as
    :func:`sweeper.load_best`) and ``mode`` is used."""
    from csseg_core.config import config_entries, read_config_file, select_entries
    from csseg_core.errors import ConfigError

    data = read_config_file(path)
    if "cells" in data:
        entries = config_entries(data, path)
        cells = select_entries(entries, scenario, mode)
        if len(cells) != 1:
            names = ", ".join(f"{c.get('scenario')}/{c.get('mode')}" for c in entries)
            raise ConfigError(f"config file {path} holds several cells ({names}); pick one with SCENARIO and --mode")
        data = cells[0]
    out = {k: v for k, v in data.items() if k not in EXPORT_ONLY_KEYS}
    out.update(data.get("params") or {})
    return out


def build_config(scenario, method, profile, mode, seed, data_root, set_, config):
    from csseg_core.config import parse_set, resolve_config

    file_values = load_config_file(config, scenario, mode) if config else {}
    scenario = scenario or file_values.pop("scenario", None)
    method = method or file_values.pop("method", None) or "ft"
    profile = profile or file_values.pop("profile", None) or "smoke"
    if scenario is None:
        from csseg_core.errors import ConfigError

        raise ConfigError("no scenario given: pass SCENARIO (e.g. voc-15-1) or a --config file that names one")
    overrides = {**file_values, **parse_set(set_ or [])}
    return resolve_config(scenario, method, profile=profile, mode=mode, seed=seed,
                          data_root=str(data_root) if data_root else None, overrides=overrides)


@app.command()
@user_errors
def train(scenario: Optional[str] = typer.Argument(None, help="Scenario, e.g. voc-15-1 (see `csseg scenarios`)."),
          method: Optional[str] = typer.Option(None, "--method", "-m", help="Method (see `csseg methods`); default ft."),
          mode: Optional[str] = typer.Option(None, help="disjoint (default), overlapped or sequential."),
          profile: Optional[str] = typer.Option(None, help="smoke (default), small or paper."),
          data_root: Optional[Path] = typer.Option(None, help="Dataset root; default: the synthetic dataset."),
          step: Optional[int] = typer.Option(None, help="Run only this step (needs step-1 in --out or --step-ckpt)."),
          seed: Optional[int] = typer.Option(None, help="Seed for python/numpy/torch and the data order."),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="key=value override (repeatable)."),
          config: Optional[Path] = typer.Option(None, "--config", help="YAML config (config.yaml or export-best)."),
          out: Optional[Path] = typer.Option(None, help="Run directory; default runs/<scenario>-<mode>-<method>-<hash>."),
          step_ckpt: Optional[Path] = typer.Option(None, help="Start from this state: a csseg step-k checkpoint or one written by the official SDR code."),
          workers: int = typer.Option(1, help="DDP processes (gloo on CPU, NCCL on GPU)."),
          pretrained: Optional[str] = typer.Option(None, help="Backbone weights: 'imagenet' or a local state dict (torchvision's, the official resnet_atrous backbone's, or an official SDR checkpoint)."),
          no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Random initialisation."),
          no_crop_val: bool = typer.Option(False, "--no-crop-val", help="Evaluate on full images (batch 1)."),
          progress: bool = typer.Option(True, help="Show progress bars.")):
    """Run all steps (or one) of one configuration; writes checkpoints, TensorBoard, steps.parquet."""
    from csseg_core.errors import ConfigError
    from csseg_core.state import load_state

    extra = list(set_ or [])
    if pretrained:
        extra.append(f"pretrained={pretrained}")
    if no_pretrained:
        extra.append("pretrained=none")
    if no_crop_val:
        extra.append("crop_val=false")
    cfg = build_config(scenario, method, profile, mode, seed, data_root, extra, config)
    out = out or Path("runs") / cfg.run_name()
    start_state = load_state(step_ckpt, cfg) if step_ckpt else None
    first = step if step is not None else (int(start_state["step"]) + 1 if start_state else 0)
    if not 0 <= first < cfg.num_steps:
        raise ConfigError(f"--step {first} is out of range: {cfg.scenario} has steps 0..{cfg.num_steps - 1}")
    steps = [first] if step is not None else list(range(first, cfg.num_steps))
    if start_state is not None and int(start_state["step"]) != first - 1:
        raise ConfigError(f"--step-ckpt holds step {start_state['step']}, but step {first} needs step {first - 1}")
    typer.echo(f"run {cfg.run_name()} -> {out}", err=True)
    if workers > 1:
        from csseg_core.distributed import launch

        launch(workers, cfg, out, steps, start_state, progress)
    else:
        from csseg_core.scenario_run import run_scenario

        run_scenario(cfg, out, steps=steps, start_state=start_state, progress=progress)
    typer.echo(f"results: {out / 'steps.parquet'} | tensorboard --logdir {out / 'tensorboard'}")


@app.command()
@user_errors
def test(checkpoint: Path = typer.Argument(..., help="A checkpoint written by `csseg train`."),
         data_root: Optional[Path] = typer.Option(None, help="Dataset root; default: the config's."),
         no_crop_val: bool = typer.Option(False, "--no-crop-val", help="Evaluate on full images."),
         split: str = typer.Option("test", help="test (the dataset's evaluation images) or val (the held-out "
                                                "train images sweeps select on).")):
    """Evaluate a checkpoint on the test (or validation) split of its step (all classes seen so far)."""
    from csseg_core.errors import ConfigError
    from csseg_core.evaluation import evaluate_state
    from csseg_core.state import load_state

    if split not in ("test", "val"):
        raise ConfigError(f"unknown split {split!r}; choose test or val")
    metrics = evaluate_state(load_state(checkpoint), data_root=str(data_root) if data_root else None,
                             crop_val=not no_crop_val, split=split)
    table = Table(title=f"{checkpoint.name}: step {metrics['step']} {split}")
    for col in ("mIoU all", "old", "new", "overall acc"):
        table.add_column(col)
    table.add_row(pct(metrics["miou_all"]), pct(metrics["miou_old"]), pct(metrics["miou_new"]), pct(metrics["overall_acc"]))
    console.print(table)
    names = Table(title="per-class IoU (%)")
    names.add_column("class")
    names.add_column("IoU")
    for name, iou in zip(metrics["class_names"], metrics["class_iou"]):
        names.add_row(name, pct(iou))
    console.print(names)


# ---------------------------------------------------------------------------- sweeps
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
    console.print(table)


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
        out = console
        if wide:  # the table at its natural width (the terminal wraps long lines), never squeezed into columns of 2
            natural = console.measure(table, options=console.options.update(width=10_000)).maximum
            out = Console(width=max(console.width, natural))
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
    console.print(table)
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
    console.print(table)
    typer.echo(f"tables: {(out or best.resolve().parent / 'final') / 'final.parquet'}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
