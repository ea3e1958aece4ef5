"""One continual step: ``run_step(config, step, previous_state) -> (state, metrics)``.

Usage from Python (``csseg train`` wraps ``run_scenario``)::

    from csseg_core.config import resolve_config
    from csseg_core.engine import run_step
    cfg = resolve_config("voc-15-1", "sdr", profile="smoke")
    state, metrics = run_step(cfg, 0)          # FT on the step-0 classes, collects SDR's prototypes
    state, metrics = run_step(cfg, 1, state)   # SDR from there
    # a step 0 that every method can continue from:
    state, metrics = run_step(cfg, 0, collect=STATISTICS)

A step reads like a recipe: the plan decides everything once (:func:`csseg_core.plan.plan_step`:
what runs, what is collected, which model is the teacher), :func:`train_one_epoch` follows it,
:func:`evaluate` scores the result. The step is DDP-aware: when a ``torch.distributed`` process
group exists (``torchrun`` or a Ray Train worker) data are sharded, gradients averaged, the confusion
matrix and the prototypes all-reduced (the prototypes unless ``sync_prototypes`` is false). It
starts no process itself and never imports Ray.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from . import losses as L
from .config import ExperimentConfig
from .errors import TrainingError
from .methods import Batch, Output
from .metrics import METRICS, STEP_KINDS, ConfusionMatrix, step_metrics
from .plan import StepPlan, autocast, default_device, dist_info, keep_freed_memory, plan_step, seed_everything
from .tensorboard import StepLogger

__all__ = ["ShardSampler", "StepPlan", "Tally", "autocast", "default_device", "dist_info", "evaluate", "make_loader",
           "plan_step", "run_step", "seed_everything", "timed_phases", "train_iteration", "train_one_epoch"]


class ShardSampler(torch.utils.data.Sampler):
    """One rank's shard of an order: ``order[rank::world]``.

    Evaluation (``generator`` None): the dataset's order, no padding, so the all-reduced confusion
    matrix counts every image exactly once (DistributedSampler pads with duplicates).
    Training (``generator`` given): each epoch takes the one-process run's order (a
    ``RandomSampler`` on the same generator, run to its end as a whole epoch runs it), keeps whole
    global batches of ``batch`` images (a multiple of ``world``) and deals them out, so the ranks'
    batches together are the one-process run's batches and every rank gets as many images (DDP's
    collectives need as many batches on every rank)."""

    def __init__(self, n: int, rank: int, world: int, generator: torch.Generator | None = None,
                 batch: int = 1) -> None:
        self.n, self.rank, self.world, self.generator = n, rank, world, generator
        self.kept = n if generator is None else n - n % (batch if n >= batch else world)

    def __iter__(self):
        order = range(self.n) if self.generator is None else list(RandomSampler(range(self.n), generator=self.generator))
        return iter(order[self.rank:self.kept:self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.kept, self.world))


def make_loader(dataset, cfg: ExperimentConfig, *, train: bool, seed: int) -> DataLoader:
    """The DataLoader a step uses on ``dataset``: sharded under DDP, shuffled by ``seed`` when ``train``,
    ``cfg.batch_size`` images a batch (the global batch; one image when evaluating uncropped).

    The training loader keeps its worker processes for every epoch (``persistent_workers``):
    they are forked once, before the statistics buffers exist (see :func:`run_step`), so the
    parent's writes to those buffers never copy-on-write fault against a freshly forked worker."""
    rank, world = dist_info()
    generator = torch.Generator().manual_seed(seed)
    if world > 1 and not train:
        sampler = ShardSampler(len(dataset), rank, world)
    elif world > 1:
        sampler = ShardSampler(len(dataset), rank, world, generator, batch=max(1, cfg.batch_size // world) * world)
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


def _float(out: Output) -> Output:
    """Model outputs in float32 (the losses and statistics are computed in float32 under amp)."""
    return Output(out.logits.float(), out.body.float(), out.pre_logits.float())


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


@dataclass
class Tally:
    """What the training loop accumulates over a step's epochs."""

    total: int
    """The step's iteration budget."""
    it: int = 0
    n_images: int = 0
    train_time: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)


def _forward(model: torch.nn.Module, image: torch.Tensor, plan: StepPlan) -> Output:
    with autocast(plan.cfg.amp, plan.device):
        logits, feats = model(image)
    out = Output(logits, feats["body"], feats["pre_logits"])
    return out if plan.cfg.amp == "off" else _float(out)


def _unscaled_grads_finite(plan: StepPlan) -> bool:
    """Unscale an fp16 step's gradients (the statistics and the penalty see unscaled gradients);
    False when they overflowed (the scaler skips that step)."""
    if not plan.scaler.is_enabled():
        return True
    plan.scaler.unscale_(plan.optimizer)
    grads = [p.grad for p in plan.model.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()) if grads else True


def _check_finite(values: dict[str, float], step: int, it: int, lr: float) -> None:
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise TrainingError(
            f"step {step}, iteration {it}: loss term {bad[0]!r} became {values[bad[0]]}; lower its weight "
            f"or the learning rate (lr={lr:.3g}); nothing of this step was saved")


def train_iteration(plan: StepPlan, image: torch.Tensor, target: torch.Tensor, lr: float, it: int) -> dict[str, float]:
    """One SGD iteration at learning rate ``lr``; the values of its loss terms."""
    ctx = plan.ctx
    for group in plan.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    image = image.to(plan.device, non_blocking=True, memory_format=plan.layout)
    target = target.to(plan.device, non_blocking=True)
    out = _forward(plan.net, image, plan)
    batch = Batch(image, target, L.downsample_labels(target, out.body.shape[-2:]))
    for c in ctx.collectors.values():
        c.observe(out.body, batch.target_small)
    old = None
    if plan.teacher is not None:
        with torch.no_grad():
            old = _forward(plan.teacher, image, plan)
    terms = plan.method.terms(ctx, batch, out, old)  # float32, outside autocast
    plan.optimizer.zero_grad(set_to_none=True)
    plan.scaler.scale(sum(terms.values())).backward()
    if _unscaled_grads_finite(plan):  # an fp16 overflow step is skipped by the scaler: collect nothing from it
        for c in ctx.collectors.values():
            c.after_backward(plan.model)
    penalty = plan.method.penalty(ctx)
    if penalty is not None:
        terms["reg"] = penalty
        penalty.backward()
    names = list(terms)  # one device sync per iteration for every term
    values = dict(zip(names, torch.stack([terms[k].detach().float() for k in names]).tolist()))
    _check_finite(values, plan.step, it, lr)
    if plan.clipped:
        torch.nn.utils.clip_grad_norm_(plan.clipped, plan.clip_norm, foreach=True)
    plan.scaler.step(plan.optimizer)
    plan.scaler.update()
    return values


def train_one_epoch(plan: StepPlan, batches: Iterable, tally: Tally, logger: StepLogger) -> None:
    """One pass over ``batches`` with the polynomial learning rate, up to the step's budget."""
    plan.net.train()
    if plan.fix_bn:
        plan.model.fix_bn()
    world = dist_info()[1]
    t0 = time.perf_counter()
    for image, target in batches:
        if tally.it >= tally.total:
            break
        lr = plan.base_lr * (1 - tally.it / tally.total) ** plan.cfg.lr_power
        values = train_iteration(plan, image, target, lr, tally.it)
        for k, v in values.items():
            tally.sums[k] = tally.sums.get(k, 0.0) + v
        tally.n_images += image.shape[0] * world
        tally.it += 1
        logger.iteration(tally.it, values, lr)
    tally.train_time += time.perf_counter() - t0


def _mean_over_ranks(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Loss sums averaged over the DDP ranks (each rank's losses are those of its shard of the global
    batch; one process: ``sums`` as they are)."""
    world = dist_info()[1]
    if world == 1 or not sums:
        return sums
    names = sorted(sums)
    total = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return {k: v / world for k, v in zip(names, total.tolist())}


def _evaluate_splits(plan: StepPlan, prev_state: dict | None) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Metrics on the held-out validation split (``val_*``), then the test split, and the mIoU histories."""
    metrics: dict[str, Any] = {}
    histories: dict[str, list[float]] = {}
    for split, prefix in (("val", "val_"), ("test", "")):
        if split in plan.datasets:
            cm = evaluate(plan.model, make_loader(plan.datasets[split], plan.cfg, train=False, seed=0), plan.num_classes,
                          plan.device, plan.cfg.amp)
            m = step_metrics(cm, plan.classes[0])
        else:  # val_fraction=0: no validation split
            m = {f"miou_{k}": float("nan") for k in STEP_KINDS}
            m["class_iou"] = [float("nan")] * plan.num_classes
        history = list(prev_state.get(f"{prefix}history", [])) if plan.step > 0 else []
        history.append(float(m["miou_all"]))
        finite = [h for h in history if not math.isnan(h)]
        m["miou_avg"] = float(np.mean(finite)) if finite else float("nan")
        histories[f"{prefix}history"] = history
        if prefix:
            m = {f"{prefix}{k}": m[k] for k in (*METRICS, "class_iou")}
        metrics.update(m)
    return metrics, histories


def run_step(cfg: ExperimentConfig, step: int, prev_state: dict | None = None, *, collect: Iterable[str] = (),
             log_dir: str | None = None, progress: bool = False) -> tuple[dict, dict]:
    """Train and evaluate one continual step (0 = base step, trained with FT for every method).

    ``prev_state`` is the state returned for ``step - 1`` (required when ``step > 0``). ``collect``:
    statistics to collect besides those ``cfg.method`` needs from this step's state
    (``Method.collects``), e.g. :data:`csseg_core.methods.STATISTICS` for a step 0 that every method
    continues from; collecting never changes the training. ``log_dir``: TensorBoard directory
    (rank 0; None: no logging); ``progress``: a progress bar (rank 0).

    Returns ``(state, metrics)`` (keys: docs/ARCHITECTURE.md); ``state["collected"]`` lists the
    statistics the state holds. Raises TrainingError when a loss term becomes NaN or infinite
    (nothing is written).
    """
    started = time.perf_counter()
    keep_freed_memory()
    plan = plan_step(cfg, step, prev_state, collect)
    rank = dist_info()[0]
    loader = make_loader(plan.datasets["train"], cfg, train=True, seed=cfg.seed + step)
    # fork the loader's workers (kept for every epoch) before the statistics allocate their buffers
    first = iter(loader) if cfg.num_workers > 0 else None
    plan.ctx.collectors = plan.build_collectors()
    epochs, total = plan.schedule(len(loader))
    logger = StepLogger(log_dir if rank == 0 else None, step, plan.scenario, progress=progress and rank == 0,
                        total=total, log_every=cfg.log_every)
    tally = Tally(total)
    try:
        for _ in range(epochs):
            batches, first = (loader if first is None else first), None
            train_one_epoch(plan, batches, tally, logger)
    finally:
        logger.close_progress()
        first = batches = loader = None  # shuts the persistent loader workers down

    statistics: dict[str, Any] = {}
    for c in plan.ctx.collectors.values():
        statistics.update(c.finalize(plan.model))
    metrics, histories = _evaluate_splits(plan, prev_state)
    losses = _mean_over_ranks(tally.sums, plan.device)
    metrics.update(step=step, losses={k: v / max(tally.it, 1) for k, v in losses.items()},
                   wall_s=time.perf_counter() - started,
                   images_per_s=tally.n_images / tally.train_time if tally.train_time > 0 else 0.0,
                   n_train_images=len(plan.datasets["train"]), iterations=tally.it)
    logger.step_end(metrics, plan.model, plan.datasets["test"], plan.device, cfg.num_samples)
    state = {
        "step": step,
        "config": cfg.to_dict(),
        "model": {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                  for k, v in plan.model.state_dict().items()},
        "statistics": statistics,
        "collected": [name for name in plan.collect if name in plan.ctx.collectors],
        **histories,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, list, dict))},
    }
    return state, metrics


