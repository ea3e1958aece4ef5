"""One continual step: ``run_step(config, step, previous_state) -> (state, metrics)``.

Usage from Python (``csseg train`` wraps ``run_scenario``)::

    from csseg_core.config import resolve_config
    from csseg_core.engine import run_step
    cfg = resolve_config("voc-15-1", "sdr", profile="smoke")
    state, metrics = run_step(cfg, 0)          # FT on the step-0 classes, collects SDR's prototypes
    state, metrics = run_step(cfg, 1, state)   # SDR from there
    # a step 0 that every method can continue from:
    state, metrics = run_step(cfg, 0, collect=STATISTICS)

The step is DDP-aware: when a ``torch.distributed`` process group exists (``torchrun`` or a Ray
Train worker) data are sharded, gradients averaged, the confusion matrix and the prototypes
all-reduced (the prototypes unless ``sync_prototypes`` is false). It starts no process itself
and never imports Ray.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from . import losses as L
from .config import ExperimentConfig
from .data import build_datasets, default_data_root
from .errors import ConfigError, TrainingError
from .methods import Batch, Output, StepContext, build_method, required_statistics
from .metrics import METRICS, STEP_KINDS, ConfusionMatrix, step_metrics
from .models import build_model, load_previous
from .scenarios import get_scenario
from .statistics import build_collectors
from .tensorboard import StepLogger


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shard of one rank: ``indices[rank::world]``, no padding, so the all-reduced
    confusion matrix counts every image exactly once (DistributedSampler pads with duplicates)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _loader(dataset, cfg: ExperimentConfig, *, train: bool, seed: int) -> DataLoader:
    """The training loader keeps its worker processes for every epoch (``persistent_workers``):
    they are forked once, before the statistics buffers exist (see :func:`run_step`), so the
    parent's writes to those buffers never copy-on-write fault against a freshly forked worker."""
    rank, world = dist_info()
    generator = torch.Generator().manual_seed(seed)
    if world > 1 and not train:
        sampler = ShardSampler(len(dataset), rank, world)
    elif world > 1:
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    batch = cfg.batch_size if (train or cfg.crop_val) else 1
    if train and world > 1:
        batch = max(1, cfg.batch_size // world)  # the configured batch is the global one
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=train and len(dataset) >= batch * world,
                      num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(), generator=generator,
                      persistent_workers=train and cfg.num_workers > 0)


