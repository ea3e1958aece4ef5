"""Segmentation metrics from a confusion matrix, and the continual old/new split.

The matrix follows the reference ``StreamSegMetrics`` (SDR and MiB): rows are ground-truth
classes, columns predicted classes, pixels whose ground truth is outside ``[0, n)`` (255 =
ignored, future classes) are skipped. Means average only over classes present in the
ground truth, background included. Every value is a fraction in [0, 1]; the CLI prints
percentages with :func:`format_percent`.

Example:
    >>> cm = ConfusionMatrix(3)
    >>> cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 255]))
    >>> round(step_metrics(cm, n_old=2)["miou_all"], 3)
    0.5
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix", "step_metrics", "format_percent", "KINDS", "STEP_KINDS", "METRICS", "VAL_METRICS",
           "ALL_METRICS", "split_metric"]

KINDS = ("all", "old", "new", "avg")
"""The mIoU kinds, short names (``--metric old``, table columns); every metric name derives from them."""
STEP_KINDS = KINDS[:3]
"""The kinds measured on one step's confusion matrix (``avg`` is the mean of ``all`` over the steps so far)."""
METRICS = tuple(f"miou_{k}" for k in KINDS)
"""Test metrics (the dataset's evaluation images, what papers report): ``miou_all`` ... ``miou_avg``."""
VAL_METRICS = tuple(f"val_{m}" for m in METRICS)
"""The same metrics on the held-out validation split (what sweeps select on)."""
ALL_METRICS = VAL_METRICS + METRICS


def split_metric(kind: str, split: str) -> str:
    """``("all", "val")`` -> ``"val_miou_all"``; ``("miou_old", "test")`` -> ``"miou_old"``."""
    kind = kind[len("val_"):] if kind.startswith("val_") else kind
    kind = kind if kind.startswith("miou_") else f"miou_{kind}"
    return f"val_{kind}" if split == "val" else kind


class ConfusionMatrix:
    """An ``n × n`` int64 confusion matrix filled with one ``bincount`` per update.

    Args:
        num_classes: Number of classes seen so far, background included.
        device: Device of the accumulator (default CPU). Inputs are moved to it.
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix needs num_classes >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.mat = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Set every count back to zero."""
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predictions.

        Args:
            pred: Predicted class indices (any shape), values in ``[0, n)``.
            target: Ground truth of the same shape; values outside ``[0, n)`` (e.g. 255)
                are ignored.

        Raises:
            ValueError: On a shape mismatch or a prediction outside ``[0, n)``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        n = self.num_classes
        pred = pred.to(self.mat.device, torch.int64).reshape(-1)
        target = target.to(self.mat.device, torch.int64).reshape(-1)
        keep = (target >= 0) & (target < n)
        pred, target = pred[keep], target[keep]
        if pred.numel() and not bool(((pred >= 0) & (pred < n)).all()):
            raise ValueError(f"prediction outside [0, {n}) given to a {n}-class ConfusionMatrix")
        self.mat += torch.bincount(n * target + pred, minlength=n * n).view(n, n)

    def all_reduce(self) -> None:
        """Sum the matrix over all processes when ``torch.distributed`` is initialised.

        A no-op in a single process. With NCCL a CPU matrix travels through the current
        CUDA device and comes back.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        mat = self.mat
        if dist.get_backend() == "nccl" and mat.device.type != "cuda":
            mat = mat.cuda()
        dist.all_reduce(mat, op=dist.ReduceOp.SUM)
        if mat is not self.mat:
            self.mat.copy_(mat.to(self.mat.device))

    def compute(self) -> dict[str, Any]:
        """Metrics of the accumulated pixels.

        Returns:
            ``overall_acc`` (float), ``mean_acc`` (float), ``miou`` (float), ``freqw_acc``
            (float), ``class_acc`` and ``class_iou`` (float64 CPU tensors, NaN for classes
            absent from the ground truth) and ``present`` (bool CPU tensor). Means are
            over present classes only and NaN when no pixel was counted.
        """
        mat = self.mat.detach().to("cpu", torch.float64)
        tp = mat.diagonal()
        gt = mat.sum(dim=1)
        predicted = mat.sum(dim=0)
        present = gt > 0
        nan = torch.full_like(tp, math.nan)
        class_acc = torch.where(present, tp / gt.clamp(min=1), nan)
        class_iou = torch.where(present, tp / (gt + predicted - tp).clamp(min=1), nan)
        total = gt.sum().item()
        freq = gt / total if total > 0 else nan
        return {
            "overall_acc": tp.sum().item() / total if total > 0 else math.nan,
            "mean_acc": _masked_mean(class_acc, present),
            "miou": _masked_mean(class_iou, present),
            "freqw_acc": (freq[present] * class_iou[present]).sum().item() if total > 0 else math.nan,
            "class_acc": class_acc,
            "class_iou": class_iou,
            "present": present,
        }


def step_metrics(cm: ConfusionMatrix, n_old: int) -> dict[str, Any]:
    """mIoU of all, old and new classes of a continual step.

    Args:
        cm: The confusion matrix over every class seen so far (background = 0).
        n_old: Number of step-0 classes, background included: "old" is ``[0, n_old)``,
            "new" is ``[n_old, n)``.

    Returns:
        ``miou_all``, ``miou_old``, ``miou_new`` (floats; NaN where no class of the group is
        present, e.g. ``miou_new`` at step 0), ``overall_acc``, ``mean_acc``, and
        ``class_iou`` / ``class_acc`` as python lists of floats (NaN for absent classes).
    """
    if not 0 < n_old <= cm.num_classes:
        raise ValueError(f"n_old must be in [1, {cm.num_classes}], got {n_old}")
    res = cm.compute()
    iou, present = res["class_iou"], res["present"]
    old = torch.arange(cm.num_classes) < n_old
    return {
        "miou_all": res["miou"],
        "miou_old": _masked_mean(iou, present & old),
        "miou_new": _masked_mean(iou, present & ~old),
        "overall_acc": res["overall_acc"],
        "mean_acc": res["mean_acc"],
        "class_iou": iou.tolist(),
        "class_acc": res["class_acc"].tolist(),
    }


def format_percent(x: float | None, missing: str = "–") -> str:
    """Format a fraction as a percentage with one decimal (``0.6134`` → ``"61.3"``).

    Args:
        x: A fraction, NaN or None.
        missing: what NaN / None print as.

    Returns:
        The percentage, or ``missing`` for NaN / None.
    """
    if x is None or x != x:  # NaN of any float type
        return missing
    return f"{100.0 * x:.1f}"


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return values[mask].mean().item() if bool(mask.any()) else math.nan
