"""A fake SDR sweep folder on disk, as ``csseg sweep`` leaves it, without Ray: per-trial fragments
merged into ``trials.parquet`` / ``steps.parquet``, an Optuna journal with the same trials, one
failed trial and one still running (fragments only). Used by the report and leaderboard tests.

``BEST`` is the trial with the best validation mIoU (all), ``TEST_BEST`` the best on test.
"""

from __future__ import annotations

import math
import random

from csseg_core.config import resolve_config
from csseg_core.results import step_row
from search_spaces import get_space, param_to_dict, preset, to_optuna
from sweeper.tables import merge_trial, rows_dir, write_json, write_step_fragment

SCENARIO, CELL = "voc-15-5", "voc-15-5-disjoint"
BEST, TEST_BEST = "t02", "t01"


def trial_params(i: int) -> dict:
    """The preset for trial 0, then seeded draws inside the SDR space (names: the real ones)."""
    if i == 0:
        return dict(preset("sdr"))
    rng = random.Random(i)
    out = {}
    for name, p in get_space("sdr").items():
        if hasattr(p, "options"):
            out[name] = rng.choice(list(p.options))
        else:
            out[name] = float(f"{math.exp(rng.uniform(math.log(p.lo), math.log(p.hi))):.4g}")
    return out


def _write_trial(sweep_dir, trial_id: str, hp: dict, val: float, test: float, *, fail_at=None, running_at=None):
    cfg = resolve_config(SCENARIO, "sdr", profile="smoke", mode="disjoint", seed=0, overrides={**hp, "epochs": 1})
    write_json(rows_dir(sweep_dir, trial_id) / "meta.json", {
        "sweep": "fake-sdr", "cell": CELL, "trial_id": trial_id, "scenario": cfg.scenario, "mode": cfg.mode,
        "method": cfg.method, "profile": cfg.profile, "seed": cfg.seed, "num_steps": cfg.num_steps,
        "hp": hp, "params": cfg.method_params, "config": cfg.to_dict()})
    extra = {"sweep": "fake-sdr", "trial_id": trial_id, "cell": CELL, "error": None}
    for step in range(cfg.num_steps):
        if step == running_at:
            return
        if step == fail_at:
            write_step_fragment(sweep_dir, trial_id, step_row(cfg, {"step": step}, status="error",
                                                              **{**extra, "error": "TrainingError: loss is NaN"}))
            write_json(rows_dir(sweep_dir, trial_id) / "trial.json", {"status": "error", "error": "TrainingError: loss is NaN"})
            return
        n = 16 if step == 0 else 21
        m = {"step": step, "miou_all": test, "miou_old": test, "miou_new": test / 2 if step else math.nan,
             "miou_avg": test, "val_miou_all": val, "val_miou_old": val, "val_miou_new": val / 2 if step else math.nan,
             "val_miou_avg": val, "class_iou": [((c * 37) % 100) / 100 for c in range(n)],
             "val_class_iou": [((c * 53) % 100) / 100 for c in range(n)], "losses": {"ce": 0.1, "kd": 0.2},
             "wall_s": 2.0, "images_per_s": 10.0, "n_train_images": 5}
        write_step_fragment(sweep_dir, trial_id, step_row(cfg, m, status="ok", cached=step == 0, **extra))
    write_json(rows_dir(sweep_dir, trial_id) / "trial.json", {"status": "ok", "error": None, "wall_s": 4.0})


def make_sweep(sweep_dir, finished: int = 4):
    """Write the fake sweep; ``finished`` trials complete (plus one failed, one running).

    Validation mIoU (all) of the finished trials: 0.50, 0.55, 0.80 (``t02``), 0.60, ...;
    test: ``t01`` is best there (0.90) so selection must follow validation.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    space = get_space("sdr")
    identity = {"method": "sdr", "metric": "val_miou_all", "objectives": [], "overrides": {"epochs": 1},
                "select_on": "val", "data_root": None, "protocol": "end-of-training",
                "space": {k: param_to_dict(p) for k, p in space.items()}}
    write_json(sweep_dir / "sweep.json", {"name": "fake-sdr", "identity": identity, "status": "complete", "wall_s": 125.0,
                                          "step0": {"trained": 1, "reused": finished + 1}})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=CELL, direction="maximize",
                                storage=JournalStorage(JournalFileBackend(str(sweep_dir / f"optuna-{CELL}.log"))))
    distributions = to_optuna(space)
    vals = [0.50, 0.55, 0.80, 0.60] + [0.3 + 0.01 * i for i in range(max(0, finished - 4))]
    tests = [0.40, 0.90, 0.70, 0.50] + [0.2] * max(0, finished - 4)
    ids = []
    for i in range(finished):
        trial_id, hp = f"t{i:02d}", trial_params(i)
        _write_trial(sweep_dir, trial_id, hp, vals[i], tests[i])
        study.add_trial(optuna.trial.create_trial(params=hp, distributions=distributions, value=vals[i]))
        ids.append(trial_id)
    failed, hp = f"t{finished:02d}", trial_params(finished)
    _write_trial(sweep_dir, failed, hp, 0.0, 0.0, fail_at=1)
    study.add_trial(optuna.trial.create_trial(params=hp, distributions=distributions, state=optuna.trial.TrialState.FAIL))
    for trial_id in ids + [failed]:
        merge_trial(sweep_dir, trial_id)
    _write_trial(sweep_dir, f"t{finished + 1:02d}", trial_params(finished + 1), 0.45, 0.45, running_at=1)  # not merged
    return sweep_dir


def make_run(run_dir, steps: int = 3):
    """A ``csseg train`` folder: ``steps.parquet`` of voc-15-1 (steps 0..steps-1), run name = folder name."""
    from csseg_core.results import append_rows

    cfg = resolve_config("voc-15-1", "ft", profile="smoke", mode="disjoint", seed=0, overrides={"epochs": 1})
    rows = []
    for step in range(steps):
        n = 16 + step
        m = {"step": step, "miou_all": 0.6 - 0.05 * step, "miou_old": 0.6 - 0.06 * step,
             "miou_new": 0.2 if step else math.nan, "miou_avg": 0.5, "val_miou_all": 0.62 - 0.05 * step,
             "val_miou_old": 0.63 - 0.06 * step, "val_miou_new": 0.25 if step else math.nan, "val_miou_avg": 0.5,
             "class_iou": [((c * 29) % 100) / 100 for c in range(n)], "val_class_iou": [0.5] * n, "wall_s": 1.0}
        rows.append(step_row(cfg, m, run=run_dir.name, reused=False))
    append_rows(run_dir / "steps.parquet", rows, key=("step",))
    return run_dir
