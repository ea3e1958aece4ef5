"""Experiment configuration: one frozen dataclass, profiles, overrides and content hashes.

Precedence (lowest first): profile defaults < ``--config FILE`` < ``--set key=value``.
Method hyperparameters and engine fields share one key space (``--set kd=10 epochs=2``).

``ExperimentConfig.step_key(step)`` names the state after ``step`` by a hash of everything
that determines it. Step 0 is FT for every method, so its key ignores the method and its
hyperparameters, and depends on the scenario only through its step-0 classes and the set of
all classes (``voc-15-5`` and ``voc-15-1`` share their step 0).

Example:
    >>> cfg = resolve_config("voc-15-1", "sdr", profile="smoke", overrides={"kd": 10})
    >>> cfg.method_params["kd"], cfg.num_steps
    (10.0, 6)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, first_line
from .losses import ATTRACTION_REDUCES, FEATURE_GATHERS
from .methods import build_method, canonical_method, method_defaults
from .scenarios import check_mode, get_scenario


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines a continual run. Build it with :func:`resolve_config`."""

    scenario: str = "voc-15-1"
    mode: str = "disjoint"
    method: str = "ft"
    params: tuple[tuple[str, Any], ...] = ()
    """Method hyperparameter overrides, sorted (key, value) pairs; see ``method_params``."""
    profile: str = "smoke"
    seed: int = 42
    data_root: str | None = None
    index_dir: str | None = None
    backbone: str = "tiny"
    output_stride: int = 8
    pretrained: str = "none"
    """"imagenet", "none" or the path of a backbone state dict."""
    head_channels: int = 128
    bn_momentum: float = 0.0
    """Momentum of the backbone's BatchNorms; 0 keeps the backbone's own (torchvision
    ResNets 0.1, MobileNetV3 0.01). Reference ``net/resnet_atrous.py``: 0.0003 (``paper``)."""
    backbone_dilation: str = "torchvision"
    """"torchvision" (``replace_stride_with_dilation``: layer4's first block keeps dilation 1
    at OS 16) or "reference" (``resnet_atrous``: every layer4 block dilated). The reference
    has ResNet-50/101 only; other backbones keep their own dilation under "reference"."""
    head_act: str = "relu"
    """Activation after the ASPP head's BatchNorms: "relu" or "none" (the reference's
    ``make_model_v2`` head with plain ``nn.BatchNorm2d``; ``paper``)."""
    pool_window: int = 0
    """Eval-time window of the head's image-pool branch; 0 = global mean, 32 = the reference's
    ``--pooling 32`` (``paper``; equal to the global mean up to 32×32 feature maps)."""
    sdr_feature_gather: str = "pixel"
    """How the prototype update, SDR's L_pm, L_cl^a and the class means of L_cl^r gather a class's
    features: "pixel" (every vector is one pixel's features) or "reference" (the official code's
    boolean mask over channels read channel-major and reshaped: D×N, and N×D for L_pm; mixes the
    channels of different images at batch > 1). ``docs/DEPARTURES.md`` §1–2. Also applies to the
    prototypes collected at step 0, so it enters step 0's key."""
    attraction_reduce: str = "mean"
    """How SDR's L_cl^a combines its per-class terms: "mean" (1/K Σ) or "reference" (the official
    code divides its running sum by K inside the class loop: Σ_k term_k / K^(K−k+1)). §3."""
    sync_prototypes: bool = True
    """All-reduce the prototype statistics across DDP ranks every iteration (true) or keep one
    running mean per rank and save rank 0's, as the official code (false). A no-op on one process
    (``--workers 1``, the default). §4."""
    sync_bn: bool = True
    """Synchronise the BatchNorm statistics across DDP ranks (true: N workers train like one on the
    global batch, as the reference's multi-GPU ``InPlaceABNSync``) or keep one set per rank (false).
    A no-op on one process. ``csseg_core/models/sync_bn.py``."""
    crop_size: int = 64
    crop_val: bool = True
    val_fraction: float = 0.15
    """Fraction of the train list held out as the validation split (never trained on; sweeps
    select on it). Depends on the dataset and this fraction only. 0 = none (test only)."""
    batch_size: int = 16
    epochs: int = 12
    """Epochs of step 0."""
    epochs_incremental: int = 20
    """Epochs of every step > 0."""
    iters: int = 500
    """Iterations of step 0; when > 0 it replaces ``epochs`` (robust to the dataset's size)."""
    iters_incremental: int = 100
    """Iterations of every step > 0; when > 0 it replaces ``epochs_incremental``."""
    lr: float = 0.05
    """Learning rate of step 0."""
    lr_incremental: float = 0.0005
    """Learning rate of steps > 0."""
    lr_new_cls: float = 100.0
    """Learning-rate multiplier of the new step's classifier at steps > 0."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_power: float = 0.9
    fix_bn: bool = False
    fix_bn_incremental: bool = True
    """Freeze BatchNorm (statistics and affine) at steps > 0 only. On in ``smoke``: a step's
    few images otherwise drag the running statistics away from the old classes'
    (docs/CALIBRATION.md); off in ``paper`` and ``small`` (the reference's ``--fix_bn`` False)."""
    grad_clip_incremental: float = 3.0
    """Clip the global gradient norm of the old network's parameters (all but the new classifier) to
    this value at steps > 0; 0 = off. On in ``smoke`` (3): a large distillation weight (SDR's KD 100)
    otherwise makes the first iterations' updates overshoot and the old classes collapse on some
    datasets (docs/CALIBRATION.md h); off in ``paper`` and ``small`` (the reference does not clip)."""
    num_workers: int = 0
    cache_images: bool = True
    """Keep decoded images in memory (small datasets only)."""
    log_every: int = 10
    """Iterations between TensorBoard loss points."""
    num_samples: int = 3
    """image | truth | prediction samples written to TensorBoard per step."""
    amp: str = "off"
    """Mixed precision of the forward passes: "off" (float32, ``paper``), "bf16" (autocast to
    bfloat16; CPU or GPU) or "fp16" (autocast to float16 with a gradient scaler; GPU only). Losses,
    statistics and the optimizer stay in float32."""
    channels_last: bool = True
    """Keep the model's weights and activations in the channels-last (NHWC) memory layout. The
    same computation (results differ at rounding level only, so it is not part of a step's key).
    On this 2-core CPU (bench/layout.py): ``tiny`` 1.14–1.24× faster (a whole smoke SDR run
    221 → 185 s), MobileNetV3 1.15–1.23×, ResNet-50/101 1.04–1.15×, ResNet-18 0.89–1.01×. On in
    ``smoke``; off in ``paper`` and ``small`` (the reference's layout)."""

    # ------------------------------------------------------------------ derived
    @property
    def dataset(self) -> str:
        return get_scenario(self.scenario).dataset

    @property
    def num_steps(self) -> int:
        return get_scenario(self.scenario).num_steps

    @property
    def method_params(self) -> dict[str, Any]:
        """Every hyperparameter of the method, defaults filled in."""
        return dataclasses.asdict(build_method(self.method, dict(self.params)).params)

    def to_dict(self) -> dict[str, Any]:
        """Flat, YAML/JSON-friendly dict; ``params`` becomes a mapping of every hyperparameter."""
        d = dataclasses.asdict(self)
        d["params"] = self.method_params
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExperimentConfig":
        d = dict(d)
        params = d.pop("params", {}) or {}
        return resolve_config(d.pop("scenario"), d.pop("method", "ft"), profile=d.pop("profile", "smoke"), overrides={**d, **params})

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return dataclasses.replace(self, **changes)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`csseg_core.models.build_model` other than the
        backbone, the classes and the pretrained weights."""
        return {"output_stride": self.output_stride, "head_channels": self.head_channels,
                "bn_momentum": self.bn_momentum or None, "backbone_dilation": self.backbone_dilation,
                "head_act": self.head_act, "pool_window": self.pool_window}

    def step_key(self, step: int) -> str:
        """Content hash (16 hex chars) of the state after ``step``."""
        d = self.to_dict()
        for k, default in _HASHED_IF_SET.items():  # fields added later: old keys stay valid
            if d[k] == default:
                d.pop(k)
        scenario = get_scenario(self.scenario)
        for k in ("scenario", "data_root", "num_workers", "cache_images", "log_every", "num_samples", "profile",
                  "channels_last"):  # how, not what, is computed
            d.pop(k)
        d["data"] = self.data_root or "synthetic"
        if step == 0:
            for k in ("method", "params", "epochs_incremental", "lr_incremental", "iters_incremental",
                      "lr_new_cls", "fix_bn_incremental"):
                d.pop(k)
            for k in ("attraction_reduce", "grad_clip_incremental"):  # of steps > 0 (popped above when default)
                d.pop(k, None)
            d["classes"] = [list(scenario.steps[0]), sorted(scenario.order)]
        else:
            d["classes"] = [list(s) for s in scenario.steps[: step + 1]]
            d["step"] = step
            d.update(_RETIRED)  # keeps the keys of the states computed before these fields were removed
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def run_name(self) -> str:
        """Deterministic run name: ``<scenario>-<mode>-<method>-<hash>``."""
        return f"{self.scenario}-{self.mode}-{self.method}-{self.step_key(self.num_steps - 1)[:8]}"


_RETIRED = {"fault_nan_step": -1}
"""Removed fields and the only value they ever had outside tests: the keys of steps > 0 still hash
them, and a config file that names them with that value (every config.yaml written before) is read."""
_FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig) if f.name not in ("scenario", "method", "params")}
_HASHED_IF_SET = {k: _FIELDS[k].default for k in ("bn_momentum", "backbone_dilation", "head_act", "pool_window",
                                                   "sdr_feature_gather", "attraction_reduce", "sync_prototypes", "amp",
                                                   "sync_bn")}
_HASHED_IF_SET["grad_clip_incremental"] = 0.0  # added later with a non-zero smoke default: only "off" keeps old keys
# The reference network (SDR ``make_model_v2``: ``net/resnet_atrous.py`` + ``modules/deeplab.py``).
REFERENCE_MODEL = dict(bn_momentum=0.0003, backbone_dilation="reference", head_act="none", pool_window=32)

PROFILES: dict[str, dict[str, Any]] = {
    # The paper recipe (SDR code, author's issue #1): ResNet-101, crop 512, VOC batch 8 /
    # 30 epochs / lr 1e-3 then 1e-4; ADE batch 4 / 60 epochs / lr 1e-2 then 1e-3.
    "paper": dict(backbone="resnet101", output_stride=16, pretrained="imagenet", head_channels=256, crop_size=512, batch_size=8,
                  epochs=30, epochs_incremental=30, lr=1e-3, lr_incremental=1e-4, num_workers=4, cache_images=False,
                  log_every=10, num_samples=4, iters=0, iters_incremental=0, lr_new_cls=1.0, amp="off",
                  channels_last=False, fix_bn_incremental=False, grad_clip_incremental=0.0, **REFERENCE_MODEL),
    # Quick GPU sweeps: a small backbone at crop 256.
    "small": dict(backbone="resnet18", output_stride=16, pretrained="imagenet", head_channels=256, crop_size=256, batch_size=16,
                  epochs=10, epochs_incremental=10, lr=1e-2, lr_incremental=1e-3, num_workers=4, cache_images=False,
                  iters=0, iters_incremental=0, lr_new_cls=1.0, fix_bn_incremental=False,
                  grad_clip_incremental=0.0, channels_last=False),
    # CPU smoke runs on the synthetic data (the dataclass defaults: tiny backbone, OS 8, 128-channel
    # head, crop 64, batch 16, 500 iterations at lr 0.05 for step 0, 100 iterations at lr 5e-4 for
    # every later step with a 100x learning rate (0.05) on the new classifier and BatchNorm frozen at
    # steps > 0, the old network's gradient norm clipped to 3 there); see docs/CALIBRATION.md.
    "smoke": dict(),
}
ADE_PAPER = dict(batch_size=4, epochs=60, epochs_incremental=60, lr=1e-2, lr_incremental=1e-3)
#: ``smoke``'s budgets per dataset (ADE's 100 step-0 classes need 4x VOC's; the reference trains ADE
#: 60 epochs, VOC 30) and for a joint (one-step) run: the updates of the whole smoke run it bounds
#: (voc-15-1 500 + 5 x 100, ade-100-50 2000 + 200; docs/CALIBRATION.md sections j, k).
SMOKE_DATASET = {"ade": dict(iters=2000, iters_incremental=200)}
SMOKE_OFFLINE = {"voc": dict(iters=1000), "ade": dict(iters=2200)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` (often a string from the command line) to the type of ``default``."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
    elif isinstance(default, int) and not isinstance(value, bool):
        try:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(str(value))
        except ValueError:
            pass
    elif isinstance(default, float) and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(default, str) or default is None:
        if value is None or (default is None and str(value).strip().lower() in ("", "none", "null")):
            return None
        return str(value)
    else:
        return value
    raise ConfigError(f"{key}={value!r} is not a valid {type(default).__name__}; e.g. --set {key}={default!r}")


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["kd=10", "epochs=2"]`` -> ``{"kd": "10", "epochs": "2"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not key=value; e.g. --set kd=10")
        out[key.strip()] = value.strip()
    return out


def resolve_config(scenario: str, method: str = "ft", *, profile: str = "smoke", mode: str | None = None,
                   seed: int | None = None, data_root: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Build a validated config: profile defaults, then ``overrides`` (file, then ``--set``).

    Explicit ``mode`` / ``seed`` / ``data_root`` arguments win over ``overrides``.
    """
    scen = get_scenario(scenario)
    method = canonical_method(method)
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    values: dict[str, Any] = {**PROFILES[profile]}
    if profile == "paper" and scen.dataset == "ade":
        values.update(ADE_PAPER)
    if profile == "smoke":
        values.update(SMOKE_DATASET.get(scen.dataset, {}))
        if scen.num_steps == 1:
            values.update(SMOKE_OFFLINE.get(scen.dataset, {}))
    defaults = method_defaults(method)
    params: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if key == "amp" and value is False:  # YAML reads an unquoted `amp: off` as false
            value = "off"
        if key in _FIELDS:
            values[key] = _coerce(key, value, _FIELDS[key].default)
        elif key in defaults:
            params[key] = _coerce(key, value, defaults[key])
        elif key in ("scenario", "method") or (key in _RETIRED and _coerce(key, value, _RETIRED[key]) == _RETIRED[key]):
            continue
        else:
            known = sorted(set(_FIELDS) | set(defaults))
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown key {key!r} for method {method!r}{hint}; `csseg methods` lists hyperparameters")
    for ep, its in (("epochs", "iters"), ("epochs_incremental", "iters_incremental")):
        if ep in (overrides or {}) and its not in (overrides or {}):
            values[its] = 0  # an explicit epoch count wins over the profile's iteration budget
    for key, value in (("mode", mode), ("seed", seed), ("data_root", data_root)):
        if value is not None:
            values[key] = value
    values["mode"] = check_mode(values.get("mode", "disjoint"))
    build_method(method, params)  # validates the hyperparameters
    params = {k: v for k, v in params.items() if v != defaults[k]}  # canonical: only what differs
    cfg = ExperimentConfig(scenario=scen.name, method=method, params=tuple(sorted(params.items())), profile=profile, **values)
    _validate(cfg)
    return cfg


AMP_MODES = ("off", "bf16", "fp16")


def _validate(cfg: ExperimentConfig) -> None:
    positive = ("crop_size", "batch_size", "epochs", "head_channels")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0 (got {getattr(cfg, key)})")
    if cfg.epochs_incremental < 0 or cfg.lr <= 0 or cfg.lr_incremental <= 0 or cfg.lr_new_cls <= 0:
        raise ConfigError("epochs_incremental must be >= 0 and learning rates > 0")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1) (got {cfg.val_fraction}); e.g. --set val_fraction=0.15")
    if cfg.iters < 0 or cfg.iters_incremental < 0:
        raise ConfigError("iters and iters_incremental must be >= 0 (0 = use epochs)")
    if cfg.output_stride not in (8, 16):
        raise ConfigError(f"output_stride must be 8 or 16 (got {cfg.output_stride})")
    if not 0.0 <= cfg.bn_momentum <= 1.0:
        raise ConfigError(f"bn_momentum must be in [0, 1] (got {cfg.bn_momentum}; 0 = the backbone's own); e.g. --set bn_momentum=0.0003")
    choices = {"backbone_dilation": ("torchvision", "reference"), "head_act": ("relu", "none"), "amp": AMP_MODES,
               "sdr_feature_gather": FEATURE_GATHERS, "attraction_reduce": ATTRACTION_REDUCES}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)} (got {getattr(cfg, key)!r}); e.g. --set {key}={allowed[0]}")
    if cfg.pool_window < 0:
        raise ConfigError(f"pool_window must be >= 0 (got {cfg.pool_window}; 0 = global mean); e.g. --set pool_window=32")
    if not cfg.grad_clip_incremental >= 0:  # also refuses NaN
        raise ConfigError(f"grad_clip_incremental must be >= 0 (got {cfg.grad_clip_incremental}; 0 = off); "
                          "e.g. --set grad_clip_incremental=3")


