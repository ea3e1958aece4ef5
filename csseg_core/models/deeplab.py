"""DeepLabV3 with an incremental classifier (one 1×1 conv per continual step).

Head: the reference's ASPP layout (SDR §4.1, ``make_model_v2`` → ``modules/deeplab.py``):
1×1 conv + three bias-free 3×3 atrous convs, concat → BN → 1×1 reduction; image-pool branch
mean → 1×1 conv → BN → 1×1 conv, added before the last BN. Two options:

* ``head_act``: ``"relu"`` (default) puts a ReLU after each of the three BNs, as torchvision's
  ASPP does; ``"none"`` is the reference's SDR path, whose ``DeeplabV3`` gets a plain
  ``nn.BatchNorm2d`` as ``norm_act`` (no activation anywhere in the head). (MiB's
  ``InPlaceABNSync`` head, the reference's other path, uses leaky ReLU 0.01; not offered.)
* ``pool_window``: the image-pool branch always takes the global mean in training; in eval,
  0 (default) keeps the global mean and ``w > 0`` is the reference's ``--pooling w``: a
  stride-1 ``min(w, h)×min(w, w')`` average window with replicate padding back to ``h×w'``
  (the global mean up to ``w×w`` feature maps, a local mean above).

Atrous rates: (6, 12, 18) at output stride 16 and (12, 24, 32) at 8, as in the reference code
(torchvision and the DeepLabV3 paper use 36 for the last rate). Initialisation: PyTorch's
default for the head and classifiers, as in the reference (which comments out MiB's Xavier
``reset_parameters``). As in the reference and in torchvision, the image-pool BN sees one
value per image, so training needs batches of at least 2 images (drop the last incomplete batch).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from numbers import Integral
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from csseg_core.errors import ConfigError
from csseg_core.models.backbones import build_body, require_same_shapes

__all__ = ["ASPPHead", "HEAD_ACTS", "IncrementalSegmenter", "build_model", "load_previous", "upsample_bilinear"]

HEAD_ACTS: tuple[str, ...] = ("relu", "none")
_RATES = {16: (6, 12, 18), 8: (12, 24, 32)}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ASPPHead(nn.Module):
    """DeepLabV3 atrous spatial pyramid pooling head.

    Args:
        in_channels: Channels of the body features.
        out_channels: Channels of the output (``pre_logits``).
        output_stride: 16 or 8; selects the atrous rates.
        hidden_channels: Channels of each ASPP branch (default: ``out_channels``).
        act: ``"relu"`` after each BN, or ``"none"`` (the reference's plain BatchNorm).
        pool_window: Eval-time image-pool window (0 = global mean; reference 32).
    """

    def __init__(self, in_channels: int, out_channels: int, output_stride: int = 16, hidden_channels: int | None = None,
                 *, act: str = "relu", pool_window: int = 0) -> None:
        super().__init__()
        hidden = hidden_channels or out_channels
        self.act = act
        self.pool_window = int(pool_window)
        self.map_convs = nn.ModuleList([nn.Conv2d(in_channels, hidden, 1, bias=False)])
        for rate in _RATES[output_stride]:
            self.map_convs.append(nn.Conv2d(in_channels, hidden, 3, padding=rate, dilation=rate, bias=False))
        self.map_bn = nn.BatchNorm2d(4 * hidden)
        self.red_conv = nn.Conv2d(4 * hidden, out_channels, 1, bias=False)
        self.pool_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.pool_bn = nn.BatchNorm2d(hidden)
        self.pool_red_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.red_bn = nn.BatchNorm2d(out_channels)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.act == "relu" else x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.pool_window <= 0:
            return x.mean(dim=(2, 3), keepdim=True)
        kh, kw = min(self.pool_window, x.shape[2]), min(self.pool_window, x.shape[3])
        pool = F.avg_pool2d(x, (kh, kw), stride=1)
        left, top = (kw - 1) // 2, (kh - 1) // 2
        return F.pad(pool, (left, kw - 1 - left, top, kh - 1 - top), mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([_atrous(conv, x) for conv in self.map_convs], dim=1)
        out = self.red_conv(self._act(self.map_bn(out)))
        pool = self.pool_red_conv(self._act(self.pool_bn(self.pool_conv(self._pool(x)))))
        return self._act(self.red_bn(out + pool))


def _atrous(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, as a 1×1 convolution with the centre tap when the rate outgrows the map.

    A 3×3 convolution with dilation and zero padding ``r ≥ h, w`` sees only zeros off its
    centre, at every output position: the result (and every gradient, the off-centre taps'
    being zero) is the centre tap's 1×1 convolution, computed with 1/9 of the work. On the
    smoke profile (8×8 training features, rates 12–32) and the reference's at crop 96
    (6×6, rates 6–18) every atrous branch is in this case.
    """
    rate = conv.dilation[0]
    if conv.kernel_size == (3, 3) and rate == conv.padding[0] and rate >= x.shape[-2] and rate >= x.shape[-1]:
        return F.conv2d(x, conv.weight[:, :, 1:2, 1:2], conv.bias)
    return conv(x)


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(n_out: int, n_in: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``n_out × n_in`` weights of 1-D bilinear resizing with ``align_corners=False`` (PyTorch's
    source index ``max((i + ½)·n_in/n_out − ½, 0)``, two taps, the last row/column clamped)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    rows = torch.arange(n_out)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(dtype=dtype, device=device)


def upsample_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` as two matrix products
    ``A_h · x · A_wᵀ`` (the same weights; equal to float64 rounding, tests/test_models.py).

    Why: on a CPU, ``upsample_bilinear2d``'s backward is a scatter that took 27 ms for the
    16×101×64×64 logits of an ADE step (forward 4 ms); the products' backward is two more
    products. Upsampling 16×C×8×8 logits to 64×64 and a cross-entropy, forward + backward, 2 threads:
    C = 17 10.8 → 10.0 ms, C = 101 94–103 → 69–71 ms, C = 151 227–230 → 136–146 ms. The result is
    contiguous (NCHW) whatever the input's layout, which the per-pixel softmaxes of the losses
    also prefer; ``x`` itself when it already has ``size``."""
    h, w = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) == (h, w):
        return x
    a_h = _bilinear_matrix(h, x.shape[-2], x.dtype, x.device)
    a_w = _bilinear_matrix(w, x.shape[-1], x.dtype, x.device)
    return torch.matmul(torch.matmul(a_h, x), a_w.T)


class IncrementalSegmenter(nn.Module):
    """Body + ASPP head + one 1×1 classifier per continual step.

    Parameters are named ``body.*``, ``head.*`` and ``cls.<step>.*``; a step-t model holds
    the step-(t−1) keys plus ``cls.t.*`` (see :func:`load_previous`).

    Args:
        body: Backbone with an ``out_channels`` attribute.
        classes_per_step: Number of classes added at each step (step 0 includes background).
        output_stride: 16 or 8.
        head_channels: Channels of the head output and classifier input.
        head_act: ``"relu"`` or ``"none"`` (see :class:`ASPPHead`).
        pool_window: Eval-time image-pool window of the head (0 = global mean).
    """

    def __init__(
        self, body: nn.Module, classes_per_step: Sequence[int], *, output_stride: int = 16, head_channels: int = 256,
        head_act: str = "relu", pool_window: int = 0,
    ) -> None:
        super().__init__()
        self.body = body
        self.body_channels: int = int(body.out_channels)
        self.head_channels = int(head_channels)
        self.output_stride = int(output_stride)
        self.classes_per_step: tuple[int, ...] = tuple(int(n) for n in classes_per_step)
        self.head = ASPPHead(self.body_channels, self.head_channels, self.output_stride, act=head_act,
                             pool_window=pool_window)
        self.cls = nn.ModuleList([nn.Conv2d(self.head_channels, n, 1) for n in self.classes_per_step])
        self.bn_frozen = False

    @property
    def num_classes(self) -> int:
        """Total number of output channels (classes seen so far, background included)."""
        return sum(self.classes_per_step)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Segment a batch.

        Args:
            x: Images, ``B×3×H×W``.

        Returns:
            ``(logits, features)``: logits ``B×num_classes×H×W`` (upsampled bilinearly,
            ``align_corners=False``, channels in step order) and ``{"body": B×Cb×h×w,
            "pre_logits": B×head_channels×h×w}``.
        """
        body = self.body(x)
        pre_logits = self.head(body)
        logits = torch.cat([cls(pre_logits) for cls in self.cls], dim=1)
        logits = upsample_bilinear(logits, x.shape[-2:])
        return logits, {"body": body, "pre_logits": pre_logits}

    @torch.no_grad()
    def init_balanced(self) -> None:
        """MiB initialisation of the last step's classifier from the background (§4.3).

        New weights ← background weights of ``cls[0]``; new biases and the background bias
        ← ``b_bg − log(N_new + 1)``, so the softmax mass of the old background is shared
        equally by the background and the new classes. A no-op with one step.
        """
        if len(self.cls) < 2:
            return
        bg, new = self.cls[0], self.cls[-1]
        bias = bg.bias[0] - math.log(new.out_channels + 1)
        new.weight.copy_(bg.weight[0:1].expand_as(new.weight))
        new.bias.fill_(bias.item())
        bg.bias[0] = bias

    def fix_bn(self) -> None:
        """Freeze every BatchNorm: eval mode (kept across ``train()``), no gradients."""
        self.bn_frozen = True
        for module in self.modules():
            if isinstance(module, _BN_TYPES):
                module.eval()
                for p in module.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> IncrementalSegmenter:
        """Set train/eval mode; frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.bn_frozen:
            for module in self.modules():
                if isinstance(module, _BN_TYPES):
                    module.eval()
        return self

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups ``body``, ``head``, ``cls`` (trainable ones only).

        Args:
            weight_decay: Weight decay of every group.

        Returns:
            A list of dicts with ``name``, ``params`` and ``weight_decay``; groups without
            trainable parameters (e.g. a frozen body) are left out.
        """
        groups = []
        for name in ("body", "head", "cls"):
            params = [p for p in getattr(self, name).parameters() if p.requires_grad]
            if params:
                groups.append({"name": name, "params": params, "weight_decay": weight_decay})
        return groups


def build_model(
    backbone: str = "resnet101",
    classes_per_step: Sequence[int] = (21,),
    *,
    output_stride: int = 16,
    pretrained: str | Path | None = None,
    head_channels: int = 256,
    bn_momentum: float | None = None,
    backbone_dilation: str = "torchvision",
    head_act: str = "relu",
    pool_window: int = 0,
) -> IncrementalSegmenter:
    """Build a DeepLabV3 incremental segmenter.

    Args:
        backbone: ``resnet101``, ``resnet50``, ``resnet18``, ``mobilenet_v3_large`` or ``tiny``.
        classes_per_step: Classes per step up to the current one, e.g. ``(16, 1, 1)``.
        output_stride: 16 or 8 (MobileNetV3: 16 only).
        pretrained: None / ``"none"``, ``"imagenet"`` or a path to a local torchvision
            state dict of the backbone.
        head_channels: Channels of the ASPP output.
        bn_momentum: Momentum of the body's BatchNorms (None or 0: the backbone's own;
            reference 0.0003). The head's BNs keep 0.1, as in the reference.
        backbone_dilation: ``"torchvision"`` or ``"reference"`` (ResNet-50/101).
        head_act: ``"relu"`` or ``"none"`` (reference).
        pool_window: Eval-time image-pool window (0 = global mean; reference 32).

    Returns:
        The model, in training mode.

    Raises:
        ConfigError: On a bad option or unusable pretrained weights.

    Example:
        >>> model = build_model("tiny", (16, 1))
        >>> logits, feats = model.eval()(torch.zeros(1, 3, 64, 64))
        >>> tuple(logits.shape), tuple(feats["body"].shape)
        ((1, 17, 64, 64), (1, 128, 4, 4))
    """
    steps = tuple(classes_per_step)
    if not steps or any(isinstance(n, bool) or not isinstance(n, Integral) or n < 1 for n in steps):
        raise ConfigError(f"classes_per_step must be positive integers, got {classes_per_step!r}")
    if output_stride not in _RATES:
        raise ConfigError(f"output_stride must be 16 or 8, got {output_stride!r}")
    if isinstance(head_channels, bool) or not isinstance(head_channels, int) or head_channels < 1:
        raise ConfigError(f"head_channels must be a positive integer, got {head_channels!r}")
    if head_act not in HEAD_ACTS:
        raise ConfigError(f"head_act must be one of {', '.join(HEAD_ACTS)}, got {head_act!r}")
    if isinstance(pool_window, bool) or not isinstance(pool_window, int) or pool_window < 0:
        raise ConfigError(f"pool_window must be an integer >= 0 (0 = global mean), got {pool_window!r}")
    body = build_body(backbone, output_stride, pretrained, dilation=backbone_dilation, bn_momentum=bn_momentum or None)
    return IncrementalSegmenter(body, [int(n) for n in steps], output_stride=output_stride, head_channels=head_channels,
                                head_act=head_act, pool_window=pool_window)


def load_previous(model: IncrementalSegmenter, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a step-(t−1) (or same-step) state into a step-t model.

    Everything but the newest classifier must be present with matching shapes; nothing
    unexpected may be left over. A ``module.`` prefix (DDP) is stripped; numpy arrays (e.g.
    read-only ones from the Ray object store) are copied into tensors.

    Args:
        model: The step-t model.
        state_dict: The previous model's ``state_dict()`` (tensors or numpy arrays).

    Returns:
        The keys left at their initial values (the new classifier's, or none).

    Raises:
        ConfigError: When the state comes from another backbone, head or class split.
    """
    state = {k.removeprefix("module."): v if torch.is_tensor(v) else torch.tensor(v) for k, v in state_dict.items()}
    own = model.state_dict()
    new_prefix = f"cls.{len(model.cls) - 1}."
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_missing = [k for k in missing if len(model.cls) == 1 or not k.startswith(new_prefix)]
    if bad_missing or unexpected:
        parts = []
        if bad_missing:
            parts.append(f"missing {len(bad_missing)} keys (first: {', '.join(bad_missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        raise ConfigError(
            f"previous state does not fit this model ({'; '.join(parts)}); "
            "was it trained with another backbone, head or scenario?"
        )
    if len(missing) not in (0, len([k for k in own if k.startswith(new_prefix)])):
        raise ConfigError(f"previous state holds only part of classifier {new_prefix.rstrip('.')}")
    require_same_shapes(state, own, state, "previous state does not fit this model",
                        "another backbone, head or class split?")
    model.load_state_dict(state, strict=False)
    return missing
