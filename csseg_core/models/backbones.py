"""Backbones ("bodies") for DeepLabV3: torchvision ResNets and MobileNetV3, and a tiny CNN.

Every body maps ``B×3×H×W`` to ``B×C×H/os×W/os`` features and exposes ``out_channels``.
The ResNet and MobileNet bodies keep torchvision's parameter names (minus ``fc`` /
``classifier``), so a torchvision state dict loads into them as is.

Two options make a ResNet-50/101 body behave like the reference's ``net/resnet_atrous.py``
(SDR §4.1; the ``paper`` profile sets both), with the same parameters and names:

* ``dilation="reference"``: every block of a dilated stage has the stage's dilation on its
  3×3 conv, the first block included (ResNet-101 at OS 16: layer4 = 2, 2, 2; ResNet-50 uses
  the reference's multi-grid 1, 2, 1; OS 8 doubles them and dilates layer3 by 2).
  ``"torchvision"`` (default): ``replace_stride_with_dilation``, whose first block keeps the
  previous stage's dilation (layer4 at OS 16: 1, 2, 2). The reference has no other
  backbone; ResNet-18, MobileNetV3 and the tiny CNN keep their own dilation under either.
* ``bn_momentum``: momentum of every BatchNorm of the body (reference 0.0003); ``None`` keeps
  the backbone's own (torchvision ResNets 0.1, MobileNetV3 0.01).
"""

from __future__ import annotations

import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from csseg_core.errors import ConfigError

if TYPE_CHECKING:
    import torchvision


def _tv_models():
    """``torchvision.models``, imported on first use: importing torchvision costs ~2 s (it pulls
    in ``torch._dynamo``), paid by every Ray worker process, while the tiny backbone needs none."""
    import torchvision.models

    return torchvision.models

__all__ = ["BACKBONES", "DILATIONS", "build_body", "load_body_weights", "ResNetBody", "MobileNetBody", "TinyBody"]

BACKBONES: tuple[str, ...] = ("resnet101", "resnet50", "resnet18", "mobilenet_v3_large", "tiny")

# Backbones and the output strides they support.
_OUTPUT_STRIDES: dict[str, tuple[int, ...]] = {
    "resnet101": (16, 8),
    "resnet50": (16, 8),
    "resnet18": (16, 8),
    "mobilenet_v3_large": (16,),
    "tiny": (16, 8),
}


class ResNetBody(nn.Module):
    """A torchvision ResNet up to ``layer4`` (no pooling, no ``fc``).

    Args:
        net: The torchvision ResNet whose layers are adopted.
    """

    def __init__(self, net: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        last = net.layer4[-1]
        self.out_channels = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class MobileNetBody(nn.Module):
    """The ``features`` of a torchvision MobileNetV3 (960 channels for the large model).

    Args:
        net: The torchvision MobileNetV3 whose ``features`` are adopted.
    """

    def __init__(self, net: torchvision.models.MobileNetV3) -> None:
        super().__init__()
        self.features = net.features
        self.out_channels = net.features[-1].out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyBody(nn.Module):
    """A small plain CNN (conv-BN-ReLU, standard BatchNorm) that trains fast on a CPU.

    A stride-2 stem and four stages of two 3×3 convolutions, widths 24-32-64-96-128.
    Stages 1-3 halve the resolution while the total stride is below ``output_stride``;
    beyond it they keep the resolution and dilate instead, as the atrous ResNets do.

    Args:
        output_stride: 8 or 16.
        widths: Channels of the stem and of the four stages.
    """

    def __init__(self, output_stride: int = 16, widths: tuple[int, ...] = (24, 32, 64, 96, 128)) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, widths[0], stride=2)
        stride, dilation = 2, 1
        for i in range(1, 5):
            if stride < output_stride:
                step, stride = 2, stride * 2
            else:
                step, dilation = 1, dilation * 2
            stage = nn.Sequential(
                _conv_bn_relu(widths[i - 1], widths[i], stride=step, dilation=dilation if step == 1 else 1),
                _conv_bn_relu(widths[i], widths[i], dilation=dilation),
            )
            self.add_module(f"stage{i}", stage)
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))


