"""DeepLabV3 incremental segmenter: shapes, MiB init, step loading, BN freezing, weights."""

from __future__ import annotations

import math
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from csseg_core.errors import ConfigError
from csseg_core.models import build_model, load_previous

BODY_CHANNELS = {"tiny": 128, "resnet18": 512, "resnet50": 2048, "resnet101": 2048, "mobilenet_v3_large": 960}
# (backbone, output stride, device). The big ResNets' other variants are shape-checked on the
# meta device: no weight init and no arithmetic, so the suite stays fast on 2 CPU cores.
CASES = [
    ("tiny", 16, "cpu"),
    ("tiny", 8, "cpu"),
    ("resnet18", 16, "cpu"),
    ("resnet18", 8, "cpu"),
    ("resnet50", 16, "cpu"),
    ("resnet50", 8, "meta"),
    ("mobilenet_v3_large", 16, "cpu"),
    ("resnet101", 16, "meta"),
    ("resnet101", 8, "meta"),
]


@pytest.mark.parametrize(("backbone", "output_stride", "device"), CASES)
def test_backbone_shapes(backbone, output_stride, device):
    torch.manual_seed(0)
    with torch.device(device), torch.no_grad():
        model = build_model(backbone, (16, 1), output_stride=output_stride).eval()
        logits, feats = model(torch.randn(2, 3, 64, 64))
    h = 64 // output_stride
    assert model.body_channels == BODY_CHANNELS[backbone]
    assert model.num_classes == 17
    assert logits.shape == (2, 17, 64, 64)
    assert feats["body"].shape == (2, BODY_CHANNELS[backbone], h, h)
    assert feats["pre_logits"].shape == (2, 256, h, h)
    if device == "cpu":
        assert torch.isfinite(logits).all()


def test_tiny_trains_and_upsamples_to_odd_sizes():
    model = build_model("tiny", (3, 2), output_stride=8, head_channels=32)
    logits, feats = model(torch.randn(2, 3, 50, 70))
    assert logits.shape == (2, 5, 50, 70) and feats["pre_logits"].shape[1] == 32
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backbone": "vgg16"},
        {"backbone": "mobilenet_v3_large", "output_stride": 8},
        {"backbone": "tiny", "output_stride": 32},
        {"backbone": "tiny", "classes_per_step": ()},
        {"backbone": "tiny", "classes_per_step": (16, 0)},
        {"backbone": "tiny", "head_channels": 0},
        {"backbone": "tiny", "pretrained": "imagenet"},
    ],
)
def test_bad_options_raise_config_error(kwargs):
    kwargs = {"classes_per_step": (16, 1), **kwargs}
    with pytest.raises(ConfigError):
        build_model(kwargs.pop("backbone"), kwargs.pop("classes_per_step"), **kwargs)


def _trained_like_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    old = build_model("tiny", (16,), head_channels=32).eval()
    with torch.no_grad():  # give the classifier non-trivial values
        old.cls[0].bias.normal_()
    new = build_model("tiny", (16, 1), head_channels=32).eval()
    return old, new


def test_load_previous_keeps_old_outputs():
    old, new = _trained_like_pair()
    missing = load_previous(new, old.state_dict())
    assert missing == ["cls.1.weight", "cls.1.bias"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        old_logits, old_feats = old(x)
        new_logits, new_feats = new(x)
    assert torch.equal(new_logits[:, :16], old_logits)
    assert torch.equal(new_feats["body"], old_feats["body"])
    # a same-step state, with a DDP "module." prefix and as numpy arrays, loads too
    prefixed = {f"module.{k}": v.numpy() for k, v in new.state_dict().items()}
    assert load_previous(build_model("tiny", (16, 1), head_channels=32), prefixed) == []


@pytest.mark.parametrize(
    ("backbone", "steps", "head_channels"),
    [("resnet18", (16,), 32), ("tiny", (16, 1, 1), 32), ("tiny", (16,), 64), ("tiny", (15,), 32)],
)
def test_load_previous_rejects_other_models(backbone, steps, head_channels):
    other = build_model(backbone, steps, head_channels=head_channels)
    model = build_model("tiny", (16, 1), head_channels=32)
    with pytest.raises(ConfigError):
        load_previous(model, other.state_dict())


def test_init_balanced_weights_and_probability_mass():
    old, new = _trained_like_pair()
    load_previous(new, old.state_dict())
    b_bg = old.cls[0].bias[0].item()
    new.init_balanced()
    expected = b_bg - math.log(1 + 1)
    assert torch.equal(new.cls[1].weight[0], old.cls[0].weight[0])
    assert new.cls[1].bias.tolist() == pytest.approx([expected])
    assert new.cls[0].bias[0].item() == pytest.approx(expected)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        p_old = old(x)[0].softmax(1)
        p_new = new(x)[0].softmax(1)
    torch.testing.assert_close(p_new[:, 0] + p_new[:, 16], p_old[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(p_new[:, 1:16], p_old[:, 1:16], rtol=0, atol=1e-5)


def test_init_balanced_several_new_classes_and_noop():
    model = build_model("tiny", (4, 3), head_channels=16)
    b_bg = model.cls[0].bias[0].item()
    model.init_balanced()
    assert model.cls[1].bias.tolist() == pytest.approx([b_bg - math.log(4)] * 3)
    assert torch.equal(model.cls[1].weight, model.cls[0].weight[0:1].expand(3, -1, -1, -1))
    single = build_model("tiny", (4,), head_channels=16)
    before = {k: v.clone() for k, v in single.state_dict().items()}
    single.init_balanced()
    assert all(torch.equal(before[k], v) for k, v in single.state_dict().items())


def test_fix_bn_and_param_groups():
    model = build_model("tiny", (4, 2), head_channels=16)
    groups = model.param_groups(1e-4)
    assert [g["name"] for g in groups] == ["body", "head", "cls"]
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())

    model.fix_bn()
    model.train()
    bn = model.body.stem[1]
    assert not bn.training and not bn.weight.requires_grad
    mean_before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(bn.running_mean, mean_before)
    trainable = {id(p) for g in model.param_groups(0.0) for p in g["params"]}
    assert id(bn.weight) not in trainable and id(model.cls[1].weight) in trainable


def _resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()


def test_pretrained_from_local_path_round_trips(tmp_path):
    state = _resnet18_state()
    path = tmp_path / "r18.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # fc.* kept: ignored
    model = build_model("resnet18", (16, 1), pretrained=str(path))
    body = model.body.state_dict()
    assert set(body) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(body[k], state[k]) for k in body)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_model("resnet18", (16,), pretrained=tmp_path / "missing.pth")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "foo.pth")
    with pytest.raises(ConfigError, match="match no key"):
        build_model("resnet18", (16,), pretrained=tmp_path / "foo.pth")
    torch.save(_resnet18_state(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError):
        build_model("resnet50", (16,), pretrained=tmp_path / "r18.pth")


def test_imagenet_offline_gives_one_line_config_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as info:
        build_model("resnet18", (16,), pretrained="imagenet")
    message = str(info.value)
    assert "--pretrained PATH" in message and "--no-pretrained" in message and "\n" not in message


def test_imagenet_weights_are_loaded_when_available(monkeypatch):
    state = _resnet18_state()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: state)
    model = build_model("resnet18", (16,), pretrained="imagenet")
    assert torch.equal(model.body.conv1.weight, state["conv1.weight"])


