"""Incremental views (label maps and filters per mode/split), readers, caches, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csseg_core.data import (
    DataFileError,
    EvalTransform,
    TrainTransform,
    build_datasets,
    heldout_mask,
    keep_mask,
    label_lut,
    synth,
)
from csseg_core.data import files as dio
from csseg_core.data.transforms import random_resized_crop_params
from csseg_core.errors import ConfigError, DataError
from csseg_core.scenarios import get_scenario

VOC151 = get_scenario("voc-15-1")

# ---------------------------------------------------------------- label maps (§2.3)
# voc-15-1 step 2: current = {17}, old = {1..16}, future = {18, 19, 20}.
RAW = np.array([0, 3, 16, 17, 18, 255], dtype=np.uint8)
EXPECTED_VOC_STEP2 = {
    ("train", "disjoint"): [0, 0, 0, 17, 0, 0],
    ("train", "overlapped"): [0, 0, 0, 17, 0, 0],
    ("train", "sequential"): [0, 3, 16, 17, 0, 255],
    ("current", "disjoint"): [0, 255, 255, 17, 255, 255],
    ("current", "overlapped"): [0, 255, 255, 17, 255, 255],
    ("current", "sequential"): [0, 3, 16, 17, 255, 255],
    ("val", "disjoint"): [0, 3, 16, 17, 255, 255],  # held-out validation: test semantics
    ("val", "overlapped"): [0, 3, 16, 17, 255, 255],
    ("val", "sequential"): [0, 3, 16, 17, 255, 255],
    ("test", "disjoint"): [0, 3, 16, 17, 255, 255],
    ("test", "overlapped"): [0, 3, 16, 17, 255, 255],
    ("test", "sequential"): [0, 3, 16, 17, 255, 255],
}


@pytest.mark.parametrize("split,mode", list(EXPECTED_VOC_STEP2))
def test_label_map_voc_15_1_step2(split: str, mode: str) -> None:
    lut = label_lut(VOC151, mode, 2, split)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[RAW].tolist() == EXPECTED_VOC_STEP2[(split, mode)]


def test_label_map_reordered_voc_19_1b() -> None:
    sc = get_scenario("voc-19-1b")  # bottle (5) is learnt last: model index 20
    raw = np.array([0, 4, 5, 6, 20, 255], dtype=np.uint8)
    assert label_lut(sc, "disjoint", 1, "train")[raw].tolist() == [0, 0, 20, 0, 0, 0]
    assert label_lut(sc, "disjoint", 0, "train")[raw].tolist() == [0, 4, 0, 5, 19, 0]
    assert label_lut(sc, "disjoint", 1, "test")[raw].tolist() == [0, 4, 20, 5, 19, 255]
    assert label_lut(sc, "disjoint", 0, "test")[raw].tolist() == [0, 4, 255, 5, 19, 255]


def test_label_map_ade() -> None:
    sc = get_scenario("ade-100-50")  # step 1: current 101..150
    raw = np.array([0, 50, 101, 150, 255], dtype=np.uint8)
    assert label_lut(sc, "disjoint", 1, "train")[raw].tolist() == [0, 0, 101, 150, 0]
    assert label_lut(sc, "overlapped", 1, "train")[raw].tolist() == [0, 0, 101, 150, 0]
    assert label_lut(sc, "sequential", 1, "train")[raw].tolist() == [0, 50, 101, 150, 255]
    assert label_lut(sc, "disjoint", 1, "current")[raw].tolist() == [255, 255, 101, 150, 255]
    assert label_lut(sc, "disjoint", 1, "val")[raw].tolist() == [255, 50, 101, 150, 255]
    assert label_lut(sc, "disjoint", 1, "test")[raw].tolist() == [255, 50, 101, 150, 255]
    assert label_lut(sc, "disjoint", 0, "test")[raw].tolist() == [255, 50, 255, 255, 255]


# ---------------------------------------------------------------- filters (§2.3)
SETS = [{0, 17}, {0, 3, 17}, {0, 17, 18}, {0, 3}, {0, 255}, {16, 17, 255}, {0, 18}, {0, 20, 3}]
EXPECTED_KEEP = {
    ("train", "disjoint"): [1, 1, 0, 0, 0, 1, 0, 0],
    ("train", "sequential"): [1, 1, 0, 0, 0, 1, 0, 0],
    ("train", "overlapped"): [1, 1, 1, 0, 0, 1, 0, 0],
    ("current", "disjoint"): [1, 1, 1, 0, 0, 1, 0, 0],
    ("current", "sequential"): [1, 1, 1, 0, 0, 1, 0, 0],
    ("val", "disjoint"): [1, 1, 1, 1, 0, 1, 0, 1],
    ("val", "sequential"): [1, 1, 1, 1, 0, 1, 0, 1],
    ("test", "disjoint"): [1, 1, 1, 1, 0, 1, 0, 1],
    ("test", "overlapped"): [1, 1, 1, 1, 0, 1, 0, 1],
}


@pytest.mark.parametrize("split,mode", list(EXPECTED_KEEP))
def test_filter_voc_15_1_step2(split: str, mode: str) -> None:
    presence = np.zeros((len(SETS), 256), dtype=bool)
    for i, s in enumerate(SETS):
        presence[i, list(s)] = True
    keep = keep_mask(presence, VOC151, mode, 2, split)
    assert keep.astype(int).tolist() == EXPECTED_KEEP[(split, mode)]


def test_bad_mode_and_split() -> None:
    with pytest.raises(ConfigError):
        label_lut(VOC151, "overlap", 0, "train")
    with pytest.raises(ConfigError):
        label_lut(VOC151, "disjoint", 0, "trainval")


# ---------------------------------------------------------------- real loaders on synthetic data
@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return synth.generate(
        tmp_path_factory.mktemp("voc"), "voc", n_train=60, n_val=30, size=48, seed=3
    )


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def _voc(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def _raw_presence(root: Path, split: str) -> dict[str, set[int]]:
    voc = _voc(root)
    list_name = "train.txt" if split == "train" else "val.txt"
    ids = (voc / "ImageSets" / "Segmentation" / list_name).read_text().split()
    return {
        i: set(np.unique(np.asarray(Image.open(voc / "SegmentationClass" / f"{i}.png"))).tolist())
        for i in ids
    }


@pytest.mark.parametrize("mode", ["disjoint", "overlapped", "sequential"])
def test_build_views_match_filters_and_maps(voc_root: Path, tmp_path: Path, mode: str) -> None:
    ds = build_datasets("voc", voc_root, "voc-15-1", mode, 1, crop_size=32, cache_dir=tmp_path,
                        splits=("train", "val", "test", "current"), val_fraction=0.3)
    assert set(ds) == {"train", "val", "test", "current"}
    train_sets = _raw_presence(voc_root, "train")
    held = dict(zip(train_sets, heldout_mask(list(train_sets), 0.3)))
    allowed = set(range(17)) | {255}
    want = [i for i, s in train_sets.items() if 16 in s and (mode == "overlapped" or s <= allowed) and not held[i]]
    assert list(ds["train"].ids) == want and len(ds["train"]) == len(want)
    assert list(ds["val"].ids) == [i for i, s in train_sets.items() if held[i] and s & set(range(1, 17))]
    assert ds["val"].ids and not set(ds["val"].ids) & set(ds["train"].ids)
    test_sets = _raw_presence(voc_root, "val")
    assert list(ds["current"].ids) == [i for i, s in test_sets.items() if 16 in s]
    assert list(ds["test"].ids) == [i for i, s in test_sets.items() if s & set(range(1, 17))]
    image, label = ds["train"][0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.shape == (32, 32) and label.dtype == torch.int64
    train_ok = {0, 16} | (set(range(1, 16)) | {255} if mode == "sequential" else set())
    for k in range(len(ds["train"])):
        assert set(np.unique(ds["train"].raw(k)[1]).tolist()) <= train_ok
    assert set(np.unique(ds["current"].raw(0)[1]).tolist()) <= {0, 16, 255} | (
        set(range(1, 16)) if mode == "sequential" else set()
    )
    for k in range(len(ds["val"])):  # test semantics: every seen class, future ones ignored
        assert set(np.unique(ds["val"].raw(k)[1]).tolist()) <= set(range(17)) | {255}


def test_eval_crop_and_full(voc_root: Path, tmp_path: Path) -> None:
    crop = build_datasets(
        "voc",
        voc_root,
        "voc-15-1",
        "disjoint",
        0,
        crop_size=40,
        cache_dir=tmp_path,
        splits=("test",),
    )["test"]
    full = build_datasets(
        "voc",
        voc_root,
        "voc-15-1",
        "disjoint",
        0,
        crop_size=40,
        crop_val=False,
        cache_dir=tmp_path,
        splits=("test",),
        cache_images=True,
    )["test"]
    assert crop[0][0].shape == (3, 40, 40) and full[0][0].shape == (3, 48, 48)
    assert torch.equal(full[0][1], torch.from_numpy(full.raw(0)[1]).long())


def test_filter_cache_is_reused_and_invalidated(voc_root, tmp_path, monkeypatch) -> None:
    root = _copy(voc_root, tmp_path)
    cache_dir = tmp_path / "cache"
    first = build_datasets(
        "voc", root, "voc-15-1", "disjoint", 2, crop_size=32, cache_dir=cache_dir
    )
    assert list(cache_dir.glob("filter-*.npy")) and list(cache_dir.glob("presence-*.npy"))

    def boom(*args, **kwargs):
        raise AssertionError("label reader called despite the cache")

    monkeypatch.setattr(dio, "load_label", boom)
    again = build_datasets(
        "voc", root, "voc-15-1", "disjoint", 2, crop_size=32, cache_dir=cache_dir
    )
    assert again["train"].ids == first["train"].ids and again["test"].ids == first["test"].ids
    with pytest.raises(AssertionError):  # a fresh cache must read labels
        build_datasets(
            "voc",
            root,
            "voc-15-1",
            "disjoint",
            2,
            crop_size=32,
            cache_dir=tmp_path / "fresh",
            splits=("train",),
        )
    monkeypatch.undo()
    lst = _voc(root) / "ImageSets" / "Segmentation" / "train.txt"
    keep = [i for i in lst.read_text().split() if i not in first["train"].ids[:1]]
    lst.write_text("\n".join(keep) + "\n")
    changed = build_datasets(
        "voc", root, "voc-15-1", "disjoint", 2, crop_size=32, cache_dir=cache_dir, splits=("train",)
    )
    assert changed["train"].ids == first["train"].ids[1:]


def test_index_dir_replaces_train_filter(voc_root, tmp_path) -> None:
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    np.save(idx_dir / "train-0.npy", np.array([5, 2, 7]))
    ids = (_voc(voc_root) / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    (idx_dir / "train-1.txt").write_text(f"{ids[4]}\n{ids[1]}\n")
    kw = dict(crop_size=32, cache_dir=tmp_path / "c", index_dir=idx_dir, splits=("train",))
    assert build_datasets("voc", voc_root, "voc-15-1", "overlapped", 0, **kw)["train"].ids == (
        ids[2],
        ids[5],
        ids[7],
    )
    assert build_datasets("voc", voc_root, "voc-15-1", "overlapped", 1, **kw)["train"].ids == (
        ids[1],
        ids[4],
    )
    with pytest.raises(DataError, match="train-2.npy"):
        build_datasets("voc", voc_root, "voc-15-1", "overlapped", 2, **kw)


def test_augmented_layout(voc_root, tmp_path) -> None:
    root = _copy(voc_root, tmp_path)
    voc = _voc(root)
    shutil.copytree(voc / "SegmentationClass", voc / "SegmentationClassAug")
    ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    (voc / "train_aug.txt").write_text("\n".join(ids[:30]) + "\n")
    ds = build_datasets(
        "voc",
        voc,
        "voc-offline",
        "overlapped",
        0,
        crop_size=32,
        cache_dir=tmp_path / "c",
        splits=("train",),
    )["train"]
    assert set(ds.ids) <= set(ids[:30]) and all("SegmentationClassAug" in str(p) for p in ds.labels)
    (voc / "train_aug.txt").unlink()
    (voc / "splits").mkdir()
    pairs = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ids[:10]]
    (voc / "splits" / "train_aug.txt").write_text("\n".join(pairs) + "\n")
    ds = build_datasets(
        "voc",
        root / "VOCdevkit",
        "voc-offline",
        "overlapped",
        0,
        crop_size=32,
        cache_dir=tmp_path / "c",
        splits=("train",),
    )["train"]
    assert set(ds.ids) <= set(ids[:10]) and len(ds) > 0


def test_ade_reader(tmp_path) -> None:
    root = synth.generate(tmp_path / "ade", "ade", n_train=150, n_val=150, size=32, seed=1)
    ds = build_datasets(
        "ade",
        root / "ADEChallengeData2016",
        "ade-100-50",
        "overlapped",
        1,
        crop_size=32,
        cache_dir=tmp_path / "c",
    )
    assert len(ds["train"]) > 0 and ds["train"].ids == tuple(sorted(ds["train"].ids))
    for k in range(5):  # ADE "other" (0) is ignored at test time
        assert 0 not in ds["test"].raw(k)[1]
    assert 0 in np.concatenate([ds["train"].raw(k)[1].ravel() for k in range(5)])
    bad = root / "ADEChallengeData2016" / "annotations" / "training" / f"{ds['train'].ids[0]}.png"
    Image.fromarray(np.full((32, 32), 200, dtype=np.uint8)).save(bad)
    with pytest.raises(DataError, match=bad.name):
        build_datasets(
            "ade",
            root,
            "ade-100-50",
            "overlapped",
            1,
            crop_size=32,
            cache_dir=tmp_path / "c2",
            splits=("train",),
        )


# ---------------------------------------------------------------- errors
def test_missing_root_and_list(tmp_path, voc_root) -> None:
    with pytest.raises(DataError, match="--data-root") as err:
        build_datasets("voc", tmp_path / "nope", "voc-15-1", "disjoint", 0, crop_size=32)
    assert "nope" in str(err.value)
    with pytest.raises(DataError, match="no VOC layout"):
        build_datasets("voc", tmp_path, "voc-15-1", "disjoint", 0, crop_size=32)
    root = _copy(voc_root, tmp_path)
    (_voc(root) / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DataError, match="val.txt"):
        build_datasets(
            "voc", root, "voc-15-1", "disjoint", 0, crop_size=32, cache_dir=tmp_path / "c"
        )
    with pytest.raises(ConfigError):
        build_datasets("ade", root, "voc-15-1", "disjoint", 0, crop_size=32)


def _first_train(root: Path, tmp_path: Path, **kw):
    return build_datasets(
        "voc",
        root,
        "voc-offline",
        "overlapped",
        0,
        crop_size=32,
        cache_dir=tmp_path / "c",
        splits=("train",),
        **kw,
    )["train"]


def test_corrupt_image_and_wrong_size_label(voc_root, tmp_path) -> None:
    root = _copy(voc_root, tmp_path)
    ds = _first_train(root, tmp_path)
    jpg = ds.images[0]
    jpg.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(DataError, match=jpg.name) as err:
        ds[0]
    assert "\n" not in str(err.value)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert jpg.name in str(err.value) and "\n" not in str(err.value)
    png = ds.labels[1]
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(png)
    with pytest.raises(DataError, match=png.name):
        ds[1]


def test_out_of_range_label(voc_root, tmp_path) -> None:
    root = _copy(voc_root, tmp_path)
    ids = (_voc(root) / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    png = _voc(root) / "SegmentationClass" / f"{ids[3]}.png"
    arr = np.asarray(Image.open(png)).copy()
    arr[:2, :2] = 30
    Image.fromarray(arr).save(png)
    with pytest.raises(DataError, match=rf"{png.name}.*30"):
        _first_train(root, tmp_path)
    with pytest.raises(DataFileError, match="30"):
        dio.load_label(png, 20)


def test_empty_step(voc_root, tmp_path) -> None:
    root = _copy(voc_root, tmp_path)
    lst = _voc(root) / "ImageSets" / "Segmentation" / "train.txt"
    sets = _raw_presence(root, "train")
    lst.write_text("\n".join(i for i, s in sets.items() if 16 not in s) + "\n")
    with pytest.raises(DataError) as err:
        build_datasets(
            "voc", root, "voc-15-1", "disjoint", 1, crop_size=32, cache_dir=tmp_path / "c"
        )
    msg = str(err.value)
    assert all(s in msg for s in ("voc-15-1", "disjoint", "step 1", "train"))


# ---------------------------------------------------------------- transforms
def test_random_resized_crop_params_in_bounds() -> None:
    torch.manual_seed(0)
    for h, w in [(48, 48), (30, 90), (90, 30), (375, 500)]:
        for _ in range(50):
            i, j, ch, cw = random_resized_crop_params(h, w)
            assert 0 <= i and 0 <= j and 0 < ch and 0 < cw and i + ch <= h and j + cw <= w


def test_train_transform_keeps_image_and_label_aligned() -> None:
    label = np.zeros((40, 60), dtype=np.uint8)
    label[:, :30] = 1
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, :30] = 255
    tr = TrainTransform(24)
    torch.manual_seed(1)
    for _ in range(20):
        img, lbl = tr(image, label)
        assert img.shape == (3, 24, 24) and lbl.shape == (24, 24)
        bright = img[0] > 0  # 255 normalises to a positive value, 0 to a negative one
        assert (bright == (lbl == 1)).float().mean() > 0.9
    img, lbl = EvalTransform(20)(image, label)
    assert img.shape == (3, 20, 20) and lbl.dtype == torch.int64


# ---------------------------------------------------------------- held-out validation split
def test_heldout_mask_depends_on_ids_and_fraction_only() -> None:
    ids = [f"img{i:05d}" for i in range(4000)]
    m = heldout_mask(ids, 0.15)
    assert 0.13 < m.mean() < 0.17
    assert np.array_equal(heldout_mask(ids[::-1], 0.15), m[::-1])  # order does not matter
    assert not np.any(heldout_mask(ids, 0.10) & ~m)  # nested: a smaller fraction is a subset
    assert not heldout_mask(ids, 0.0).any()
    with pytest.raises(ConfigError, match="val_fraction"):
        heldout_mask(ids, 1.0)


@pytest.mark.parametrize("scenario", ["voc-15-1", "voc-10-10", "voc-offline"])
def test_heldout_images_never_reach_a_training_batch(voc_root: Path, tmp_path: Path, scenario: str) -> None:
    """At every step of every mode (and with an index_dir partition) the train view and
    every batch its loader yields hold no held-out image; the val view is the held-out set."""
    from csseg_core.config import resolve_config
    from csseg_core.engine import make_loader

    sc = get_scenario(scenario)
    train_ids = list(_raw_presence(voc_root, "train"))
    held = {i for i, h in zip(train_ids, heldout_mask(train_ids, 0.2)) if h}
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    for step in range(sc.num_steps):  # a partition that (wrongly) lists every image at every step
        (index_dir / f"train-{step}.txt").write_text("\n".join(train_ids))
    for mode in ("disjoint", "overlapped", "sequential"):
        for step in range(sc.num_steps):
            for idx in (None, index_dir):
                try:
                    ds = build_datasets("voc", voc_root, sc, mode, step, crop_size=16, cache_dir=tmp_path,
                                        index_dir=idx, val_fraction=0.2)
                except DataError:  # a step this tiny set has no image for
                    continue
                assert not held & set(ds["train"].ids), (mode, step)
                assert set(ds["val"].ids) <= held
                cfg = resolve_config(sc.name, "ft", overrides={"batch_size": 4})
                seen = set()
                loader = make_loader(ds["train"], cfg, train=True, seed=step)
                for batch_indices in loader.batch_sampler:  # the indices of every batch, no decoding
                    seen |= {ds["train"].ids[i] for i in batch_indices}
                assert seen and not seen & held, (mode, step)
