"""Run the steps of one configuration and keep everything on disk.

``run_scenario`` writes, under ``out_dir``:

* ``config.yaml``: the resolved configuration (loadable by ``csseg train --config``);
* ``checkpoints/step<k>-<key>.pt``: the state after step k, named by its content hash and
  written atomically, so an interrupted run never leaves a half file and a rerun of the same
  configuration resumes after the last finished step;
* ``tensorboard/``: the events of every step;
* ``steps.parquet``: one row per step (see :func:`csseg_core.results.step_row`).

Step 0 collects the statistics ``cfg.method`` needs (``state["collected"]``). A step-0 state
reused from ``out_dir`` or from ``$CSSEG_HOME/states`` must hold them; when it lacks one (it
was trained for another method), step 0 is trained again collecting the union of what it held
and what this method needs, and the superset replaces the shared state (statistics follow the
training trajectory, so they cannot be added to a finished state). Training is unchanged by
what is collected, so the step-0 key stays shared by every method.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch.distributed as dist
import yaml

from .collectors import held_statistics
from .config import ExperimentConfig
from .data import csseg_home
from .engine import dist_info, run_step
from .errors import ConfigError, CssegError, DataError
from .methods import required_statistics
from .results import append_rows, step_row
from .state import load_state, save_state


def checkpoint_path(out_dir: str | Path, cfg: ExperimentConfig, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step{step}-{cfg.step_key(step)}.pt"


def shared_step0_path(cfg: ExperimentConfig) -> Path:
    """Where every run keeps its step-0 state for the others: ``$CSSEG_HOME/states/step0-<key>.pt``.

    Step 0 is FT for every method and its key ignores the method, so ``csseg train`` with
    another method (or a rerun) starts from it instead of training it again.
    """
    return csseg_home() / "states" / f"step0-{cfg.step_key(0)}.pt"


def finished_state(path: Path | None, step: int, need: set[str]) -> tuple[dict | None, set[str] | None]:
    """``(state, held)`` of the finished state at ``path`` (one with metrics) when it holds the
    statistics ``need`` (a step-0 state records those it holds; a later step's has its method's);
    ``(None, held)`` when it lacks some, ``(None, None)`` when there is none."""
    if path is None or not path.exists():
        return None, None
    state = load_state(path)
    if state.get("metrics") is None:
        return None, None
    held = held_statistics(state) if step == 0 else need
    return (state, held) if need <= held else (None, held)


def shared_step0(cfg: ExperimentConfig, collect: Iterable[str] = ()) -> dict:
    """The shared step-0 state of ``cfg`` (:func:`shared_step0_path`), holding the statistics that
    ``cfg.method`` and ``collect`` need: read when it has them, else trained once (with the union of
    what it held) and saved there. One process; what tests and benchmarks start their steps from."""
    need = set(required_statistics([cfg.method], collect))
    state, held = finished_state(shared_step0_path(cfg), 0, need)
    if state is None:
        state, _ = run_step(cfg, 0, collect=sorted(need | (held or set())))
        save_state(state, shared_step0_path(cfg))
    return state


def write_config(cfg: ExperimentConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def format_metrics(m: dict) -> str:
    """``val all 58.0 old 69.1 new 11.2 | test all 61.3 old 70.1 new 12.0 avg 65.2`` (percentages)."""
    from .metrics import KINDS, STEP_KINDS
    from .metrics import format_percent as pct

    def part(prefix: str, keys) -> str:
        return " ".join(f"{k} {pct(m.get(f'{prefix}miou_{k}'))}" for k in keys)

    return f"val {part('val_', STEP_KINDS)} | test {part('', KINDS)}"


def run_scenario(cfg: ExperimentConfig, out_dir: str | Path, *, steps: Iterable[int] | None = None,
                 start_state: dict | None = None, progress: bool = True, resume: bool = True,
                 echo: Callable[[str], None] = print) -> list[dict]:
    """Run ``steps`` (default: all) of ``cfg``, chaining states, writing results under ``out_dir``.

    Args:
        cfg: the configuration.
        out_dir: the run directory (created; must be writable).
        steps: the steps to run, increasing and contiguous; the state before the first one
            comes from ``start_state`` or from ``out_dir``'s checkpoints.
        start_state: the state of the step before the first one (``--step-ckpt``).
        progress: show progress bars.
        resume: reuse finished steps whose checkpoint (same content hash) exists.
        echo: where one-line summaries go.

    Returns:
        The metrics of each step run (or reused).
    """
    out_dir = Path(out_dir)
    rank, _ = dist_info()
    steps = list(range(cfg.num_steps) if steps is None else steps)
    if cfg.data_root and not Path(cfg.data_root).exists():
        raise DataError(f"data root {cfg.data_root} does not exist; pass the folder holding VOCdevkit or "
                        f"ADEChallengeData2016, or omit --data-root for the synthetic dataset")
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_config(cfg, out_dir / "config.yaml")
        except OSError as err:
            raise ConfigError(f"cannot write to output directory {out_dir} ({err.strerror}); pass a writable --out DIR") from None
    state = start_state
    if steps and steps[0] > 0 and state is None:
        prev = checkpoint_path(out_dir, cfg, steps[0] - 1)
        if not prev.exists():
            raise ConfigError(f"step {steps[0]} needs {prev} (step {steps[0] - 1} of this configuration); "
                              f"run that step first or pass --step-ckpt FILE")
        state = load_state(prev)
    results = []
    need = set(required_statistics([cfg.method]))
    for step in steps:
        ckpt = checkpoint_path(out_dir, cfg, step)
        shared = shared_step0_path(cfg) if step == 0 else None
        collect: set[str] = set()
        saved, source, lacking = None, None, None
        if resume:  # every rank reads the same files, so every rank decides the same
            for path in (ckpt, shared):
                candidate, held = finished_state(path, step, need)
                if candidate is not None:
                    saved, source = candidate, path
                    break
                if held is not None:  # step 0 for another method: train it again with the union
                    collect |= held
                    lacking = lacking or (path, held)
        if not resume and shared is not None and shared.exists():
            collect |= held_statistics(load_state(shared))  # retraining never shrinks the shared state
        if saved is None and lacking is not None and rank == 0:
            path, held = lacking
            missing = ", ".join(s for s in required_statistics(extra=need) if s not in held)
            echo(f"step 0: trained again: the cached step-0 state {path} lacks the statistic(s) {missing} that "
                 f"{cfg.method} needs (it holds {', '.join(required_statistics(extra=held)) or 'none'}); "
                 f"the retrained state holds the union and replaces it")
        if dist_info()[1] > 1:
            dist.barrier()  # every rank has read the files before rank 0 copies the shared state
        if saved is not None:
            if source == shared and rank == 0:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shared, ckpt)  # the same step 0 trained by another run (any method)
                echo(f"step 0: reusing the shared step-0 state {shared}")
            state, metrics = saved, saved["metrics"]
            if rank == 0:
                append_rows(out_dir / "steps.parquet", [step_row(cfg, metrics, run=out_dir.name, reused=True)], key=("step",))
            echo(f"step {step}: reusing {ckpt.name} | {format_metrics(metrics)}")
            results.append(metrics)
            continue
        try:
            state, metrics = run_step(cfg, step, state, collect=sorted(collect),
                                      log_dir=str(out_dir / "tensorboard") if rank == 0 else None, progress=progress)
        except CssegError as err:
            done = f"; finished steps are in {out_dir}" if step > steps[0] else ""
            raise type(err)(f"{err}{done}") from None
        if rank == 0:
            save_state(state, ckpt)
            if shared is not None:
                save_state(state, shared)
            append_rows(out_dir / "steps.parquet", [step_row(cfg, metrics, run=out_dir.name, reused=False)], key=("step",))
            echo(f"step {step}: {format_metrics(metrics)} | {metrics['wall_s']:.1f}s | "
                 f"{metrics['images_per_s']:.0f} img/s | {metrics.get('n_train_images', 0)} train images")
        results.append(metrics)
    return results
