"""Synthetic generator: real layout, determinism, class coverage, default root."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from csseg_core.data import build_datasets, synth
from csseg_core.errors import ConfigError


def _digest(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return synth.generate(
        tmp_path_factory.mktemp("s"), "voc", n_train=40, n_val=20, size=48, seed=7
    )


def test_real_voc_layout(voc_root: Path) -> None:
    voc = voc_root / "VOCdevkit" / "VOC2012"
    train = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(train) == 40 and len(val) == 20 and not set(train) & set(val)
    for i in train[:3] + val[:3]:
        with Image.open(voc / "JPEGImages" / f"{i}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 48)
        with Image.open(voc / "SegmentationClass" / f"{i}.png") as lb:
            assert lb.mode == "P" and lb.size == (48, 48)
            assert lb.getpalette()[15 * 3 : 16 * 3] == [192, 128, 128]  # VOC colour of person


def test_every_class_in_train_and_val_with_void_border(voc_root: Path) -> None:
    voc = voc_root / "VOCdevkit" / "VOC2012"
    for split in ("train", "val"):
        ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        present = set()
        for i in ids:
            present |= set(
                np.unique(np.asarray(Image.open(voc / "SegmentationClass" / f"{i}.png"))).tolist()
            )
        assert set(range(21)) | {255} == present, split


def test_deterministic_per_seed(tmp_path: Path) -> None:
    kw = dict(n_train=20, n_val=20, size=40)
    a = _digest(synth.generate(tmp_path / "a", "voc", seed=1, **kw))
    b = _digest(synth.generate(tmp_path / "b", "voc", seed=1, workers=1, **kw))
    c = _digest(synth.generate(tmp_path / "c", "voc", seed=2, **kw))
    assert a == b and a != c


def test_loaded_by_real_readers(voc_root: Path, tmp_path: Path) -> None:
    ds = build_datasets(
        "voc", voc_root, "voc-10-10", "overlapped", 1, crop_size=32, cache_dir=tmp_path
    )
    assert min(len(d) for d in ds.values()) > 0
    image, label = ds["train"][0]
    assert image.shape == (3, 32, 32) and int(label.max()) <= 20


def test_ade_layout(tmp_path: Path) -> None:
    root = synth.generate(tmp_path, "ade", n_train=150, n_val=150, size=32, seed=0)
    ade = root / "ADEChallengeData2016"
    labels = sorted((ade / "annotations" / "training").glob("*.png"))
    assert len(labels) == 150 and len(list((ade / "images" / "validation").glob("*.jpg"))) == 150
    present = set()
    for p in labels:
        with Image.open(p) as im:
            assert im.mode == "L"
            present |= set(np.unique(np.asarray(im)).tolist())
    assert present == set(range(151))


def test_class_styles_distinct() -> None:
    for n in (20, 150):
        keys = {
            (tuple(np.round(s["rgb"], 3)), s["texture"], s["period"], s["angle"], s["shape"])
            for s in (synth.class_style(c, n) for c in range(1, n + 1))
        }
        assert len(keys) == n


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        synth.generate(tmp_path, "voc", n_train=5, n_val=30)
    with pytest.raises(ConfigError):
        synth.generate(tmp_path, "coco")


def test_default_data_root(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CSSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(synth.DEFAULTS, "voc", {"n_train": 20, "n_val": 20, "size": 32})
    real = synth.generate

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synth.default_data_root("voc")
    assert not any((tmp_path / "home" / "synthetic").iterdir()), "partial output must not remain"
    monkeypatch.setattr(synth, "generate", real)
    root = synth.default_data_root("voc")
    assert root.parent == tmp_path / "home" / "synthetic" and root.name.startswith("voc-")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "synthetic" in err[0] and str(root) in err[0]
    monkeypatch.setattr(synth, "generate", lambda *a, **k: pytest.fail("regenerated"))
    assert synth.default_data_root("voc") == root
    ds = build_datasets(
        "voc",
        None,
        "voc-15-5",
        "disjoint",
        0,
        crop_size=32,
        cache_dir=tmp_path / "c",
        splits=("val",),
    )
    assert len(ds["val"]) > 0


@pytest.mark.parametrize("style", ["blobs", "polygons"])
def test_styles_differ_deterministic_every_class(tmp_path: Path, style: str) -> None:
    kw = dict(n_train=24, n_val=21, size=48, seed=3)
    default = synth.generate(tmp_path / "d", "voc", **kw)
    a = synth.generate(tmp_path / "a", "voc", style=style, **kw)
    b = synth.generate(tmp_path / "b", "voc", style=style, workers=1, **kw)
    assert _digest(a) == _digest(b) != _digest(default)
    voc = a / "VOCdevkit" / "VOC2012"
    for split in ("train", "val"):
        ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        present = set()
        for i in ids:
            present |= set(np.unique(np.asarray(Image.open(voc / "SegmentationClass" / f"{i}.png"))).tolist())
        assert set(range(21)) | {255} == present, split
    img_a = np.asarray(Image.open(voc / "JPEGImages" / f"{ids[0]}.jpg"), dtype=np.float32)
    img_d = np.asarray(Image.open(default / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{ids[0]}.jpg"), dtype=np.float32)
    assert np.abs(img_a - img_d).mean() > 10  # a different picture, not a re-encoding


@pytest.mark.parametrize("style", ["default", "blobs", "polygons"])
def test_clutter_adds_unlabelled_objects_and_keeps_the_labelled_ones(style: str) -> None:
    """``--clutter N`` draws up to N objects of no class under the labelled ones: the label maps are
    those of the data without clutter, the images differ in their background only, and 0 draws
    nothing (the embedded set stays byte-identical)."""
    changed = 0
    for i in range(12):
        img0, lab0 = synth.render("voc", i, 0, 5, 64, style)
        img, lab = synth.render("voc", i, 0, 5, 64, style, clutter=3)
        again, _ = synth.render("voc", i, 0, 5, 64, style, clutter=3)
        assert np.array_equal(lab, lab0) and np.array_equal(img, again)
        assert np.array_equal(synth.render("voc", i, 0, 5, 64, style, clutter=0)[0], img0)
        diff = np.abs(img.astype(int) - img0.astype(int)).max(-1) > 40
        assert not (diff & (lab0 > 0) & (lab0 < 255)).any()  # labelled objects untouched
        changed += diff.sum() > 30
    assert changed >= 6  # most images get at least one object drawn in their background


def test_styles_distinct_classes_and_ade(tmp_path: Path) -> None:
    from csseg_core.data.synth_styles import STYLES, class_look

    looks = {}
    for style in STYLES[1:]:
        for n in (20, 150):
            keys = {
                tuple(sorted((k, tuple(np.round(v, 3)) if isinstance(v, np.ndarray) else v)
                             for k, v in class_look(style, c, n).items() if k != "radius"))
                for c in range(1, n + 1)
            }
            assert len(keys) == n, (style, n)
        looks[style] = class_look(style, 1, 20)
    assert looks["blobs"]["shape"] != looks["polygons"]["shape"]
    root = synth.generate(tmp_path, "ade", n_train=150, n_val=150, size=32, seed=0, style="blobs")
    present = set()
    for p in (root / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"):
        present |= set(np.unique(np.asarray(Image.open(p))).tolist())
    assert present == set(range(151))
    with pytest.raises(ConfigError, match="style"):
        synth.generate(tmp_path / "x", "voc", style="zebra")


def test_every_class_has_its_own_colour_voc_and_ade() -> None:
    """The colour alone identifies a class (ADE's 150 too: 50 hues x 3 saturation/brightness
    tiers); the embedded VOC set's looks did not change with ADE's (its folder hash neither)."""
    for n in (20, 150):
        colours = {tuple(np.round(synth.class_style(c, n)["rgb"], 3)) for c in range(1, n + 1)}
        assert len(colours) == n
    assert synth.default_params("voc")["version"] == 1
