"""Pascal VOC 2012 reader: the plain ``VOCdevkit/VOC2012`` layout and the augmented one.

The VOC folder (the one holding ``JPEGImages/``) is ``--data-root`` itself, its ``VOC2012/``,
its ``VOCdevkit/VOC2012/`` or its ``PascalVOC12/`` (the layout of the official SDR, MiB and
PLOP code: ``data/download_voc.sh`` moves VOC2012 there and unpacks SBD's lists as ``splits/``).

Plain: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs) and
``ImageSets/Segmentation/{train,val}.txt``. Augmented (the papers' 10,582 training images):
``SegmentationClassAug/<id>.png`` plus a ``train_aug.txt`` list at ``<voc>/train_aug.txt``,
``<voc>/ImageSets/Segmentation/train_aug.txt``, ``<voc>/splits/train_aug.txt`` or the same
under ``--data-root``; when such a list exists the train split uses it, otherwise the train split
is VOC's ``train.txt`` (1,464 images) and one line on stderr says so. The test split is VOC
``val``, listed by ``ImageSets/Segmentation/val.txt`` or else ``splits/val.txt``. List lines are
either an id or MiB-style ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` pairs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from csseg_core.data.files import SplitFiles, listing_signature
from csseg_core.errors import DataError

NUM_CLASSES = 20
_HOW_TO_GET = (
    "download Pascal VOC 2012 (VOCtrainval_11-May-2012.tar) and pass the folder holding "
    "VOCdevkit/VOC2012, or omit --data-root to use the synthetic dataset"
)


def resolve_root(root: str | Path) -> Path:
    """Find the ``VOC2012`` folder from ``root`` (the folder itself or a parent of it).

    Args:
        root: ``.../VOCdevkit/VOC2012``, ``.../VOCdevkit``, the folder holding ``VOCdevkit``
            or the folder holding ``PascalVOC12`` (official SDR / MiB / PLOP layout).

    Returns:
        The folder holding ``JPEGImages``.

    Raises:
        DataError: The root is missing or does not hold a VOC layout.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"VOC data root {root} does not exist; {_HOW_TO_GET}")
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012", root / "PascalVOC12"):
        if (cand / "JPEGImages").is_dir():
            return cand.resolve()
    raise DataError(
        f"{root} holds no VOC layout (no JPEGImages/ in it, in VOC2012/, VOCdevkit/VOC2012/ or "
        f"PascalVOC12/); {_HOW_TO_GET}"
    )


_WARNED: set[Path] = set()
SYNTHETIC_MARKER = "CSSEG_SYNTHETIC"
"""File written by ``csseg data synth`` into the VOC folder (no train_aug warning there)."""


def _warn_no_aug(voc: Path, list_file: Path, n: int) -> None:
    """Say once per process that training uses VOC's train list, not SBD's train_aug."""
    if voc in _WARNED or (voc / SYNTHETIC_MARKER).exists():
        return
    _WARNED.add(voc)
    print(f"csseg: {voc} has no SegmentationClassAug/ + train_aug.txt; training uses the {n}-image "
          f"{list_file.name} (VOC: 1,464) instead of the papers' 10,582 train_aug images", file=sys.stderr)


def _aug_list(user_root: Path, voc: Path) -> Path | None:
    for cand in (
        voc / "train_aug.txt",
        voc / "ImageSets" / "Segmentation" / "train_aug.txt",
        voc / "splits" / "train_aug.txt",
        user_root / "train_aug.txt",
        user_root / "splits" / "train_aug.txt",
    ):
        if cand.is_file():
            return cand
    return None


def split_files(root: str | Path, split: str) -> SplitFiles:
    """List the items of one split.

    Args:
        root: Data root (see :func:`resolve_root`).
        split: ``"train"``, ``"val"`` or ``"test"`` (test = VOC val).

    Returns:
        The split's files in list order.

    Raises:
        DataError: Missing root, list file or label folder.
    """
    user_root = Path(root).expanduser()
    voc = resolve_root(user_root)
    seg_dir = voc / "ImageSets" / "Segmentation"
    if split == "train":
        list_file = _aug_list(user_root, voc)
        label_dir = voc / "SegmentationClassAug"
        fallback = list_file is None
        if fallback:
            list_file, label_dir = seg_dir / "train.txt", voc / "SegmentationClass"
    elif split in ("val", "test"):
        list_file = seg_dir / "val.txt"
        for cand in (voc / "splits" / "val.txt", voc / "val.txt", user_root / "splits" / "val.txt"):
            if not list_file.is_file() and cand.is_file():
                list_file = cand
        label_dir = voc / "SegmentationClass"
        if not label_dir.is_dir():
            label_dir = voc / "SegmentationClassAug"
    else:
        raise DataError(f"unknown split {split!r}; expected train, val or test")
    if not list_file.is_file():
        raise DataError(
            f"list file {list_file} does not exist; a VOC2012 root needs "
            "ImageSets/Segmentation/{train,val}.txt or splits/{train_aug,val}.txt"
        )
    ids, images, labels = [], [], []
    explicit = False
    for line in list_file.read_text().splitlines():
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) >= 2:
            explicit = True
            images.append(voc / tokens[0].lstrip("/"))
            labels.append(voc / tokens[1].lstrip("/"))
            ids.append(Path(tokens[0]).stem)
        else:
            ids.append(tokens[0])
            images.append(voc / "JPEGImages" / f"{tokens[0]}.jpg")
            labels.append(label_dir / f"{tokens[0]}.png")
    if not explicit and not label_dir.is_dir():
        raise DataError(
            f"label folder {label_dir} does not exist (needed by {list_file}); "
            "add the SegmentationClass(Aug) PNGs"
        )
    if split == "train" and fallback:
        _warn_no_aug(voc, list_file, len(ids))
    parts: list = ["voc", split, str(voc), list_file]
    if label_dir.is_dir():
        parts.append(label_dir)
    return SplitFiles(
        tuple(ids), tuple(images), tuple(labels), list_file, listing_signature(*parts)
    )
