"""DeepLabV3 + incremental classifier for continual semantic segmentation.

Example:
    >>> from csseg_core.models import build_model, load_previous
    >>> old = build_model("tiny", (16,))
    >>> new = build_model("tiny", (16, 1))
    >>> load_previous(new, old.state_dict())
    ['cls.1.weight', 'cls.1.bias']
    >>> new.init_balanced()
"""

from csseg_core.models.backbones import BACKBONES, build_body, load_body_weights
from csseg_core.models.deeplab import ASPPHead, IncrementalSegmenter, build_model, load_previous

__all__ = [
    "BACKBONES",
    "ASPPHead",
    "IncrementalSegmenter",
    "build_body",
    "build_model",
    "load_body_weights",
    "load_previous",
]