#: what :func:`timed_phases` times: (module, function) -> phase name
_PHASES = {(".plan", "build_datasets"): "datasets", (".plan", "build_model"): "model build",
           (".engine", "evaluate"): "evaluate"}


@contextlib.contextmanager
def timed_phases() -> Iterator[dict[str, float]]:
    """Seconds the :func:`run_step` calls inside the block spend per phase, for benchmarks.

    Yields a dict filled as the steps run: ``datasets`` (``build_datasets``), ``model build``
    (``build_model``, student and teacher) and ``evaluate`` (every split), summed over calls. The
    functions the step plan and the engine call are wrapped for the duration of the block and
    restored after it (not thread-safe; nothing else about the step changes)::

        with timed_phases() as phases:
            state, metrics = run_step(cfg, 1, state)
        print(phases["evaluate"])
    """
    phases: dict[str, float] = {}
    modules = {(mod, name): importlib.import_module(mod, __package__) for mod, name in _PHASES}
    originals = {key: getattr(module, key[1]) for key, module in modules.items()}

    def timed(key, fn):
        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[_PHASES[key]] = phases.get(_PHASES[key], 0.0) + time.perf_counter() - t0
        return inner

    for key, fn in originals.items():
        setattr(modules[key], key[1], timed(key, fn))
    try:
        yield phases
    finally:
        for key, fn in originals.items():
            setattr(modules[key], key[1], fn)
