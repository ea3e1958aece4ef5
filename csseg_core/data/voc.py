"""Pascal VOC 2012 reader: the plain ``VOCdevkit/VOC2012`` layout and the augmented one.

Plain: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs) and
``ImageSets/Segmentation/{train,val}.txt``. Augmented (the papers' 10,582 training images):
``SegmentationClassAug/<id>.png`` plus a ``train_aug.txt`` list at ``<root>/train_aug.txt``,
``<root>/ImageSets/Segmentation/train_aug.txt`` or ``<root>/splits/train_aug.txt``; when such a
list exists the train split uses it. List lines are either an id or MiB-style
``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` pairs. The test split is VOC ``val``.
"""

from __future__ import annotations

from pathlib import Path

from csseg_core.data.io import SplitFiles, listing_signature
from csseg_core.errors import DataError

NUM_CLASSES = 20
_HOW_TO_GET = (
    "download Pascal VOC 2012 (VOCtrainval_11-May-2012.tar) and pass the folder holding "
    "VOCdevkit/VOC2012, or omit --data-root to use the synthetic dataset"
)


def resolve_root(root: str | Path) -> Path:
    """Find the ``VOC2012`` folder from ``root`` (the folder itself or a parent of it).

    Args:
        root: ``.../VOCdevkit/VOC2012``, ``.../VOCdevkit`` or the folder holding ``VOCdevkit``.

    Returns:
        The folder holding ``JPEGImages``.

    Raises:
        DataError: The root is missing or does not hold a VOC layout.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"VOC data root {root} does not exist; {_HOW_TO_GET}")
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand.resolve()
    raise DataError(
        f"{root} holds no VOC layout (no JPEGImages/ in it, in VOC2012/ or in "
        f"VOCdevkit/VOC2012/); {_HOW_TO_GET}"
    )


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
        if list_file is None:
            list_file, label_dir = seg_dir / "train.txt", voc / "SegmentationClass"
    elif split in ("val", "test"):
        list_file = seg_dir / "val.txt"
        for cand in (voc / "splits" / "val.txt", voc / "val.txt"):
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
            "ImageSets/Segmentation/{train,val}.txt (or a train_aug.txt list)"
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
    parts: list = ["voc", split, str(voc), list_file]
    if label_dir.is_dir():
        parts.append(label_dir)
    return SplitFiles(
        tuple(ids), tuple(images), tuple(labels), list_file, listing_signature(*parts)
    )
