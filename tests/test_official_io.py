"""What researchers already have on disk: the official SDR/MiB/PLOP data layout and
checkpoints written by the official SDR code (synthetic stand-ins in that layout)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from csseg_core.config import resolve_config
from csseg_core.data import ade as ade_reader
from csseg_core.data import build_datasets, synth
from csseg_core.data import voc as voc_reader
from csseg_core.errors import ConfigError
from csseg_core.models import build_model
from csseg_core.models.official import to_official_name
from csseg_core.state import load_state

pytestmark = pytest.mark.usefixtures("one_thread")


def _official_layout(src: Path, dst: Path, aug: bool) -> Path:
    """``dst/PascalVOC12`` as ``data/download_voc.sh`` leaves it: VOC2012 moved there, SBD's
    labels as ``SegmentationClassAug/``, its lists (path pairs) under ``splits/``."""
    voc = src / "VOCdevkit" / "VOC2012"
    out = dst / "PascalVOC12"
    shutil.copytree(voc / "JPEGImages", out / "JPEGImages")
    if not aug:  # VOC2012 moved, SBD not downloaded: SegmentationClass + ImageSets only
        shutil.copytree(voc / "SegmentationClass", out / "SegmentationClass")
        shutil.copytree(voc / "ImageSets", out / "ImageSets")
        return dst
    (out / "splits").mkdir(parents=True)
    train = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    pairs = lambda ids: "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids)  # noqa: E731
    (out / "splits" / "val.txt").write_text(pairs(val))
    shutil.copytree(voc / "SegmentationClass", out / "SegmentationClassAug")
    (out / "splits" / "train_aug.txt").write_text(pairs(train))
    return dst


@pytest.fixture(scope="module")
def synth_voc(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("src"), "voc", n_train=60, n_val=24, size=48, seed=3)


def test_official_voc_layout_is_read_with_the_heldout_split(synth_voc, tmp_path, capsys):
    root = _official_layout(synth_voc, tmp_path / "data", aug=True)
    train = voc_reader.split_files(root, "train")
    test = voc_reader.split_files(root, "test")
    assert train.source.name == "train_aug.txt" and test.source == (root / "PascalVOC12" / "splits" / "val.txt").resolve()
    assert all("SegmentationClassAug" in str(p) for p in train.labels + test.labels)
    views = build_datasets("voc", root, "voc-15-5", "disjoint", 0, crop_size=32, splits=("train", "val", "test"),
                           val_fraction=0.2)
    ids_train, ids_val = set(views["train"].ids), set(views["val"].ids)
    assert ids_train and ids_val and not ids_train & ids_val and ids_val <= set(train.ids)
    assert set(views["test"].ids) <= set(test.ids)
    image, label = views["train"][0]
    assert image.shape == (3, 32, 32) and label.shape == (32, 32)
    assert "train_aug" not in capsys.readouterr().err


def test_without_train_aug_training_uses_the_train_list_and_says_so_once(synth_voc, tmp_path, capsys):
    root = _official_layout(synth_voc, tmp_path / "data", aug=False)
    for _ in range(2):
        train = voc_reader.split_files(root, "train")
        test = voc_reader.split_files(root, "val")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10,582" in err[0] and "train.txt" in err[0] and "1,464" in err[0]
    assert train.source.name == "train.txt" and len(train.ids) == 60 and test.source.name == "val.txt"
    voc_reader.split_files(synth_voc, "train")  # the synthetic set is marked: no warning
    assert capsys.readouterr().err == ""


def test_ade_under_a_root_and_missing_layout_error(tmp_path):
    ade = tmp_path / "data"  # the official code's data/ADEChallengeData2016 (listing only)
    for kind, ext in (("images", "jpg"), ("annotations", "png")):
        for sub in ("training", "validation"):
            (ade / "ADEChallengeData2016" / kind / sub).mkdir(parents=True)
            for i in range(3 if sub == "training" else 2):
                (ade / "ADEChallengeData2016" / kind / sub / f"ADE_{sub}_{i:08d}.{ext}").touch()
    assert len(ade_reader.split_files(ade, "train").ids) == 3 and len(ade_reader.split_files(ade, "test").ids) == 2
    with pytest.raises(Exception, match="PascalVOC12"):
        voc_reader.resolve_root(tmp_path / "data")


# ------------------------------------------------------------------ official checkpoints via the CLI
def _official_ckpt(cfg, classes, path: Path, **extra) -> Path:
    """A checkpoint in the layout of the official ``save_ckpt`` (DDP ``module.`` names)."""
    torch.manual_seed(0)
    model = build_model(cfg.backbone, classes, pretrained=None, **cfg.model_kwargs())
    state = {f"module.{to_official_name(k)}": v for k, v in model.state_dict().items() if "num_batches" not in k}
    ckpt = {"epoch": 30, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []},
            "scheduler_state": {"last_epoch": 10, "base_lrs": [0.001]}, "best_score": np.float64(0.51),
            "trainer_state": {"regularizer": None}, "prototypes": torch.rand(sum(classes), model.body_channels),
            "count_features": torch.full((sum(classes),), 7, dtype=torch.long), **extra}
    torch.save(ckpt, path)
    return path


def _invoke(*args):
    from cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_continues_from_an_official_step0_checkpoint(tmp_path, voc_root, micro_overrides):
    cfg = resolve_config("voc-15-5", "sdr", data_root=str(voc_root), overrides=micro_overrides)
    path = _official_ckpt(cfg, (16,), tmp_path / "15-5-voc_FT_0.pth")
    state = load_state(path, cfg)
    assert state["step"] == 0 and "head.pool_conv.weight" in state["model"]
    assert state["statistics"]["prototype_counts"].tolist() == [7.0] * 16
    sets = [a for k, v in micro_overrides.items() for a in ("--set", f"{k}={v}")]
    result = _invoke("train", "voc-15-5", "--method", "sdr", "--data-root", voc_root, "--step-ckpt", path,
                     "--out", tmp_path / "run", "--no-progress", *sets)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "steps.parquet").is_file()


def test_official_checkpoint_with_a_foreign_key_names_it(tmp_path, voc_root, micro_overrides):
    cfg = resolve_config("voc-15-5", "ft", data_root=str(voc_root), overrides=micro_overrides)
    path = _official_ckpt(cfg, (16,), tmp_path / "bad.pth")
    ckpt = torch.load(path, weights_only=False)
    ckpt["model_state"]["module.head.last_layer.weight"] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match="'module.head.last_layer.weight' does not map"):
        load_state(path, cfg)
    result = _invoke("train", "voc-15-5", "--data-root", voc_root, "--step-ckpt", path, "--out", tmp_path / "r",
                     *[a for k, v in micro_overrides.items() for a in ("--set", f"{k}={v}")])
    assert result.exit_code != 0 and "module.head.last_layer.weight" in result.output
    assert len(result.output.strip().splitlines()) == 1
    other = resolve_config("voc-15-5", "ft", data_root=str(voc_root), overrides={**micro_overrides, "head_channels": 16})
    with pytest.raises(ConfigError, match="has shape"):
        load_state(_official_ckpt(cfg, (16,), tmp_path / "ok.pth"), other)
