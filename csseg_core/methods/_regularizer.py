"""What EWC, PI and RW share: cross-entropy + a parameter-space penalty weighted by importances
that the previous step collected (step 0 collects them for these methods, and a shared step-0
state that lacks them is trained again with them, so it never silently reduces these methods to
FT as in the reference code). Each method is one module (``ewc.py``, ``pi.py``, ``rw.py``) that
registers the statistic it collects.

Reference preset weight 1000 (the MiB paper used 500 / 500 / 100; PLOP 100): set ``reg``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import losses as L
from .base import Method, weight


@dataclass(frozen=True)
class RegParams:
    reg: float = weight(1000.0)
    """Weight of the penalty (reference ``reg_importance``)."""
    reg_alpha: float = 0.9
    """EMA factor of the Fisher estimate (reference ``reg_alpha``)."""
    reg_normalize: bool = True
    """Min-max normalise the importances (reference: on unless ``--reg_no_normalize``)."""


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The parameters an importance is collected for (frozen ones have none)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _normalized(table: dict, normalize: bool) -> dict:
    """Min-max normalise every parameter tensor on its own, as the reference's
    ``utils/regularizer.py`` does (``normalize_fn`` per key: ``(x − min) / (max − min + 1e-8)``)."""
    if not normalize:
        return dict(table)
    return {k: L.min_max_normalize(v) for k, v in table.items()}


class Regularizer(Method):
    """Cross-entropy + ``reg`` × the distance to the previous parameters, weighted by the
    (normalised, summed) importances of ``importance_keys`` from the previous state."""

    Params = RegParams
    importance_keys: tuple[str, ...] = ()

    def statistics_alpha(self):
        return self.params.reg_alpha

    def setup(self, ctx):
        self._importance = None
        if ctx.step == 0 or self.params.reg <= 0:
            return
        tables = []
        for key in self.importance_keys:
            table = ctx.prev_statistics.get(key)
            if not table:
                raise KeyError(f"the previous state has no {key!r} statistics; it was trained without them")
            tables.append(_normalized(table, self.params.reg_normalize))
        self._importance = {n: sum(t[n] for t in tables) for n in tables[0]}

    def penalty(self, ctx):
        if self._importance is None:
            return None
        params = {n: p for n, p in ctx.model.named_parameters() if n in self._importance}
        return self.params.reg * L.ewc_penalty(params, ctx.old_params, self._importance)
