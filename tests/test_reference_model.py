"""The ``paper`` model equals the official SDR network (LTTM/SDR ``make_model_v2``).

``Official*`` below is a test fixture: a small, independent description of the official
architecture's behaviour, written from reading ``net/resnet_atrous.py``, ``modules/deeplab.py``
and ``segmentation_module.py`` (LTTM/SDR 8638296); no code of it is reproduced. It keeps the
official module names, so its ``state_dict()`` has the official checkpoint's layout.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csseg_core.config import REFERENCE_MODEL, resolve_config
from csseg_core.errors import ConfigError
from csseg_core.models import ASPPHead, build_model
from csseg_core.models.official import to_csseg_name, to_official_name

BN_MOMENTUM = 0.0003  # net/resnet_atrous.py, every BatchNorm of the body
PAPER = dict(output_stride=16, head_channels=256, bn_momentum=0.0003, backbone_dilation="reference",
             head_act="none", pool_window=32)


class OfficialBottleneck(nn.Module):
    """1×1 → 3×3 (stride, dilation d, padding d) → 1×1 ×4, BN after each, ReLU, residual."""

    def __init__(self, cin: int, width: int, stride: int, dilation: int, project: bool) -> None:
        super().__init__()
        out = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU()
        self.downsample = (nn.Sequential(nn.Conv2d(cin, out, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(out, momentum=BN_MOMENTUM)) if project else None)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (self.downsample(x) if self.downsample is not None else x))


class OfficialAtrousResNet101(nn.Module):
    """ResNet-101 at output stride 16: layer strides 1, 2, 2, 1; layer3 dilation 1 in every
    block; layer4 dilation 2 in every block (multi-grid [2, 2, 2]), the first one included."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        plan = [(64, 3, 1, [1] * 3), (128, 4, 2, [1] * 4), (256, 23, 2, [1] * 23), (512, 3, 1, [2, 2, 2])]
        cin = 64
        for i, (width, blocks, stride, dilations) in enumerate(plan, start=1):
            layer = []
            for b in range(blocks):
                project = b == 0 and (stride != 1 or cin != 4 * width)
                layer.append(OfficialBottleneck(cin, width, stride if b == 0 else 1, dilations[b], project))
                cin = 4 * width
            setattr(self, f"layer{i}", nn.Sequential(*layer))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class OfficialDeeplabV3(nn.Module):
    """ASPP with plain BatchNorm (no activation). Image pool: global mean in training; at eval
    a stride-1 average over a min(32, h)×min(32, w) window, replicate-padded back to h×w."""

    def __init__(self, cin: int, cout: int = 256, hidden: int = 256, pooling_size: int = 32) -> None:
        super().__init__()
        self.pooling_size = pooling_size
        self.map_convs = nn.ModuleList([nn.Conv2d(cin, hidden, 1, bias=False)] + [
            nn.Conv2d(cin, hidden, 3, padding=r, dilation=r, bias=False) for r in (6, 12, 18)])
        self.map_bn = nn.BatchNorm2d(4 * hidden)
        self.global_pooling_conv = nn.Conv2d(cin, hidden, 1, bias=False)
        self.global_pooling_bn = nn.BatchNorm2d(hidden)
        self.red_conv = nn.Conv2d(4 * hidden, cout, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self.red_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        h, w = x.shape[2:]
        out = self.red_conv(self.map_bn(torch.cat([conv(x) for conv in self.map_convs], 1)))
        if self.training:
            pool = x.flatten(2).mean(-1)[:, :, None, None]
        else:
            ph, pw = min(self.pooling_size, h), min(self.pooling_size, w)
            pool = F.avg_pool2d(x, (ph, pw), stride=1)
            pad_w = ((pw - 1) // 2, (pw - 1) // 2 + (0 if pw % 2 else 1))
            pad_h = ((ph - 1) // 2, (ph - 1) // 2 + (0 if ph % 2 else 1))
            pool = F.pad(pool, (*pad_w, *pad_h), mode="replicate")
        pool = self.pool_red_conv(self.global_pooling_bn(self.global_pooling_conv(pool)))
        if self.training:
            pool = pool.repeat(1, 1, h, w)
        return self.red_bn(out + pool)


class OfficialIncremental(nn.Module):
    def __init__(self, classes: list[int], body: nn.Module | None = None, head: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body or OfficialAtrousResNet101()
        self.head = head or OfficialDeeplabV3(2048)
        self.cls = nn.ModuleList([nn.Conv2d(256, c, 1) for c in classes])

    def forward(self, x):
        pre = self.head(self.body(x))
        logits = torch.cat([c(pre) for c in self.cls], 1)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    """Trained-looking BN statistics, so that momentum and activations matter."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))


def _copy_into_ours(official: nn.Module, ours: nn.Module) -> None:
    ours.load_state_dict({to_csseg_name(k): v for k, v in official.state_dict().items()}, strict=True)


@pytest.fixture(scope="module")
def official():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = OfficialIncremental([16, 1])
    _randomise_bn(net)
    return net


def test_paper_profile_sets_the_reference_model():
    cfg = resolve_config("voc-15-1", "sdr", profile="paper")
    assert cfg.model_kwargs() == PAPER and {k: getattr(cfg, k) for k in REFERENCE_MODEL} == REFERENCE_MODEL
    smoke = resolve_config("voc-15-1", "sdr", profile="smoke")
    assert smoke.model_kwargs()["bn_momentum"] is None and smoke.head_act == "relu" and smoke.pool_window == 0
    tiny = resolve_config("voc-15-1", "ft", profile="paper", overrides={"backbone": "tiny", "pretrained": "none"})
    assert tiny.backbone_dilation == "reference"  # no reference counterpart: the tiny CNN keeps its own
    with pytest.raises(ConfigError, match="head_act must be one of relu, none"):
        resolve_config("voc-15-1", "ft", overrides={"head_act": "gelu"})


def test_state_dicts_map_one_to_one_both_variants(official):
    names = list(official.state_dict())
    for kwargs in (PAPER, dict(output_stride=16)):
        with torch.device("meta"):
            ours = build_model("resnet101", (16, 1), **kwargs).state_dict()
        mapped = [to_csseg_name(k) for k in names]
        assert sorted(mapped) == sorted(ours) and len(set(mapped)) == len(names)
        assert all(tuple(official.state_dict()[k].shape) == tuple(ours[to_csseg_name(k)].shape) for k in names)
        assert all(to_official_name(to_csseg_name(k)) == k for k in names)
    n = sum(p.numel() for p in official.parameters())
    assert n == sum(v.numel() for k, v in official.state_dict().items() if "running" not in k and "num_batches" not in k)
    assert to_csseg_name("module.head.global_pooling_conv.weight") == "head.pool_conv.weight"


def test_paper_model_equals_official_eval_and_one_training_step(official):
    torch.manual_seed(1)
    ours = build_model("resnet101", (16, 1), **PAPER)
    default = build_model("resnet101", (16, 1), output_stride=16)
    _copy_into_ours(official, ours)
    _copy_into_ours(official, default)
    assert ours.body.layer4[0].conv2.dilation == (2, 2) and default.body.layer4[0].conv2.dilation == (1, 1)
    ref = OfficialIncremental([16, 1])
    ref.load_state_dict(official.state_dict())
    x = torch.randn(2, 3, 65, 65)
    target = torch.randint(0, 17, (2, 65, 65))
    target[:, :5] = 255
    with torch.no_grad():
        a, b, c = ref.eval()(x), ours.eval()(x)[0], default.eval()(x)[0]
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-2  # torchvision's dilation, BN+ReLU head: not the official network

    losses = []
    for net, logits_of in ((ref, lambda m, t: m(t)), (ours, lambda m, t: m(t)[0])):
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
        loss = F.cross_entropy(logits_of(net, x), target, ignore_index=255, reduction="none").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            after = F.cross_entropy(logits_of(net, x), target, ignore_index=255, reduction="none").mean()
            net.eval()
            logits = logits_of(net, x)
        losses.append((loss.item(), after.item(), logits))
    (l0, l1, e0), (m0, m1, e1) = losses
    assert abs(l0 - m0) < 1e-4 and abs(l1 - m1) < 1e-4
    assert (e0 - e1).abs().max() < 1e-4  # same update and the same BN running statistics (momentum 0.0003)
    bn = ours.body.layer1[0].bn1
    assert bn.momentum == BN_MOMENTUM and ours.head.map_bn.momentum == 0.1


@pytest.mark.parametrize(("h", "w"), [(40, 37), (20, 20), (33, 64)])
def test_eval_pooling_window_matches_official_above_32(h, w):
    torch.manual_seed(0)
    ref = OfficialDeeplabV3(8, 6, 6)
    _randomise_bn(ref)
    ours, glob = ASPPHead(8, 6, 16, act="none", pool_window=32), ASPPHead(8, 6, 16, act="none")
    for head in (ours, glob):
        head.load_state_dict({to_csseg_name(f"head.{k}").removeprefix("head."): v for k, v in ref.state_dict().items()})
    x = torch.randn(2, 8, h, w)
    with torch.no_grad():
        a, b, c = ref.eval()(x), ours.eval()(x), glob.eval()(x)
    assert a.shape == b.shape == (2, 6, h, w) and (a - b).abs().max() < 1e-5
    if max(h, w) <= 32:
        assert (b - c).abs().max() < 1e-5  # the window covers the map: the global mean
    else:
        assert (b - c).abs().max() > 1e-3
    ref.train(), ours.train()
    assert (ref(x) - ours(x)).abs().max() < 1e-5  # training: the global mean


@pytest.mark.parametrize(("backbone", "os_", "layer3", "layer4"), [
    ("resnet101", 16, 1, (2, 2, 2)), ("resnet101", 8, 2, (4, 4, 4)), ("resnet50", 16, 1, (1, 2, 1)), ("resnet50", 8, 2, (2, 4, 2))])
def test_reference_dilation_per_block(backbone, os_, layer3, layer4):
    with torch.device("meta"):
        model = build_model(backbone, (3,), output_stride=os_, backbone_dilation="reference", bn_momentum=0.0003)
        torchvision_like = build_model(backbone, (3,), output_stride=os_)
    assert {b.conv2.dilation[0] for b in model.body.layer3} == {layer3}
    assert tuple(b.conv2.dilation[0] for b in model.body.layer4) == layer4
    assert all(b.conv2.padding == b.conv2.dilation for b in model.body.layer4)
    assert torchvision_like.body.layer4[0].conv2.dilation[0] == layer4[1] // 2
    assert {m.momentum for m in model.body.modules() if isinstance(m, nn.BatchNorm2d)} == {0.0003}
    with pytest.raises(ConfigError, match="unknown dilation"):
        build_model(backbone, (3,), backbone_dilation="multigrid")


def test_official_checkpoint_maps_by_name(official):
    """A checkpoint in the official ``save_ckpt`` layout, with the fixture's (= official) names."""
    from csseg_core.models.official import state_from_official

    cfg = resolve_config("voc-15-1", "ewc", profile="paper")
    sd = official.state_dict()
    fisher = {k: torch.rand(v.shape) for k, v in official.named_parameters()}
    ckpt = {"model_state": {f"module.{k}": v for k, v in sd.items()}, "best_score": 0.0, "epoch": 30,
            "trainer_state": {"regularizer": {"name": "ewc", "fisher": fisher, "alpha": 0.9}},
            "prototypes": torch.rand(17, 2048), "count_features": torch.arange(17)}
    state = state_from_official(ckpt, cfg, "19-1-voc_SDR_1.pth")
    assert state["step"] == 1 and state["model"]["head.pool_bn.running_var"] is sd["head.global_pooling_bn.running_var"]
    assert set(state["statistics"]["fisher"]) == {to_csseg_name(k) for k in fisher}
    assert state["statistics"]["prototypes"].shape == (17, 2048)
    ckpt["model_state"]["module.head.aspp.0.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"key 'module.head.aspp.0.weight' does not map"):
        state_from_official(ckpt, cfg, "x.pth")
    del ckpt["model_state"]["module.head.aspp.0.weight"]
    small = resolve_config("voc-15-1", "ft", profile="paper", overrides={"backbone": "resnet50"})
    with pytest.raises(ConfigError, match="does not map|lacks"):
        state_from_official(ckpt, small, "x.pth")


def test_pretrained_accepts_the_official_backbone_and_model_state(official, tmp_path):
    """--pretrained: the official ``resnet_atrous`` body's state dict (torchvision names, no
    ``fc``) or a whole official ``model_state`` (``module.body.*`` + head + classifiers)."""
    from csseg_core.models import load_body_weights
    from csseg_core.models.backbones import _read_state_dict

    body = build_model("resnet101", (3,), **PAPER).body
    load_body_weights(body, official.body.state_dict(), "resnet101_atrous")
    assert torch.equal(body.layer4[2].bn3.running_var, official.body.layer4[2].bn3.running_var)
    body.layer1[0].conv1.weight.data.zero_()
    load_body_weights(body, {f"module.{k}": v for k, v in official.state_dict().items()}, "model_state")
    assert torch.equal(body.layer1[0].conv1.weight, official.body.layer1[0].conv1.weight)
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state": {"module.body.conv1.weight": official.body.conv1.weight.detach()}, "epoch": 1}, path)
    assert list(_read_state_dict(path)) == ["module.body.conv1.weight"]
