"""FT: fine-tuning with plain cross-entropy on the current step's labels (the lower bound)."""

from __future__ import annotations

from .base import Method, register_method


@register_method
class FT(Method):
    name = "ft"