def autocast(amp: str, device: torch.device):
    """The autocast context of ``amp`` ("off" | "bf16" | "fp16") on ``device`` (fp16 needs CUDA)."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs a CUDA device; use amp=bf16 on CPU (or amp=off)")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _float(out: Output) -> Output:
    """Model outputs in float32 (the losses and statistics are computed in float32 under amp)."""
    return Output(out.logits.float(), out.body.float(), out.pre_logits.float())


def _sgd(groups, lr: float, momentum: float, device: torch.device) -> torch.optim.Optimizer:
    """Nesterov SGD, fused where the device has a fused kernel, else the multi-tensor (foreach) one."""
    try:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, foreach=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             amp: str = "off") -> ConfusionMatrix:
    """Confusion matrix of ``model`` on ``loader`` (argmax over all channels), all-reduced.
    (``max(1).indices``, the first maximum as ``argmax``: 4× faster than ``argmax(1)`` on NCHW on a CPU.)"""
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    if amp == "fp16" and device.type != "cuda":
        amp = "off"  # a state trained with fp16 on a GPU, evaluated on a CPU
    for image, target in loader:
        with autocast(amp, device):
            logits, _ = model(image.to(device, non_blocking=True))
        cm.update(logits.max(1).indices, target.to(device, non_blocking=True))
    cm.all_reduce()
    return cm


def _check_previous(cfg: ExperimentConfig, step: int, prev_state: dict | None) -> None:
    if step == 0:
        return
    if prev_state is None:
        raise ConfigError(f"step {step} needs the state of step {step - 1}: run the earlier steps or pass --step-ckpt FILE")
    if int(prev_state["step"]) != step - 1:
        raise ConfigError(f"step {step} needs the state of step {step - 1}, got the state of step {prev_state['step']}")


def run_step(cfg: ExperimentConfig, step: int, prev_state: dict | None = None, *, collect: Iterable[str] = (),
             log_dir: str | None = None, progress: bool = False) -> tuple[dict, dict]:
    """Train and evaluate one continual step.

    Args:
        cfg: the experiment configuration.
        step: the step to run (0 = base step, trained with FT for every method).
        prev_state: the state returned for ``step - 1`` (required when ``step > 0``).
        collect: statistics to collect in addition to those ``cfg.method`` needs from this
            step's state (``Method.collects``); e.g. :data:`csseg_core.methods.STATISTICS` for a
            step 0 that every method continues from. Collecting never changes the training.
        log_dir: TensorBoard directory (written by rank 0); None disables logging.
        progress: show a progress bar (rank 0).

    Returns:
        ``(state, metrics)``; see docs/ARCHITECTURE.md for their keys. ``state["collected"]``
        lists the statistics the state holds.

    Raises:
        TrainingError: a loss term became NaN or infinite (nothing is written).
    """
    scenario = get_scenario(cfg.scenario)
    if not 0 <= step < scenario.num_steps:
        raise ConfigError(f"step {step} is out of range: {scenario.name} has steps 0..{scenario.num_steps - 1}")
    _check_previous(cfg, step, prev_state)
    collect = required_statistics([cfg.method], collect)
    rank, world = dist_info()
    device = _device()
    amp_context = autocast(cfg.amp, device)  # fails early for fp16 without CUDA
    seed_everything(cfg.seed + 1000 * step + rank)
    started = time.perf_counter()

    method = build_method("ft" if step == 0 else cfg.method, {} if step == 0 else dict(cfg.params))
    root = cfg.data_root or str(default_data_root(scenario.dataset))
    splits = ("train", "val", "test") if cfg.val_fraction > 0 else ("train", "test")
    datasets = build_datasets(scenario.dataset, root, scenario, cfg.mode, step, crop_size=cfg.crop_size,
                              crop_val=cfg.crop_val, index_dir=cfg.index_dir, cache_images=cfg.cache_images,
                              splits=splits, val_fraction=cfg.val_fraction)

    classes = scenario.classes_per_step[: step + 1]
    model = build_model(cfg.backbone, classes, pretrained=cfg.pretrained if step == 0 else None, **cfg.model_kwargs())
    old_model, old_params, prev_stats = None, {}, {}
    if step > 0:
        load_previous(model, prev_state["model"])
        prev_stats = prev_state.get("statistics", {})
        old_params = {n: prev_state["model"][n].to(device) for n, _ in model.named_parameters() if n in prev_state["model"]}
        if method.needs_old_model(step):
            old_model = build_model(cfg.backbone, classes[:-1], pretrained=None, **cfg.model_kwargs())
            old_model.load_state_dict(prev_state["model"], strict=True)
            old_model.to(device).eval().requires_grad_(False)
    model.to(device)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for m in (model, old_model):
        if m is not None:
            m.to(memory_format=layout)
    fix_bn = cfg.fix_bn or (step > 0 and cfg.fix_bn_incremental)
    if fix_bn:
        model.fix_bn()
    n_old = sum(classes[:-1]) if step > 0 else 0
    ctx = StepContext(step=step, mode=cfg.mode, n_old=n_old, num_classes=sum(classes), model=model, old_model=old_model,
                      prev_statistics=prev_stats, old_params=old_params, feature_gather=cfg.sdr_feature_gather,
                      attraction_reduce=cfg.attraction_reduce)
    try:
        method.setup(ctx)
    except KeyError as err:
        raise ConfigError(f"method {cfg.method!r} cannot start step {step}: {err.args[0]}") from None

    epochs = cfg.epochs if step == 0 else cfg.epochs_incremental
    iters = cfg.iters if step == 0 else cfg.iters_incremental
    base_lr = cfg.lr if step == 0 else cfg.lr_incremental
    groups = model.param_groups(cfg.weight_decay)
    if step > 0 and cfg.lr_new_cls != 1.0:  # the new classifier gets its own group and multiplier
        new_cls = {id(p) for p in model.cls[-1].parameters()}
        for g in groups:
            if g["name"] == "cls":
                g["params"] = [p for p in g["params"] if id(p) not in new_cls]
        groups = [g for g in groups if g["params"]]
        groups.append({"name": "new_cls", "params": [p for p in model.cls[-1].parameters() if p.requires_grad],
                       "weight_decay": cfg.weight_decay, "lr_mult": cfg.lr_new_cls})
    optimizer = _sgd(groups, base_lr, cfg.momentum, device)
    clipped = []
    if step > 0 and cfg.grad_clip_incremental > 0:
        new_cls = {id(p) for p in model.cls[-1].parameters()}
        clipped = [p for p in model.parameters() if p.requires_grad and id(p) not in new_cls]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_loader = _loader(datasets["train"], cfg, train=True, seed=cfg.seed + step)
    # fork the loader's workers (kept for every epoch) before the statistics allocate their buffers
    first_epoch = iter(train_loader) if cfg.num_workers > 0 else None
    ctx.collectors = build_collectors(collect, model=model, step=step, mode=cfg.mode, num_classes=sum(classes),
                                      dim=model.body_channels, prev=prev_stats, device=device,
                                      alpha=0.9 if step == 0 else cfg.method_params.get("reg_alpha", 0.9),
                                      gather=cfg.sdr_feature_gather, sync_prototypes=cfg.sync_prototypes)
    if iters > 0:  # an iteration budget: as many (partial) epochs as it takes
        epochs = math.ceil(iters / max(1, len(train_loader)))
    total_iters = max(1, iters if iters > 0 else epochs * len(train_loader))
    logger = StepLogger(log_dir if rank == 0 else None, step, scenario, progress=progress and rank == 0,
                        total=total_iters, log_every=cfg.log_every)
    sums: dict[str, float] = {}
    it, n_images, train_time = 0, 0, 0.0
    try:
        for epoch in range(epochs):
            if isinstance(train_loader.sampler, DistributedSampler):
                train_loader.sampler.set_epoch(epoch)
            net.train()
            if fix_bn:
                model.fix_bn()
            t0 = time.perf_counter()
            batches = train_loader if first_epoch is None else first_epoch
            first_epoch = None
            for image, target in batches:
                if it >= total_iters:
                    break
                lr = base_lr * (1 - it / total_iters) ** cfg.lr_power
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_mult", 1.0)
                image = image.to(device, non_blocking=True, memory_format=layout)
                target = target.to(device, non_blocking=True)
                with amp_context:
                    logits, feats = net(image)
                out = Output(logits, feats["body"], feats["pre_logits"])
                if cfg.amp != "off":
                    out = _float(out)
                batch = Batch(image, target, L.downsample_labels(target, out.body.shape[-2:]))
                for c in ctx.collectors.values():
                    c.observe(out.body, batch.target_small)
                old = None
                if old_model is not None:
                    with torch.no_grad(), amp_context:
                        o_logits, o_feats = old_model(image)
                    old = Output(o_logits, o_feats["body"], o_feats["pre_logits"])
                    if cfg.amp != "off":
                        old = _float(old)
                terms = method.terms(ctx, batch, out, old)  # float32, outside autocast
                if cfg.fault_nan_step == step:
                    first = next(iter(terms))
                    terms[first] = terms[first] * float("nan")
                loss = sum(terms.values())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                grads_finite = True
                if scaler.is_enabled():  # the statistics and the penalty see unscaled gradients
                    scaler.unscale_(optimizer)
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    grads_finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()) if grads else True
                if grads_finite:  # an fp16 overflow step is skipped by the scaler: collect nothing from it
                    for c in ctx.collectors.values():
                        c.after_backward(model)
                penalty = method.penalty(ctx)
                if penalty is not None:
                    terms["reg"] = penalty
                    penalty.backward()
                names = list(terms)  # one device sync per iteration for every term
                values = dict(zip(names, torch.stack([terms[k].detach().float() for k in names]).tolist()))
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    raise TrainingError(
                        f"step {step}, iteration {it}: loss term {bad[0]!r} became {values[bad[0]]}; lower its weight "
                        f"or the learning rate (lr={lr:.3g}); nothing of this step was saved")
                if clipped:  # the old network's parameters (the new classifier's gradients are left as they are)
                    torch.nn.utils.clip_grad_norm_(clipped, cfg.grad_clip_incremental, foreach=True)
                scaler.step(optimizer)
                scaler.update()
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_images += image.shape[0] * world
                it += 1
                logger.iteration(it, values, lr)
            train_time += time.perf_counter() - t0
    finally:
        logger.close_progress()
        first_epoch = train_loader = None  # shuts the persistent loader workers down

    statistics: dict[str, Any] = {}
    for c in ctx.collectors.values():
        statistics.update(c.finalize(model))
    num_classes = sum(classes)
    metrics: dict[str, Any] = {}
    histories: dict[str, list[float]] = {}
    for split, prefix in (("val", "val_"), ("test", "")):  # held-out validation, then test
        if split in datasets:
            cm = evaluate(model, _loader(datasets[split], cfg, train=False, seed=0), num_classes, device, cfg.amp)
            m = step_metrics(cm, classes[0])
        else:  # val_fraction=0: no validation split
            m = {f"miou_{k}": float("nan") for k in STEP_KINDS}
            m["class_iou"] = [float("nan")] * num_classes
        history = list(prev_state.get(f"{prefix}history", [])) if step > 0 else []
        history.append(float(m["miou_all"]))
        finite = [h for h in history if not math.isnan(h)]
        m["miou_avg"] = float(np.mean(finite)) if finite else float("nan")
        histories[f"{prefix}history"] = history
        if prefix:
            m = {f"{prefix}{k}": m[k] for k in (*METRICS, "class_iou")}
        metrics.update(m)
    metrics.update(
        step=step,
        losses={k: v / max(it, 1) for k, v in sums.items()},
        wall_s=time.perf_counter() - started,
        images_per_s=n_images / train_time if train_time > 0 else 0.0,
        n_train_images=len(datasets["train"]),
        iterations=it,
    )
    logger.step_end(metrics, model, datasets["test"], device, cfg.num_samples)
    state = {
        "step": step,
        "config": cfg.to_dict(),
        "model": {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()},
        "statistics": statistics,
        "collected": [name for name in collect if name in ctx.collectors],
        **histories,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, list, dict))},
    }
    return state, metrics
