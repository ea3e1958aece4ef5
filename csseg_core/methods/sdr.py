"""SDR (Michieli & Zanuttigh, CVPR 2021): MiB's unbiased CE and KD plus four latent-space
constraints on the backbone features: prototype matching, attraction to the class
prototypes, repulsion between on-batch class centroids, and feature sparsity.

Defaults are the reference ``--method SDR`` preset. Prototypes are running means of the
``body`` features per class, collected at every step (all-reduced across workers unless
``sync_prototypes=false``). The engine fields ``sdr_feature_gather`` and ``attraction_reduce``
(``StepContext``) switch the losses to the reference code's accidental behaviour
(docs/DEPARTURES.md §1–3); the defaults are the paper's maths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import losses as L
from ..errors import ConfigError
from .base import Method, register_method, weight
from .mib import UnbiasedMixin


@dataclass(frozen=True)
class SDRParams:
    kd: float = weight(100.0, term="unkd")
    """Weight of the unbiased knowledge distillation."""
    alpha: float = 1.0
    pm: float = weight(0.01)
    """Weight of prototype matching (reference ``loss_de_prototypes``)."""
    pm_sum_after: bool = True
    """Match batch class means to prototypes (True) or every feature to its prototype."""
    attraction: float = weight(1e-3)
    """Weight of the attractive contrastive term (reference ``loss_fc``)."""
    repulsion: float = weight(1e-3)
    """Weight of the repulsive contrastive term (reference ``lfc_sep_clust``)."""
    sparsity: float = weight(1e-3)
    """Weight of feature sparsity (reference ``loss_featspars``)."""
    sparsity_norm: str = "max_maskedforclass"
    sparsity_shrink: str = "exponential"
    sparsity_kind: str = "ratio"
    init_balanced: bool = False
    """The SDR preset does not use MiB's balanced init; set True to add it."""

    def __post_init__(self) -> None:
        for key, allowed in (("sparsity_norm", L.NORMALIZATIONS), ("sparsity_shrink", L.SHRINKINGS),
                             ("sparsity_kind", L.SPARSITY_KINDS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of: {', '.join(allowed)}")


def teacher_prediction(old_logits: torch.Tensor, size) -> torch.Tensor:
    """The old model's class at the pixels of a ``size`` feature map: its argmax at full resolution,
    nearest-downsampled (the reference's pseudo-labels for L_pm). Computed the other way round,
    nearest-sampling the logits first (the same pixels, so the same first maximum), which takes the
    argmax over 64× fewer pixels at output stride 8 (tests/test_methods.py)."""
    return F.interpolate(old_logits, size=tuple(size), mode="nearest").argmax(1)


@register_method
class SDR(UnbiasedMixin, Method):
    name = "sdr"
    Params = SDRParams
    collects = ("prototypes",)

    def needs_old_model(self, step):
        return step > 0 and (self.params.kd > 0 or self.params.pm > 0)

    def distillation(self, ctx, batch, out, old):
        p = self.params
        terms = self.unkd(out, old)
        feats, labels = out.body, batch.target_small
        protos = ctx.collectors["prototypes"]
        if p.pm > 0:
            if ctx.mode == "sequential":
                pseudo = labels * (labels < ctx.n_old)
            else:
                pseudo = teacher_prediction(old.logits, labels.shape[-2:])
                pseudo = pseudo * (labels == 0)
            terms["pm"] = p.pm * L.prototype_matching(feats, pseudo, protos.previous, p.pm_sum_after,
                                                      gather=ctx.feature_gather)
        if p.attraction > 0:
            terms["attraction"] = p.attraction * L.attraction(feats, labels, protos.current, gather=ctx.feature_gather,
                                                              reduce=ctx.attraction_reduce)
        if p.repulsion > 0:
            terms["repulsion"] = p.repulsion * L.repulsion(feats, labels, gather=ctx.feature_gather)
        if p.sparsity > 0:
            terms["sparsity"] = p.sparsity * L.feature_sparsity(feats, labels, p.sparsity_norm, p.sparsity_shrink, p.sparsity_kind)
        return terms
