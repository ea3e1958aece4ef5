"""The plan of one continual step, built once before training: what runs, what is collected,
which model is the teacher. Every step-0 / step>0 decision of a step is made here
(:func:`plan_step`); the training loop (:func:`csseg_core.engine.train_one_epoch`) only follows it.

Step 0 trains FT on the step-0 classes for every method, from the configured pretrained weights,
with ``epochs`` / ``iters`` / ``lr``. A step > 0 trains ``cfg.method`` from the previous state with
the ``*_incremental`` budget, the new classifier in its own parameter group (``lr_new_cls``), the
old network's gradient norm clipped (``grad_clip_incremental``) and BatchNorm frozen
(``fix_bn_incremental``); the frozen previous model is the teacher when the method asks for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import platform
import random
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist

from .collectors import build_collectors
from .config import ExperimentConfig
from .data import build_datasets, default_data_root
from .errors import ConfigError
from .methods import Method, StepContext, build_method, required_statistics
from .models import build_model, load_previous
from .models.sync_bn import sync_batchnorm
from .scenarios import Scenario, get_scenario


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the blocks a training step frees for the next iteration (once per
    process; True when it applies).

    By default glibc serves every block above its mmap threshold (128 KiB, raised only as such
    blocks are freed) with a fresh ``mmap`` and returns it to the OS on ``free``, so the activations
    and gradients allocated anew every iteration page-fault on first touch again and again (minor
    faults, each a VM exit on a virtual machine). With the threshold raised to 1 GiB (or glibc's
    ceiling) and the heap no longer trimmed, they are reused from the heap: minor faults of a smoke
    step fall 3.5-5x and its system time halves (BENCHMARKS.md, session 13). The process keeps its
    peak heap until it exits; numerics are untouched. The C library PyTorch's CPU tuning guide
    recommends (jemalloc, tcmalloc) does the same. ``CSSEG_MALLOC_TUNING=0`` leaves malloc as it is;
    a no-op on other C libraries."""
    if os.environ.get("CSSEG_MALLOC_TUNING", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False  # musl and macOS have no mallopt of these parameters
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mmap_ok = any(libc.mallopt(_M_MMAP_THRESHOLD, v) == 1 for v in (1 << 30, 32 << 20))
    return bool(mmap_ok and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    """This process's device: the current CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast(amp: str, device: torch.device):
    """The autocast context of ``amp`` ("off" | "bf16" | "fp16") on ``device`` (fp16 needs CUDA)."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs a CUDA device; use amp=bf16 on CPU (or amp=off)")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _sgd(groups, lr: float, momentum: float, device: torch.device) -> torch.optim.Optimizer:
    """Nesterov SGD, fused where the device has a fused kernel, else the multi-tensor (foreach) one."""
    try:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, foreach=True)


@dataclass(frozen=True)
class StepPlan:
    """One step, decided: the objects the training loop uses and the numbers it follows."""

    cfg: ExperimentConfig
    step: int
    scenario: Scenario
    classes: tuple[int, ...]
    """Classes per step, up to this one (background in the first)."""
    collect: tuple[str, ...]
    """Statistics this step collects (for the methods continuing from its state)."""
    method: Method
    """FT at step 0, ``cfg.method`` with its hyperparameters after."""
    datasets: Mapping[str, Any]
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    """The frozen previous model, when the method needs its outputs."""
    net: torch.nn.Module
    """``model``, or its DistributedDataParallel wrapper under a process group."""
    ctx: StepContext
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    clipped: tuple[torch.nn.Parameter, ...]
    """Parameters whose global gradient norm is clipped to ``clip_norm`` (none at step 0)."""
    clip_norm: float
    epochs: int
    iters: int
    """Iteration budget; when > 0 it replaces ``epochs``."""
    base_lr: float
    fix_bn: bool
    device: torch.device
    layout: torch.memory_format

    @property
    def num_classes(self) -> int:
        return sum(self.classes)

    def schedule(self, batches_per_epoch: int) -> tuple[int, int]:
        """(epochs, total iterations): an iteration budget runs as many (partial) epochs as it takes."""
        epochs = math.ceil(self.iters / max(1, batches_per_epoch)) if self.iters > 0 else self.epochs
        return epochs, max(1, self.iters if self.iters > 0 else epochs * batches_per_epoch)

    def build_collectors(self) -> dict:
        """The live statistics of this step (build them after the loader's workers are forked)."""
        cfg, prev = self.cfg, self.ctx.prev_statistics
        return build_collectors(self.collect, model=self.model, step=self.step, mode=cfg.mode,
                                num_classes=self.num_classes, dim=self.model.body_channels, prev=prev,
                                device=self.device, alpha=self.method.statistics_alpha(),
                                gather=cfg.sdr_feature_gather, sync_prototypes=cfg.sync_prototypes)


def _check_previous(step: int, prev_state: dict | None) -> None:
    if step == 0:
        return
    if prev_state is None:
        raise ConfigError(f"step {step} needs the state of step {step - 1}: run the earlier steps or pass --step-ckpt FILE")
    if int(prev_state["step"]) != step - 1:
        raise ConfigError(f"step {step} needs the state of step {step - 1}, got the state of step {prev_state['step']}")