def test_tiny_backbone_never_imports_torchvision():
    """Every Ray worker imports the engine: torchvision (~2 s, it pulls in torch._dynamo) is loaded only
    when a torchvision backbone is built, not by the tiny one or by the CLI."""
    code = ("import sys, cli, csseg_core.engine; from csseg_core.models import build_model; "
            "build_model('tiny', (3, 2), output_stride=8, head_channels=8); assert 'torchvision' not in sys.modules, 'tiny'; "
            "build_model('resnet18', (3,), head_channels=8); assert 'torchvision' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("size", [5, 6, 7, 12])
def test_atrous_branches_equal_the_full_convolution_at_every_map_size(size):
    """Rate ≥ map size takes the 1×1 centre-tap shortcut; the output and every gradient
    (the off-centre taps' zero ones included) must equal the full 3×3 dilated convolution."""
    from csseg_core.models import ASPPHead
    from csseg_core.models.deeplab import _atrous

    torch.manual_seed(0)
    head = ASPPHead(8, 6, output_stride=16).double()  # rates 6, 12, 18: 5 and 6 px maps take the shortcut for all
    x = torch.randn(2, 8, size, size, dtype=torch.double, requires_grad=True)
    full_calls = []
    for conv in head.map_convs:
        hook = conv.register_forward_pre_hook(lambda module, args: full_calls.append(module.dilation[0]))
        fast = _atrous(conv, x)
        hook.remove()
        full = conv(x)
        torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(full)
        gw_fast, gx_fast = torch.autograd.grad(fast, (conv.weight, x), g)
        gw_full, gx_full = torch.autograd.grad(full, (conv.weight, x), g)
        torch.testing.assert_close(gw_fast, gw_full, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx_fast, gx_full, rtol=1e-12, atol=1e-12)
    # the full convolution runs exactly where the rate is below the map size (its taps see data)
    assert full_calls == [1] + [rate for rate in (6, 12, 18) if rate < size]


@pytest.mark.parametrize("shape_in,size", [((8, 8), (64, 64)), ((12, 12), (96, 96)), ((7, 9), (50, 61)),
                                           ((13, 11), (100, 90)), ((16, 16), (5, 7)), ((6, 6), (6, 6)), ((1, 3), (4, 9))])
def test_upsample_bilinear_equals_interpolate_and_its_gradient(shape_in, size):
    """The logits' upsampling as two matrix products: the values and the input gradient of
    ``F.interpolate(mode="bilinear", align_corners=False)`` at integer and non-integer ratios, both
    directions, channels-last input included; the model's forward uses it."""
    import torch.nn.functional as F

    from csseg_core.models.deeplab import upsample_bilinear

    torch.manual_seed(0)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 5, *shape_in, dtype=torch.double).to(memory_format=layout).requires_grad_()
        ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        out = upsample_bilinear(x, size)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-12, atol=1e-12)
    model = build_model("tiny", (3, 2), output_stride=8, head_channels=8).double().eval()
    image = torch.randn(1, 3, 40, 56, dtype=torch.double)
    logits, feats = model(image)
    pre = feats["pre_logits"]
    expected = F.interpolate(torch.cat([cls(pre) for cls in model.cls], 1), size=(40, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
