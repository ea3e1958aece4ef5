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
