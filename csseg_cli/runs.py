"""``csseg`` commands of one configuration: scenarios, methods, data synth, train, test.

Also the ``--config`` reader of ``csseg train`` (:func:`load_config_file`, :func:`build_config`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from . import common
from .common import app, data_app, pct, user_errors


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
    common.console.print(table)


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
    common.console.print(table)


@data_app.command("synth")
@user_errors
def data_synth(root: Path = typer.Option(..., help="Where to write the dataset."),
               dataset: str = typer.Option("voc", help="voc or ade."),
               train: Optional[int] = typer.Option(None, help="Training images."),
               val: Optional[int] = typer.Option(None, help="Validation images."),
               size: int = typer.Option(96, help="Image side in pixels."),
               seed: int = typer.Option(0, help="Generator seed."),
               style: str = typer.Option("default", help="Look: default, blobs or polygons (shapes, textures, "
                                                         "colours and backgrounds differ)."),
               clutter: int = typer.Option(0, help="Up to N unlabelled objects per image, drawn as background "
                                                   "(as real photos have; 0-10).")):
    """Write a synthetic dataset in the real VOC (or ADE20K) on-disk layout."""
    from csseg_core.data import synth
    from csseg_core.errors import ConfigError

    if dataset not in ("voc", "ade"):
        raise ConfigError(f"unknown dataset {dataset!r}; choose voc or ade")
    kwargs = {k: v for k, v in (("n_train", train), ("n_val", val)) if v is not None}
    path = synth.generate(root, dataset=dataset, size=size, seed=seed, style=style, clutter=clutter, **kwargs)
    extra = f", up to {clutter} unlabelled object{'s' * (clutter > 1)} per image" if clutter else ""
    typer.echo(f"wrote a synthetic {dataset} dataset ({style} style{extra}) to {path}")


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
    common.console.print(table)
    names = Table(title="per-class IoU (%)")
    names.add_column("class")
    names.add_column("IoU")
    for name, iou in zip(metrics["class_names"], metrics["class_iou"]):
        names.add_row(name, pct(iou))
    common.console.print(names)


@app.command("background-shift")
@user_errors
def background_shift(runs: List[Path] = typer.Argument(..., help="Folders written by `csseg train --out`."),
                     data_root: Optional[Path] = typer.Option(None, help="Dataset root; default: the run's."),
                     kd: Optional[float] = typer.Option(None, help="Distillation weight to judge 'learnable' by "
                                                                   "(default: each run's own; 0 without one).")):
    """What each step's teacher called the classes that step adds, beside their final IoU.

    Under MiB/SDR's unbiased losses a new class takes a pixel only where 1 + w q_bg > w max q_old
    (q: the teacher's probabilities, w = kd / old classes): "learnable" is that share of its pixels.
    """
    from csseg_core.evaluation import background_shift as shift
    from csseg_core.evaluation import rank_correlation

    rows = []
    for run in runs:
        table = Table(title=f"{run.name}: what each step's teacher called the class it adds (test pixels, %)")
        for col in ("class", "step", "bg", "top old", "share", "learnable", "IoU"):
            table.add_column(col, min_width=11 if col in ("class", "top old") else None)  # VOC's longest names
        for r in shift(run, data_root=str(data_root) if data_root else None, kd=kd):
            rows.append(r)
            table.add_row(r["name"], str(r["step"]), pct(r["called_bg"]), r["top_old_name"], pct(r["top_share"]),
                          pct(r["learnable"]), pct(r["final_iou"]))
        common.console.print(table)
    iou = [r["final_iou"] for r in rows]
    rho = rank_correlation([r["learnable"] for r in rows], iou)
    if not math.isnan(rho):  # fewer than 3 classes, or a constant column
        typer.echo(f"rank correlation of learnable and final IoU over {len(rows)} classes: {rho:.2f}")
    typer.echo("bg: share of the class's pixels the teacher called background; top old, share: the old class it "
               "called them most; learnable: share where 1 + w q_bg > w max q_old (w = kd / old classes), where the "
               "minimum of unbiased CE + kd x unbiased KD is the new class (docs/CALIBRATION.md section l); IoU: the "
               "class's test IoU after the run's last step")