def _param_groups(model, cfg: ExperimentConfig, incremental: bool) -> list[dict]:
    """The model's groups; at steps > 0 the new classifier gets its own group and multiplier."""
    groups = model.param_groups(cfg.weight_decay)
    if not incremental or cfg.lr_new_cls == 1.0:
        return groups
    new_cls = {id(p) for p in model.cls[-1].parameters()}
    for g in groups:
        if g["name"] == "cls":
            g["params"] = [p for p in g["params"] if id(p) not in new_cls]
    groups = [g for g in groups if g["params"]]
    groups.append({"name": "new_cls", "params": [p for p in model.cls[-1].parameters() if p.requires_grad],
                   "weight_decay": cfg.weight_decay, "lr_mult": cfg.lr_new_cls})
    return groups


def _clipped(model, cfg: ExperimentConfig, incremental: bool) -> tuple[torch.nn.Parameter, ...]:
    """The old network's parameters (the new classifier's gradients are left as they are)."""
    if not incremental or cfg.grad_clip_incremental <= 0:
        return ()
    new_cls = {id(p) for p in model.cls[-1].parameters()}
    return tuple(p for p in model.parameters() if p.requires_grad and id(p) not in new_cls)


def _teacher(cfg: ExperimentConfig, classes, state_dict, device) -> torch.nn.Module:
    teacher = build_model(cfg.backbone, classes, pretrained=None, **cfg.model_kwargs())
    teacher.load_state_dict(state_dict, strict=True)
    return teacher.to(device).eval().requires_grad_(False)


def plan_step(cfg: ExperimentConfig, step: int, prev_state: dict | None = None, collect: Iterable[str] = ()) -> StepPlan:
    """Check the step, seed every generator and build what it runs (in that order: the random
    draws of the model's initialisation follow the seed)."""
    scenario = get_scenario(cfg.scenario)
    if not 0 <= step < scenario.num_steps:
        raise ConfigError(f"step {step} is out of range: {scenario.name} has steps 0..{scenario.num_steps - 1}")
    _check_previous(step, prev_state)
    incremental = step > 0
    collect = required_statistics([cfg.method], collect)
    rank, world = dist_info()
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over {world} DDP workers (it is the global "
                          f"batch); pass --set batch_size=<a multiple of {world}> or another number of workers")
    device = default_device()
    autocast(cfg.amp, device)  # fails early for fp16 without CUDA
    seed_everything(cfg.seed + 1000 * step + rank)

    method = build_method(cfg.method, dict(cfg.params)) if incremental else build_method("ft")
    splits = ("train", "val", "test") if cfg.val_fraction > 0 else ("train", "test")
    datasets = build_datasets(scenario.dataset, cfg.data_root or str(default_data_root(scenario.dataset)), scenario,
                              cfg.mode, step, crop_size=cfg.crop_size, crop_val=cfg.crop_val, index_dir=cfg.index_dir,
                              cache_images=cfg.cache_images, splits=splits, val_fraction=cfg.val_fraction)
    classes = tuple(scenario.classes_per_step[: step + 1])
    model = build_model(cfg.backbone, classes, pretrained=None if incremental else cfg.pretrained, **cfg.model_kwargs())
    teacher, old_params, prev_stats = None, {}, {}
    if incremental:
        load_previous(model, prev_state["model"])
        prev_stats = prev_state.get("statistics", {})
        old_params = {n: prev_state["model"][n].to(device) for n, _ in model.named_parameters() if n in prev_state["model"]}
        if method.needs_old_model(step):
            teacher = _teacher(cfg, classes[:-1], prev_state["model"], device)
    model.to(device)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for m in (model, teacher):
        if m is not None:
            m.to(memory_format=layout)
    if world > 1 and cfg.sync_bn:
        model = sync_batchnorm(model, device)
    fix_bn = cfg.fix_bn or (incremental and cfg.fix_bn_incremental)
    if fix_bn:
        model.fix_bn()
    ctx = StepContext(step=step, mode=cfg.mode, n_old=sum(classes[:-1]), num_classes=sum(classes), model=model,
                      old_model=teacher, prev_statistics=prev_stats, old_params=old_params,
                      feature_gather=cfg.sdr_feature_gather, attraction_reduce=cfg.attraction_reduce)
    try:
        method.setup(ctx)
    except KeyError as err:
        raise ConfigError(f"method {cfg.method!r} cannot start step {step}: {err.args[0]}") from None

    base_lr = cfg.lr_incremental if incremental else cfg.lr
    optimizer = _sgd(_param_groups(model, cfg, incremental), base_lr, cfg.momentum, device)
    clipped = _clipped(model, cfg, incremental)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return StepPlan(cfg=cfg, step=step, scenario=scenario, classes=classes, collect=collect, method=method,
                    datasets=datasets, model=model, teacher=teacher, net=net, ctx=ctx, optimizer=optimizer,
                    scaler=scaler, clipped=clipped, clip_norm=cfg.grad_clip_incremental,
                    epochs=cfg.epochs_incremental if incremental else cfg.epochs,
                    iters=cfg.iters_incremental if incremental else cfg.iters,
                    base_lr=base_lr, fix_bn=fix_bn, device=device, layout=layout)
