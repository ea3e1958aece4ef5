"""SDR's latent-space losses: feature sparsity L_sp, prototype matching L_pm, contrastive attraction
L_cl^a and repulsion L_cl^r, and the per-class feature sums the prototypes are made of.

Pure functions like the rest of :mod:`csseg_core.losses`, which re-exports every public name of this
module (methods call them as ``losses.attraction``). Features are B×D×h×w, labels B×h×w at feature
resolution (:func:`csseg_core.losses.downsample_labels`). ``gather="reference"`` /
``reduce="reference"`` reproduce the reference code's accidents (``docs/DEPARTURES.md`` §1–3).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255
"""The label every loss ignores (re-exported by :mod:`csseg_core.losses`)."""
NORMALIZATIONS = ("L1", "L2", "max_foreachfeature", "max_maskedforclass", "max_overall", "softmax")
SHRINKINGS = ("squared", "power3", "exponential")
SPARSITY_KINDS = ("ratio", "lasso", "entropy")
FEATURE_GATHERS = ("pixel", "reference")
"""How SDR's prototype losses gather a class's features: per-pixel vectors, or the reference
code's channel-major boolean-mask selection (``docs/DEPARTURES.md`` §1–2)."""
ATTRACTION_REDUCES = ("mean", "reference")
"""How L_cl^a combines its per-class terms: their mean, or the reference's in-loop division (§3)."""
_EPS = 1e-15  # reference epsilon of the sparsity loss


def _zero(t: Tensor) -> Tensor:
    """A 0 scalar on ``t``'s graph (an empty sum: never NaN, even if ``t`` holds inf/NaN)."""
    return t.reshape(-1)[:0].sum()


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed values: {', '.join(allowed)}")


