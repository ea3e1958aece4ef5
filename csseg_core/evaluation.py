"""Evaluate a saved state on the test (or held-out validation) split of its step (``csseg test``)."""

from __future__ import annotations

import torch

from .config import ExperimentConfig
from .data import build_datasets, default_data_root
from .engine import default_device, evaluate, make_loader
from .errors import ConfigError
from .metrics import step_metrics
from .models import build_model, load_previous
from .scenarios import get_scenario


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