# ---------------------------------------------------------------------------- config files
def read_config_file(path: str | os.PathLike, *, what: str = "config file", hint: str = "") -> dict:
    """A YAML mapping read with ``yaml.safe_load`` (a file never executes code).

    The file is a run's ``config.yaml`` or what ``csseg export-best`` wrote: one entry, or
    ``{"cells": [entry, ...]}`` for several grid cells (see :func:`config_entries`).

    Args:
        path: the YAML file.
        what: how error messages name the file.
        hint: appended to the "does not exist" / "not valid YAML" messages.

    Raises:
        ConfigError: missing file, invalid YAML, or not a mapping.
    """
    import yaml

    tail = f"; {hint}" if hint else ""
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path} does not exist{tail}")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML ({first_line(err)}){tail}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys")
    return data


def config_entries(doc: Mapping[str, Any], path: str | os.PathLike = "the config file") -> list[dict]:
    """The entries of a file read by :func:`read_config_file`: its ``cells``, or the file itself."""
    entries = doc["cells"] if "cells" in doc else [doc]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{path}: 'cells' must be a list of mappings (one per grid cell)")
    return entries


def select_entries(entries: list[dict], scenario: str | None = None, mode: str | None = None) -> list[dict]:
    """The entries of ``scenario`` (by any alias: ``voc-15-5s`` is ``voc-15-1``) and ``mode``
    (an entry without a mode is ``disjoint``); ``None`` keeps every scenario / mode."""
    want = get_scenario(scenario).name if scenario else None
    return [e for e in entries
            if (want is None or (e.get("scenario") is not None and get_scenario(e["scenario"]).name == want))
            and (mode is None or e.get("mode", "disjoint") == mode)]