def _pixels(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel feature vectors (B·h·w × D) and their labels (B·h·w), gathered pixel-wise."""
    b, d, h, w = features.shape
    if tuple(labels.shape) != (b, h, w):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match features {(b, d, h, w)};"
                         " downsample them with downsample_labels(target, features.shape[-2:])")
    return features.permute(0, 2, 3, 1).reshape(-1, d), labels.reshape(-1).long()


def _bins(lab: Tensor, valid: Tensor, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Bin index per pixel (0 where invalid) and pixel counts per bin (float)."""
    idx = torch.where(valid, lab, torch.zeros_like(lab))
    return idx, torch.zeros(n, dtype=dtype, device=lab.device).index_add(0, idx, valid.to(dtype))


def _class_stats(flat: Tensor, lab: Tensor, valid: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class feature sums (n × D, with grad), pixel counts (n, float) and the bin index per pixel."""
    idx, counts = _bins(lab, valid, n, flat.dtype)
    sums = flat.new_zeros(n, flat.shape[1]).index_add(0, idx, flat * valid.to(flat.dtype)[:, None])
    return sums, counts, idx


def reference_gather(features: Tensor, mask: Tensor, rows: str = "channels") -> Tensor:
    """The reference code's selection of one class's features (``docs/DEPARTURES.md`` §1–2).

    The B×h×w ``mask`` is broadcast over the D channels and the selected elements are read in
    (b, c, h, w) order, N = number of selected pixels; ``rows="channels"`` reshapes them to
    D×N (prototype update, L_cl^a, L_cl^r), ``rows="pixels"`` to N×D (L_pm). At batch 1 the
    D×N matrix holds one pixel's feature vector per column; at batch > 1 a row mixes channels
    of different images. The N×D matrix has per-pixel rows only when N ≤ 1.

    Args:
        features: B×D×h×w. mask: B×h×w booleans. rows: "channels" (D×N) or "pixels" (N×D).
    """
    _check_choice("rows", rows, ("channels", "pixels"))
    b, d, h, w = features.shape
    if tuple(mask.shape) != (b, h, w):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match features {(b, d, h, w)}")
    flat = features.masked_select(mask.bool()[:, None].expand(b, d, h, w))
    return flat.reshape(d, -1) if rows == "channels" else flat.reshape(-1, d)


def _present(lab: Tensor, valid: Tensor) -> list[int]:
    """The classes of the valid pixels, ascending (the reference's ``torch.unique`` order)."""
    return torch.unique(lab[valid]).tolist()

def feature_sparsity(features: Tensor, labels: Tensor | None, normalization: str = "max_maskedforclass",
                     shrinking: str = "exponential", kind: str = "ratio") -> Tensor:
    """SDR feature sparsity L_sp.

    f̄ = normalised F (per pixel over channels: ``L1``, ``L2``, ``max_foreachfeature``, ``softmax``;
    ``max_overall``: global max; ``max_maskedforclass``: each class of ``labels`` (incl. 0 and
    255) divided by the max over all channels/pixels of that class; 0 if only class 0 is present).
    ``ratio``: mean_pixels[Σ_j s(f̄_j) / (Σ_j f̄_j + 1e-15)] with s = x², x³ or exp(x);
    ``entropy``: mean_pixels[−Σ_j f̄_j log(f̄_j + 1e-10)]; ``lasso``: ‖F‖₁ / 2 (raw F, whole tensor).
    As in the reference the value is 0 when Σ f̄ ≤ 0. Meant for non-negative (post-ReLU) features;
    half precision is computed in float32.

    Args:
        features: B×D×h×w. labels: B×h×w labels at feature resolution (only for max_maskedforclass).
        normalization, shrinking, kind: see above; anything else raises ValueError.
    """
    _check_choice("normalization", normalization, NORMALIZATIONS)
    _check_choice("shrinking", shrinking, SHRINKINGS)
    _check_choice("kind", kind, SPARSITY_KINDS)
    x = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    if normalization == "L1":
        xn = F.normalize(x, p=1, dim=1)
    elif normalization == "L2":
        xn = F.normalize(x, p=2, dim=1)
    elif normalization == "max_foreachfeature":
        xn = x / (x.amax(dim=1, keepdim=True) + _EPS)
    elif normalization == "max_overall":
        xn = x / (x.max() + _EPS)
    elif normalization == "softmax":
        xn = torch.softmax(x, dim=1)
    else:  # max_maskedforclass
        if labels is None:
            raise ValueError("feature_sparsity(normalization='max_maskedforclass') needs labels")
        _pixels(x, labels)  # shape check
        classes, inv = torch.unique(labels.long(), return_inverse=True)
        if classes.numel() == 1 and int(classes[0]) == 0:
            return _zero(features)
        pix_max = x.amax(dim=1)  # B×h×w
        cls_max = pix_max.new_full((classes.numel(),), -math.inf).scatter_reduce(
            0, inv.reshape(-1), pix_max.reshape(-1), reduce="amax")
        xn = x / (cls_max[inv] + _EPS)[:, None]
    if kind == "lasso":
        value = x.abs().sum() / 2
    elif kind == "entropy":
        value = (-(xn * torch.log(xn + 1e-10)).sum(dim=1)).mean()
    else:
        shrunk = {"squared": lambda t: t ** 2, "power3": lambda t: t ** 3, "exponential": torch.exp}[shrinking]
        value = (shrunk(xn).sum(dim=1) / (xn.sum(dim=1) + _EPS)).mean()
    return torch.where(xn.sum() > 0, value, torch.zeros_like(value))


def class_feature_sums(features: Tensor, labels: Tensor, num_classes: int,
                       ignore_index: int = IGNORE_INDEX, gather: str = "pixel") -> tuple[Tensor, Tensor]:
    """Per-class sums of per-pixel feature vectors and pixel counts (for prototypes).

    sums[c] = Σ_{i: y_i = c} f_i, counts[c] = |{i: y_i = c}|; pixels labelled ``ignore_index`` or
    outside [0, num_classes) are skipped. Additive over batches; not detached (detach to store).
    ``gather="reference"``: sums[c] = row sums of :func:`reference_gather`'s D×N matrix (the
    reference's prototype update; equal to the default at batch 1, channel-mixed at batch > 1).

    Args:
        features: B×D×h×w. labels: B×h×w at feature resolution. num_classes: number of bins.
        ignore_index: skipped label. gather: "pixel" or "reference" (``FEATURE_GATHERS``).

    Returns:
        ``(sums [num_classes, D] in features' dtype, counts [num_classes] long)``.
    """
    _check_choice("gather", gather, FEATURE_GATHERS)
    flat, lab = _pixels(features, labels)
    valid = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
    if gather == "reference":
        sums = flat.new_zeros(num_classes, flat.shape[1])
        counts = torch.zeros(num_classes, dtype=torch.long, device=lab.device)
        for c in _present(lab, valid):
            sel = reference_gather(features, labels == c)
            sums[c] = sel.sum(dim=1)
            counts[c] = sel.shape[1]
        return sums, counts
    sums, _, idx = _class_stats(flat, lab, valid, num_classes)
    counts = torch.zeros(num_classes, dtype=torch.long, device=lab.device).index_add_(0, idx, valid.long())
    return sums, counts


def prototype_matching(features: Tensor, pseudo_labels: Tensor, prototypes: Tensor,
                       sum_after: bool = True, gather: str = "pixel") -> Tensor:
    """SDR prototype matching L_pm over the old classes c ≠ 0 present in ``pseudo_labels``.

    MSE(a, b) = mean over D of (a − b)²; p̂_c = mean of the current features of class c;
    sum_after: ℓ = (1/K) Σ_c MSE(p̂_c, p_c); otherwise ℓ = Σ_c mean_{i ∈ c} MSE(f_i, p_c).
    ``gather="reference"``: the "features" of class c are the rows r_i of
    :func:`reference_gather`'s N×D matrix (``rows="pixels"``), so p̂_c = mean_i r_i and the
    per-feature form averages MSE(r_i, p_c) (``docs/DEPARTURES.md`` §2).

    Args:
        features: B×D×h×w current body features. pseudo_labels: B×h×w old-class pseudo labels at
            feature resolution (0 = not an old class, 255 ignored). prototypes: N×D stored
            prototypes (detached); labels ≥ N are skipped. sum_after: SDR preset True.
        gather: "pixel" or "reference" (``FEATURE_GATHERS``).
    """
    _check_choice("gather", gather, FEATURE_GATHERS)
    flat, lab = _pixels(features, pseudo_labels)
    n = prototypes.shape[0]
    proto = prototypes.detach().to(device=flat.device, dtype=flat.dtype)
    valid = (lab >= 1) & (lab < n)
    if gather == "reference":
        classes = _present(lab, valid)
        total = _zero(features)
        for c in classes:
            rows = reference_gather(features, pseudo_labels == c, rows="pixels")
            if sum_after:
                total = total + ((rows.mean(dim=0) - proto[c]) ** 2).mean() / len(classes)
            else:
                total = total + ((rows - proto[c]) ** 2).mean()
        return total
    sums, counts, idx = _class_stats(flat, lab, valid, n)
    present = counts > 0
    if sum_after:
        means = sums / counts.clamp_min(1)[:, None]
        per_class = ((means - proto) ** 2).mean(dim=1)
        return torch.where(present, per_class, torch.zeros_like(per_class)).sum() / present.sum().clamp_min(1)
    err = torch.where(valid, ((flat - proto[idx]) ** 2).mean(dim=1), flat.new_zeros(()))
    return (flat.new_zeros(n).index_add(0, idx, err) / counts.clamp_min(1)).sum()


def attraction(features: Tensor, labels: Tensor, prototypes: Tensor, gather: str = "pixel",
               reduce: str = "mean") -> Tensor:
    """SDR attractive contrastive term L_cl^a: pull features towards their class prototype.

    term_c = mean_{i: y_i = c} MSE(f_i, p_c), MSE = mean over D, for the K classes present (255
    and labels ≥ N skipped), visited in ascending order k = 1..K.
    ``reduce="mean"``: ℓ = (1/K) Σ_k term_k. ``reduce="reference"``: the reference divides its
    running sum by K inside the class loop, ℓ = Σ_k term_k / K^(K−k+1) (§3).
    ``gather="reference"``: term_c = mean over the D×N matrix X of :func:`reference_gather` of
    (X − p_c 1ᵀ)², channel-mixed at batch > 1 (§1).

    Args:
        features: B×D×h×w. labels: B×h×w at feature resolution. prototypes: N×D (detached).
        gather: "pixel" or "reference" (``FEATURE_GATHERS``).
        reduce: "mean" or "reference" (``ATTRACTION_REDUCES``).
    """
    _check_choice("gather", gather, FEATURE_GATHERS)
    _check_choice("reduce", reduce, ATTRACTION_REDUCES)
    flat, lab = _pixels(features, labels)
    n = prototypes.shape[0]
    proto = prototypes.detach().to(device=flat.device, dtype=flat.dtype)
    valid = (lab >= 0) & (lab < n) & (lab != IGNORE_INDEX)
    if gather == "pixel":
        idx, counts = _bins(lab, valid, n, flat.dtype)
        err = torch.where(valid, ((flat - proto[idx]) ** 2).mean(dim=1), flat.new_zeros(()))
        per_class = flat.new_zeros(n).index_add(0, idx, err) / counts.clamp_min(1)
        if reduce == "mean":
            return per_class.sum() / (counts > 0).sum().clamp_min(1)
        terms = [per_class[c] for c in _present(lab, valid)]
    else:
        terms = [((reference_gather(features, labels == c) - proto[c][:, None]) ** 2).mean()
                 for c in _present(lab, valid)]
    total = _zero(features)
    for term in terms:
        total = (total + term) / len(terms) if reduce == "reference" else total + term / len(terms)
    return total


def repulsion(features: Tensor, labels: Tensor, gather: str = "pixel") -> Tensor:
    """SDR repulsive contrastive term L_cl^r: push on-batch class means apart.

    p̂_c = mean of the features of class c (255 skipped); ℓ = mean over ordered pairs j ≠ k of
    1 / ‖p̂_j − p̂_k‖₂; 0 with fewer than 2 classes. Pairs of identical means (1/0) are left out
    of the mean, as the reference's ``isinf`` filter does. ``gather="reference"``: p̂_c = the
    row means of :func:`reference_gather`'s D×N matrix (channel-mixed at batch > 1, §1).

    Args:
        features: B×D×h×w. labels: B×h×w at feature resolution.
        gather: "pixel" or "reference" (``FEATURE_GATHERS``).
    """
    _check_choice("gather", gather, FEATURE_GATHERS)
    flat, lab = _pixels(features, labels)
    classes, inv = torch.unique(lab, return_inverse=True)
    keep = classes != IGNORE_INDEX
    k = int(keep.sum())
    if k < 2:
        return _zero(features)
    if gather == "reference":
        means = torch.stack([reference_gather(features, labels == c).mean(dim=1) for c in classes[keep].tolist()])
    else:
        sums, counts, _ = _class_stats(flat, inv, lab != IGNORE_INDEX, classes.numel())
        means = (sums / counts.clamp_min(1)[:, None])[keep]
    sq = ((means[:, None] - means[None]) ** 2).sum(dim=-1)
    pairs = (sq > 0) & ~torch.eye(k, dtype=torch.bool, device=means.device)
    inv_dist = torch.where(pairs, sq.clamp_min(1e-30).rsqrt(), torch.zeros_like(sq))
    return inv_dist.sum() / pairs.sum().clamp_min(1)
