"""Fault injection for tests (the product has no test hook): ``with nan_loss("sdr", step=1): ...``
makes the first loss term of ``sdr`` NaN from its step 1 on, in this process."""

from __future__ import annotations

import contextlib

import pytest

from csseg_core.methods import get_method


@contextlib.contextmanager
def nan_loss(method: str, step: int = 1):
    cls = get_method(method)
    terms = cls.terms

    def faulty(self, ctx, batch, out, old):
        values = terms(self, ctx, batch, out, old)
        if ctx.step >= step:
            first = next(iter(values))
            values[first] = values[first] * float("nan")
        return values

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "terms", faulty)
        yield


def without_random_augmentation(mp: pytest.MonkeyPatch) -> None:
    """Training views of the whole image, never flipped: the crops and flips are drawn from each
    process's own torch generator, the only draws in which N DDP ranks differ from one process."""
    from csseg_core.data import transforms

    init = transforms.TrainTransform.__init__

    def no_flip(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.flip_p = 0.0

    mp.setattr(transforms, "random_resized_crop_params", lambda height, width, scale, ratio: (0, 0, height, width))
    mp.setattr(transforms.TrainTransform, "__init__", no_flip)


def recorded_losses(mp: pytest.MonkeyPatch) -> list[float]:
    """The cross-entropy of every training iteration, averaged over the DDP ranks (filled as the
    engine trains)."""
    import torch
    import torch.distributed as dist

    from csseg_core import engine

    losses: list[float] = []
    train_iteration = engine.train_iteration

    def recording(plan, image, target, lr, it):
        values = train_iteration(plan, image, target, lr, it)
        ce = torch.tensor([values["ce"]], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(ce)
            ce /= dist.get_world_size()
        losses.append(float(ce))
        return values

    mp.setattr(engine, "train_iteration", recording)
    return losses
