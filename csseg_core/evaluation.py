"""Evaluate a saved state on the test (or held-out validation) split of its step (``csseg test``), and a
run's teachers on the classes each step adds (``csseg background-shift``)."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ExperimentConfig
from .data import build_datasets, default_data_root
from .engine import default_device, evaluate, make_loader
from .errors import ConfigError
from .metrics import step_metrics
from .models import build_model, load_previous
from .scenarios import get_scenario
from .state import load_state


def evaluate_state(state: dict, *, data_root: str | None = None, crop_val: bool = True, split: str = "test") -> dict:
    """Metrics of ``state``'s model on ``split`` of its own step (classes seen so far)."""
    if "config" not in state:
        raise ConfigError("the checkpoint has no 'config': it was not written by `csseg train`")
    cfg = ExperimentConfig.from_dict(state["config"])
    overrides = {"crop_val": crop_val}
    if data_root:
        overrides["data_root"] = data_root
    cfg = cfg.replace(**overrides)
    scenario = get_scenario(cfg.scenario)
    step = int(state["step"])
    classes = scenario.classes_per_step[: step + 1]
    root = cfg.data_root or str(default_data_root(scenario.dataset))
    datasets = build_datasets(scenario.dataset, root, scenario, cfg.mode, step, crop_size=cfg.crop_size,
                              crop_val=cfg.crop_val, index_dir=cfg.index_dir, splits=(split,),
                              cache_images=False, val_fraction=cfg.val_fraction)
    model = build_model(cfg.backbone, classes, pretrained=None, **cfg.model_kwargs())
    load_previous(model, state["model"])  # same-step state; ConfigError when the weights do not fit
    device = default_device()
    model.to(device)
    with torch.no_grad():
        cm = evaluate(model, make_loader(datasets[split], cfg, train=False, seed=0), sum(classes), device, cfg.amp)
    metrics = step_metrics(cm, classes[0])
    metrics["step"] = step
    metrics["class_names"] = list(scenario.class_names())[: sum(classes)]
    return metrics


def background_shift(run_dir: str | Path, *, data_root: str | None = None, kd: float | None = None) -> list[dict]:
    """What each step's teacher called the classes that step adds, and how much of them the loss lets it take.

    For every step k > 0 of the run in ``run_dir`` (a ``csseg train`` output folder), the model
    after step k-1 (the frozen teacher of step k) segments the test images of the run's last step
    (every class labelled). On the pixels of each class added at step k it counts what the teacher
    predicted, and the share where the unbiased cross-entropy plus ``kd`` times the unbiased
    distillation has its minimum on the new class: 1 + w q_bg > w max_c q_c, with q the teacher's
    probabilities (``softmax(alpha * logits)``) and w = kd / C_old (the distillation is averaged
    over the C_old old classes; docs/CALIBRATION.md section l). A method without ``kd`` has w = 0;
    ``kd`` replaces the run's (what-if: how much a smaller weight would free).

    Returns:
        One dict per added class: ``class`` (model index), ``name``, ``step``, ``called_bg`` and
        ``top_old`` / ``top_share`` (the teacher's argmax shares), ``learnable``, and
        ``final_iou`` (the class's test IoU at the run's last finished step, NaN if none).

    Raises:
        ConfigError: no run folder, a missing checkpoint, or a one-step run.
    """
    from .config import read_config_file
    from .scenario_run import checkpoint_path

    run_dir = Path(run_dir)
    cfg = ExperimentConfig.from_dict(read_config_file(run_dir / "config.yaml", what="run config",
                                                      hint="pass the folder `csseg train --out` wrote"))
    if data_root:
        cfg = cfg.replace(data_root=data_root)
    scenario = get_scenario(cfg.scenario)
    last = scenario.num_steps - 1
    if last == 0:
        raise ConfigError(f"{cfg.scenario} has one step: no class is added after step 0 in {run_dir}")
    paths = [checkpoint_path(run_dir, cfg, k) for k in range(last + 1)]
    missing = [p for p in paths[:last] if not p.is_file()]
    if missing:
        raise ConfigError(f"{missing[0]} does not exist: background-shift needs every step's checkpoint but the last; "
                          f"finish the run (`csseg train --out {run_dir}`) first")
    params = cfg.method_params
    alpha = float(params.get("alpha", 1.0))
    kd = float(params.get("kd", 0.0) if kd is None else kd)
    if not 0 <= kd < float("inf"):
        raise ConfigError(f"kd {kd} is not a weight; pass a finite number >= 0")
    root = cfg.data_root or str(default_data_root(scenario.dataset))
    test = build_datasets(scenario.dataset, root, scenario, cfg.mode, last, crop_size=cfg.crop_size,
                          crop_val=cfg.crop_val, index_dir=cfg.index_dir, splits=("test",), cache_images=False,
                          val_fraction=cfg.val_fraction)["test"]
    finished = [p for p in paths if p.is_file()]
    final = load_state(finished[-1])["metrics"].get("class_iou", []) if finished else []
    names = scenario.class_names()
    device = default_device()
    rows = []
    for step in range(1, last + 1):
        classes = scenario.classes_per_step[:step]
        n_old, n_new = sum(classes), scenario.classes_per_step[step]
        teacher = build_model(cfg.backbone, classes, pretrained=None, **cfg.model_kwargs())
        load_previous(teacher, load_state(paths[step - 1])["model"])
        teacher.to(device).eval()
        w = kd / n_old
        counts = torch.zeros(n_new, n_old, dtype=torch.float64)
        learnable = torch.zeros(n_new, dtype=torch.float64)
        with torch.no_grad():
            for image, target in make_loader(test, cfg, train=False, seed=0):
                target = target.to(device)
                keep = (target >= n_old) & (target < n_old + n_new)
                if not keep.any():
                    continue
                logits, _ = teacher(image.to(device))
                q = torch.softmax(alpha * logits.float(), 1).permute(0, 2, 3, 1)[keep]  # pixels x C_old
                c = (target[keep] - n_old).long()
                counts.index_put_((c.cpu(), q.argmax(1).cpu()), torch.ones(len(c), dtype=torch.float64),
                                  accumulate=True)
                wins = (1 + w * q[:, 0] > w * q[:, 1:].max(1).values).double()
                learnable.index_add_(0, c.cpu(), wins.cpu())
        for j in range(n_new):
            total = float(counts[j].sum())  # 0: the class has no test pixel (NaN shares)
            share = counts[j] / total if total else torch.full((n_old,), float("nan"), dtype=torch.float64)
            top = int(counts[j][1:].argmax()) + 1
            cls = n_old + j
            rows.append({"class": cls, "name": names[cls], "step": step, "called_bg": float(share[0]),
                         "top_old": top, "top_old_name": names[top], "top_share": float(share[top]),
                         "learnable": float(learnable[j]) / total if total else float("nan"),
                         "final_iou": float(final[cls]) if cls < len(final) else float("nan")})
    return rows


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two sequences (ties get their average rank); NaN pairs dropped."""
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan")

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # average rank of ties
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