def _dilate_basic_layer(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """Turn the stride of a BasicBlock stage into dilation (torchvision refuses to).

    Mirrors ``replace_stride_with_dilation`` for Bottleneck stages: the first block keeps
    the ``previous`` dilation on its strided conv, every other 3×3 conv gets ``dilation``.
    """
    for i, block in enumerate(layer):
        convs = [(block.conv1, previous if i == 0 else dilation), (block.conv2, dilation)]
        for conv, d in convs:
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


DILATIONS: tuple[str, ...] = ("torchvision", "reference")
# Per-block dilation of layer4 at output stride 16 in the reference's resnet_atrous
# (multi-grid); at output stride 8 it doubles and layer3 gets 2 in every block.
_REFERENCE_GRID = {"resnet101": (2, 2, 2), "resnet50": (1, 2, 1)}


def _reference_dilation(net: nn.Module, name: str, output_stride: int) -> None:
    """Set every 3×3 conv of layer3/layer4 to the reference's per-block dilation."""
    scale = 16 // output_stride
    plan = {"layer3": [scale] * len(net.layer3), "layer4": [d * scale for d in _REFERENCE_GRID[name]]}
    for layer, dilations in plan.items():
        for block, d in zip(getattr(net, layer), dilations):
            block.conv2.dilation, block.conv2.padding = (d, d), (d, d)


def _make_resnet(name: str, output_stride: int, dilation: str = "torchvision") -> nn.Module:
    dilate = [False, False, True] if output_stride == 16 else [False, True, True]
    builder: Callable[..., torchvision.models.ResNet] = getattr(_tv_models(), name)
    if dilation == "reference" and name in _REFERENCE_GRID:
        net = builder(weights=None, replace_stride_with_dilation=dilate)
        _reference_dilation(net, name, output_stride)
        return ResNetBody(net)
    if name != "resnet18":
        return ResNetBody(builder(weights=None, replace_stride_with_dilation=dilate))
    net = builder(weights=None)
    if output_stride == 8:
        _dilate_basic_layer(net.layer3, previous=1, dilation=2)
        _dilate_basic_layer(net.layer4, previous=2, dilation=4)
    else:
        _dilate_basic_layer(net.layer4, previous=1, dilation=2)
    return ResNetBody(net)


def _imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    enum_name = {
        "resnet101": "ResNet101_Weights",
        "resnet50": "ResNet50_Weights",
        "resnet18": "ResNet18_Weights",
        "mobilenet_v3_large": "MobileNet_V3_Large_Weights",
    }[name]
    return getattr(_tv_models(), enum_name).IMAGENET1K_V1


def _download_imagenet(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights (from the torch hub cache or the network)."""
    weights = _imagenet_weights(name)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, urllib.error.URLError, RuntimeError, ValueError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise ConfigError(
            f"cannot get ImageNet weights for backbone {name!r} ({reason}); "
            "use --pretrained PATH (a local torchvision state dict) or --no-pretrained"
        ) from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(
            f"pretrained weights file not found: {path} (give --pretrained PATH to an existing state dict, or --no-pretrained)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error
        raise ConfigError(f"cannot read pretrained weights {path}: {type(err).__name__}: {err}") from None
    for key in ("state_dict", "model_state", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"pretrained weights {path} hold a {type(state).__name__}, not a state dict")
    return state


def load_body_weights(body: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a torchvision-style state dict into a body, strictly for the body's keys.

    ``module.`` / ``body.`` / ``backbone.`` prefixes are stripped and ``fc.*`` /
    ``classifier.*`` keys ignored.

    Args:
        body: The body to fill.
        state: The state dict.
        source: What the weights are (a path or "ImageNet"), for error messages.

    Raises:
        ConfigError: When keys are missing or shapes differ (e.g. another architecture).
    """
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "body.", "backbone."):
            key = key.removeprefix(prefix)
        if not key.startswith(("fc.", "classifier.")):
            cleaned[key] = value
    own = body.state_dict()
    needed = [k for k in own if not k.endswith("num_batches_tracked")]
    missing = [k for k in needed if k not in cleaned]
    if len(missing) == len(needed):
        sample = ", ".join(list(cleaned)[:3]) or "none"
        raise ConfigError(
            f"pretrained weights {source} match no key of this backbone "
            f"(expected e.g. {needed[0]!r}, found {sample}); is it a state dict of the same torchvision model?"
        )
    if missing:
        raise ConfigError(
            f"pretrained weights {source} lack {len(missing)} of {len(needed)} backbone keys "
            f"(first: {', '.join(missing[:3])}); is it the same architecture?"
        )
    require_same_shapes(cleaned, own, needed, f"pretrained weights {source}", "is it the same architecture?")
    body.load_state_dict({k: v for k, v in cleaned.items() if k in own}, strict=False)


def require_same_shapes(state: dict, own: dict, keys, source: str, hint: str) -> None:
    """One-line ConfigError when a tensor of ``keys`` has another shape in ``state`` than in ``own``."""
    wrong = [k for k in keys if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"{source}: {len(wrong)} tensor(s) of another shape, e.g. {k} has shape "
                          f"{tuple(state[k].shape)}, expected {tuple(own[k].shape)} ({hint})")


def build_body(name: str, output_stride: int = 16, pretrained: str | Path | None = None, *,
               dilation: str = "torchvision", bn_momentum: float | None = None) -> nn.Module:
    """Build a backbone, optionally with pretrained weights.

    Args:
        name: One of :data:`BACKBONES`.
        output_stride: 16 or 8 (MobileNetV3: 16 only).
        pretrained: None / ``"none"`` (random init), ``"imagenet"`` (torchvision weights,
            downloaded or from the torch hub cache) or the path of a local state dict of the
            torchvision model (or of the reference's ``resnet_atrous``: the same names).
        dilation: ``"torchvision"`` or ``"reference"`` (changes ResNet-50/101 only; see the module doc).
        bn_momentum: Momentum of the body's BatchNorms; None keeps the backbone's own.

    Returns:
        The body module, with an ``out_channels`` attribute.

    Raises:
        ConfigError: Unknown backbone, unsupported output stride or unusable weights.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if output_stride not in _OUTPUT_STRIDES[name]:
        allowed = " or ".join(map(str, _OUTPUT_STRIDES[name]))
        raise ConfigError(f"backbone {name!r} supports output stride {allowed}, not {output_stride}")
    if dilation not in DILATIONS:
        raise ConfigError(f"unknown dilation {dilation!r}; choose one of {', '.join(DILATIONS)}")
    if bn_momentum is not None and not 0.0 < bn_momentum <= 1.0:
        raise ConfigError(f"bn_momentum must be in (0, 1] (got {bn_momentum}); e.g. --set bn_momentum=0.0003")
    if name == "tiny":
        body: nn.Module = TinyBody(output_stride)
    elif name == "mobilenet_v3_large":
        body = MobileNetBody(_tv_models().mobilenet_v3_large(weights=None, dilated=True))
    else:
        body = _make_resnet(name, output_stride, dilation)
    if bn_momentum is not None:
        for module in body.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum

    if pretrained is None or (isinstance(pretrained, str) and pretrained.lower() in ("", "none")):
        return body
    if isinstance(pretrained, str) and pretrained.lower() == "imagenet":
        if name == "tiny":
            raise ConfigError("the 'tiny' backbone has no ImageNet weights; use --no-pretrained or --pretrained PATH")
        load_body_weights(body, _download_imagenet(name), "ImageNet")
    else:
        path = Path(pretrained).expanduser()
        load_body_weights(body, _read_state_dict(path), str(path))
    return body
