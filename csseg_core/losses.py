"""Pure loss functions of the continual methods (FT, LwF, LwF-MC, ILT, EWC/PI/RW, MiB, CIL, SDR).

Every function maps tensors to a scalar tensor, keeps no state and applies no loss weight (the
method multiplies by its own weight). Pixel losses reduce as the reference does: mean over all
B×H×W pixels, ignored (255) pixels contributing 0 but counting in the denominator, so the
published loss weights keep their meaning. Teacher tensors (old logits, old features,
prototypes) are detached. When nothing applies (e.g. every label is 255) the result is a zero
that keeps a grad path, never NaN. Where we implement the intended maths instead of the
reference code's behaviour, ``docs/DEPARTURES.md`` says so; SDR's prototype losses take
``gather="reference"`` / ``reduce="reference"`` to reproduce the reference's accidents (§1–3).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .latent_losses import (  # SDR's latent-space losses, part of this module's surface
    ATTRACTION_REDUCES,
    FEATURE_GATHERS,
    IGNORE_INDEX,
    NORMALIZATIONS,
    SHRINKINGS,
    SPARSITY_KINDS,
    attraction,
    class_feature_sums,
    feature_sparsity,
    prototype_matching,
    reference_gather,
    repulsion,
)


def _n_old(logits: Tensor, old_logits: Tensor) -> int:
    n_old = old_logits.shape[1]
    if not 1 <= n_old <= logits.shape[1]:
        raise ValueError(f"old logits have {n_old} channels, current logits {logits.shape[1]}")
    return n_old


def downsample_labels(target: Tensor, size) -> Tensor:
    """Nearest-neighbour downsampling of a label map, as ``F.interpolate(mode='nearest')``.

    Args:
        target: B×H×W integer labels.
        size: output size ``h`` or ``(h, w)`` (e.g. ``features.shape[-2:]``).

    Returns:
        B×h×w labels with ``target``'s dtype (255 stays 255).
    """
    size = tuple(size) if not isinstance(size, int) else (size, size)
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].to(target.dtype)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Plain cross-entropy, ℓ = mean_pixels[−log softmax(x)_y · 𝟙(y ≠ ignore)].

    Args:
        logits: B×C×H×W. target: B×H×W class indices. ignore_index: label that contributes 0.
    """
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none").mean()


def unbiased_cross_entropy(logits: Tensor, target: Tensor, n_old: int,
                           ignore_index: int = IGNORE_INDEX) -> Tensor:
    """MiB unbiased cross-entropy: the background absorbs every old class.

    log p̃_0 = logsumexp(x_{0..n_old−1}) − logsumexp(x), log p̃_c = x_c − logsumexp(x) for c ≥ n_old;
    labels y < n_old become 0; ℓ = mean_pixels[−log p̃_y · 𝟙(y ≠ ignore)]. Equals CE when n_old = 1.

    Args:
        logits: B×C×H×W. target: B×H×W. n_old: old classes incl. background (1 ≤ n_old ≤ C).
        ignore_index: label that contributes 0.
    """
    if not 1 <= n_old <= logits.shape[1]:
        raise ValueError(f"n_old must be in [1, {logits.shape[1]}], got {n_old}")
    return _UnbiasedCE.apply(logits, target, n_old, ignore_index)


