"""Names of the official SDR code (LTTM/SDR, ``make_model_v2``) and its checkpoints.

The official network (``IncrementalSegmentationModule`` with ``net/resnet_atrous.py`` and
``modules/deeplab.py``) and csseg's :class:`IncrementalSegmenter` hold the same tensors under
the same names (``body.*`` = torchvision's ResNet names, ``cls.<step>.*``), except two head
modules:

=================================== =========================
official                            csseg
=================================== =========================
``head.global_pooling_conv.weight`` ``head.pool_conv.weight``
``head.global_pooling_bn.*``        ``head.pool_bn.*``
=================================== =========================

A checkpoint written by the official ``run.py`` (``save_ckpt``) is a dict with
``model_state`` (``module.``-prefixed under DDP), ``prototypes`` / ``count_features`` and
``trainer_state["regularizer"]`` (EWC ``fisher``, PI ``score``, RW ``score`` + ``fisher``);
:func:`state_from_official` turns it into a csseg step state.

Example:
    >>> to_csseg_name("module.head.global_pooling_bn.running_mean")
    'head.pool_bn.running_mean'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from csseg_core.errors import ConfigError

__all__ = ["RENAMES", "is_official_checkpoint", "state_from_official", "to_csseg_name", "to_official_name"]

RENAMES: tuple[tuple[str, str], ...] = (
    ("head.global_pooling_conv.", "head.pool_conv."),
    ("head.global_pooling_bn.", "head.pool_bn."),
)


def to_csseg_name(key: str) -> str:
    """The csseg name of an official parameter name (``module.`` stripped)."""
    key = key.removeprefix("module.")
    for official, ours in RENAMES:
        if key.startswith(official):
            return ours + key[len(official):]
    return key


def to_official_name(key: str) -> str:
    """The official name of a csseg parameter name."""
    for official, ours in RENAMES:
        if key.startswith(ours):
            return official + key[len(ours):]
    return key


def is_official_checkpoint(obj: Any) -> bool:
    """True for a dict written by the official ``save_ckpt`` (``model_state``, no ``model``)."""
    return isinstance(obj, Mapping) and isinstance(obj.get("model_state"), Mapping) and "model" not in obj


def _map_table(table: Mapping | None) -> dict:
    return {to_csseg_name(k): v for k, v in (table or {}).items()}


def state_from_official(ckpt: Mapping, cfg, source: str) -> dict:
    """A csseg step state from an official SDR checkpoint, checked against ``cfg``'s model.

    The step is the number of classifiers minus one; every tensor must map by name (after
    :data:`RENAMES`) onto a tensor of the same shape in the model ``cfg`` builds for that step.

    Args:
        ckpt: The loaded checkpoint (``{"model_state": ..., ...}``).
        cfg: The :class:`~csseg_core.config.ExperimentConfig` that will continue from it.
        source: The file, for error messages.

    Returns:
        ``{"step", "config", "model", "statistics", "history", "val_history", "source"}``.

    Raises:
        ConfigError: A key does not map, a shape differs, or the class split does not fit.
    """
    from csseg_core.models.deeplab import build_model
    from csseg_core.scenarios import get_scenario

    model_state = {to_csseg_name(k): v for k, v in ckpt["model_state"].items()}
    cls_ids = sorted({int(m.group(1)) for k in model_state if (m := re.match(r"cls\.(\d+)\.weight$", k))})
    if not cls_ids:
        raise ConfigError(f"official checkpoint {source} has no classifier 'cls.0.weight'; is it a model_state of LTTM/SDR?")
    step = len(cls_ids) - 1
    scenario = get_scenario(cfg.scenario)
    classes = scenario.classes_per_step[: step + 1]
    if step >= scenario.num_steps:
        raise ConfigError(f"official checkpoint {source} has {step + 1} classifiers; {scenario.name} has {scenario.num_steps} steps")
    with torch.device("meta"):
        own = build_model(cfg.backbone, classes, pretrained=None, **cfg.model_kwargs()).state_dict()
    for key, value in ckpt["model_state"].items():
        name = to_csseg_name(key)
        if name not in own:
            raise ConfigError(f"official checkpoint {source}: key {key!r} does not map to a csseg parameter "
                              f"(model {cfg.backbone}, {classes}); pass --profile paper or the checkpoint's backbone")
        if tuple(value.shape) != tuple(own[name].shape):
            raise ConfigError(f"official checkpoint {source}: {key!r} has shape {tuple(value.shape)}, csseg's {name!r} "
                              f"{tuple(own[name].shape)}; another backbone or class split (scenario {scenario.name})?")
    missing = [k for k in own if k not in model_state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"official checkpoint {source} lacks {len(missing)} keys of the csseg model "
                          f"(first: {to_official_name(missing[0])!r}); another backbone or head?")
    model = {k: v for k, v in model_state.items()}
    for k in own:  # the official BN never counts batches (its forward calls F.batch_norm itself)
        if k.endswith("num_batches_tracked") and k not in model:
            model[k] = torch.zeros((), dtype=torch.long)
    statistics: dict[str, Any] = {}
    if ckpt.get("prototypes") is not None and ckpt.get("count_features") is not None:
        statistics["prototypes"] = torch.as_tensor(ckpt["prototypes"]).float()
        statistics["prototype_counts"] = torch.as_tensor(ckpt["count_features"]).double()
    reg = (ckpt.get("trainer_state") or {}).get("regularizer") or {}
    if reg.get("name") == "ewc":
        statistics["fisher"] = _map_table(reg.get("fisher"))
    elif reg.get("name") == "pi":
        statistics["pi"] = _map_table(reg.get("score"))
    elif reg.get("name") == "rw":
        statistics["fisher"] = _map_table(reg.get("fisher"))
        statistics["rw"] = _map_table(reg.get("score"))
    return {"step": step, "config": cfg.to_dict(), "model": model, "statistics": statistics,
            "history": [], "val_history": [], "source": f"official:{source}"}