class _UnbiasedCE(torch.autograd.Function):
    """:func:`unbiased_cross_entropy` with its gradient written out: (p − t) · 𝟙(y ≠ ignore) / N,
    p = softmax(x), t = one-hot(y) for y ≥ n_old, and softmax over the old channels for the
    others. One pass each way; the autograd of slices and ``log_softmax`` cost a full-size zero
    fill per slice and a second log-softmax per step (BENCHMARKS.md, session 12)."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, n_old: int, ignore_index: int) -> Tensor:
        target = target.long()
        valid = target != ignore_index
        new = valid & (target >= n_old)
        lse = torch.logsumexp(x, dim=1)
        lse_old = torch.logsumexp(x[:, :n_old], dim=1)
        idx = torch.where(new, target, torch.zeros_like(target))[:, None]  # a new pixel's channel (0 elsewhere)
        nll = lse - torch.where(new, x.gather(1, idx)[:, 0], lse_old)
        ctx.save_for_backward(x, idx, valid, new, lse, lse_old)
        ctx.n_old = n_old
        return torch.where(valid, nll, torch.zeros_like(nll)).mean()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, idx, valid, new, lse, lse_old = ctx.saved_tensors
        n_old = ctx.n_old
        grad = torch.exp(x - lse[:, None])
        grad[:, :n_old] -= torch.exp(x[:, :n_old] - lse_old[:, None]) * (valid & ~new)[:, None]
        grad.scatter_add_(1, idx, -new[:, None].to(grad.dtype))
        grad *= (valid[:, None] * (grad_out / valid.numel())).to(grad.dtype)
        return grad, None, None, None


def knowledge_distillation(logits: Tensor, old_logits: Tensor, alpha: float = 1.0) -> Tensor:
    """LwF/ILT distillation on the first C_old channels.

    ℓ = −mean_pixels[(1/C_old) Σ_{c<C_old} softmax(α x^old)_c · log_softmax(x_{:C_old})_c].

    Args:
        logits: B×C×H×W current logits. old_logits: B×C_old×H×W (detached). alpha: teacher scale.
    """
    n_old = _n_old(logits, old_logits)
    q = torch.softmax(alpha * old_logits.detach(), dim=1)
    logp = torch.log_softmax(logits[:, :n_old], dim=1)
    return -(q * logp).sum(dim=1).mean() / n_old


def unbiased_knowledge_distillation(logits: Tensor, old_logits: Tensor, alpha: float = 1.0) -> Tensor:
    """MiB unbiased distillation: the old background matches background + new classes.

    q = softmax(α x^old); log p̂_bg = logsumexp(x_{{0} ∪ new}) − logsumexp(x);
    log p̂_c = x_c − logsumexp(x) (c = 1..C_old−1);
    ℓ = −mean_pixels[(q_0 log p̂_bg + Σ_c q_c log p̂_c) / C_old]. Equals KD with no new channel.

    Args:
        logits: B×C×H×W current logits. old_logits: B×C_old×H×W (detached). alpha: teacher scale.
    """
    return _UnbiasedKD.apply(logits, old_logits.detach(), float(alpha), _n_old(logits, old_logits))


class _UnbiasedKD(torch.autograd.Function):
    """:func:`unbiased_knowledge_distillation` with its gradient written out (Σ_c q_c = 1):
    (p − t) / (C_old · N), p = softmax(x), t_c = q_0 · softmax over {0} ∪ new of x for c in that
    set, t_c = q_c for the old classes c = 1..C_old−1 (see :class:`_UnbiasedCE` for why)."""

    @staticmethod
    def forward(ctx, x: Tensor, old_logits: Tensor, alpha: float, n_old: int) -> Tensor:
        q = torch.softmax(alpha * old_logits, dim=1)
        lse = torch.logsumexp(x, dim=1)
        lse_bg = torch.logsumexp(torch.cat([x[:, :1], x[:, n_old:]], 1), dim=1)
        dot = (q[:, 1:] * x[:, 1:n_old]).sum(dim=1)  # Σ_c q_c x_c over the old classes
        loss = -(q[:, 0] * (lse_bg - lse) + dot - (1 - q[:, 0]) * lse).mean() / n_old
        ctx.save_for_backward(x, q, lse, lse_bg)
        ctx.n_old = n_old
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, q, lse, lse_bg = ctx.saved_tensors
        n_old = ctx.n_old
        grad = torch.exp(x - lse[:, None])
        q0 = q[:, :1]
        grad[:, :1] -= q0 * torch.exp(x[:, :1] - lse_bg[:, None])
        grad[:, n_old:] -= q0 * torch.exp(x[:, n_old:] - lse_bg[:, None])
        grad[:, 1:n_old] -= q[:, 1:]
        grad *= grad_out / (n_old * lse.numel())
        return grad, None, None, None


def bce_with_ignore(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """LwF-MC classification term: per-class BCE against one-hot targets, summed over classes.

    ℓ = mean_pixels[𝟙(y ≠ ignore) Σ_c BCEWithLogits(x_c, 𝟙(y = c))].

    Args:
        logits: B×C×H×W. target: B×H×W. ignore_index: label that contributes 0.
    """
    target = target.long()
    classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, 1, 1)
    onehot = (target[:, None] == classes).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(dim=1)
    return torch.where(target != ignore_index, loss, torch.zeros_like(loss)).mean()


def icarl_distillation(logits: Tensor, old_logits: Tensor) -> Tensor:
    """LwF-MC (iCaRL) distillation: ℓ = C_old · mean(BCEWithLogits(x_{:C_old}, sigmoid(x^old))).

    Args:
        logits: B×C×H×W. old_logits: B×C_old×H×W (detached). The mean runs over B×C_old×H×W.
    """
    n_old = _n_old(logits, old_logits)
    return n_old * F.binary_cross_entropy_with_logits(logits[:, :n_old], torch.sigmoid(old_logits.detach()))


def feature_distillation(features: Tensor, old_features: Tensor) -> Tensor:
    """ILT feature distillation: ℓ = mean over all elements of (F − F^old)².

    Args:
        features: B×D×h×w current body features. old_features: same shape (detached).
    """
    return F.mse_loss(features, old_features.detach())


def cil_distillation(logits: Tensor, old_logits: Tensor, target: Tensor,
                     gradient_scale: float = 1.0, temperature: float = 1.0) -> Tensor:
    """CIL (Klingner et al. 2020) distillation with entropy-based gradient scaling, intended form.

    x̃^old = old logits zero-padded to C channels; w = 1 + gs · H(softmax(x̃^old)) / ln 2 (bits);
    ℓ = T² · (1/(B·H·W)) Σ_{pixels, y=0} w · (−Σ_c softmax(x̃^old/T)_c · log_softmax(x/T)_c).
    Only background-labelled pixels distil (255 excluded); the mean runs over all pixels.

    Args:
        logits: B×C×H×W. old_logits: B×C_old×H×W (detached). target: B×H×W.
        gradient_scale: gs (the reference passes its ``loss_CIL`` weight). temperature: T.
    """
    n_old = _n_old(logits, old_logits)
    old = F.pad(old_logits.detach(), (0, 0, 0, 0, 0, logits.shape[1] - n_old))
    log_q1 = torch.log_softmax(old, dim=1)
    weight = 1.0 + gradient_scale * (-(log_q1.exp() * log_q1).sum(dim=1)) / math.log(2.0)
    q = torch.softmax(old / temperature, dim=1)
    ce = -(q * torch.log_softmax(logits / temperature, dim=1)).sum(dim=1)
    per_pixel = torch.where(target == 0, weight * ce, torch.zeros_like(ce))
    return temperature ** 2 * per_pixel.mean()


def min_max_normalize(t: Tensor) -> Tensor:
    """Min-max normalisation of an importance tensor: (t − min t) / (max t − min t + 1e-8).

    Args:
        t: any tensor (a constant tensor maps to zeros).
    """
    return (t - t.min()) / (t.max() - t.min() + 1e-8)


def ewc_penalty(params, old_params, importance) -> Tensor:
    """Quadratic importance penalty of EWC / PI / RW: Σ_n Σ F_n ⊙ (θ_n − θ_n^old)².

    Args:
        params: current parameters, a sequence of tensors or a name → tensor mapping.
        old_params: previous-step parameters (detached), same structure.
        importance: per-parameter importance F_n (detached; normalise with min_max_normalize).
            With mappings, only names present in all three are penalised (new classifiers are not).
    """
    if isinstance(params, Mapping):
        keys = [k for k in params if k in old_params and k in importance]
        triples = [(params[k], old_params[k], importance[k], k) for k in keys]
    else:
        params, old_params, importance = list(params), list(old_params), list(importance)
        if not len(params) == len(old_params) == len(importance):
            raise ValueError(f"ewc_penalty got {len(params)} params, {len(old_params)} old params"
                             f" and {len(importance)} importances")
        triples = [(p, o, f, i) for i, (p, o, f) in enumerate(zip(params, old_params, importance))]
    total = None
    for p, old, imp, name in triples:
        if p.shape != old.shape or p.shape != imp.shape:
            raise ValueError(f"ewc_penalty: parameter {name!r} has shape {tuple(p.shape)}, old"
                             f" {tuple(old.shape)}, importance {tuple(imp.shape)}")
        term = (imp.detach() * (p - old.detach()) ** 2).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


__all__ = [
    "ATTRACTION_REDUCES", "FEATURE_GATHERS", "IGNORE_INDEX", "NORMALIZATIONS", "SHRINKINGS", "SPARSITY_KINDS", "attraction",
    "bce_with_ignore", "cil_distillation", "class_feature_sums", "cross_entropy", "downsample_labels", "ewc_penalty",
    "feature_distillation", "feature_sparsity", "icarl_distillation", "knowledge_distillation", "min_max_normalize",
    "prototype_matching", "reference_gather", "repulsion", "unbiased_cross_entropy", "unbiased_knowledge_distillation",
]
