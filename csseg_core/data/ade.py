"""ADE20K (SceneParsing, 150 classes) reader: ``ADEChallengeData2016``.

Layout: ``images/{training,validation}/<id>.jpg`` and ``annotations/{training,validation}/<id>.png``
with 0 = "other" (acts as background) and 1..150 the classes. Items are sorted by file name,
as in the reference, so per-step index lists (``train-<step>.npy``) refer to this order.
The test split is ``validation``.
"""

from __future__ import annotations

from pathlib import Path

from csseg_core.data.files import SplitFiles, listing_signature
from csseg_core.errors import DataError

NUM_CLASSES = 150
_HOW_TO_GET = (
    "download ADEChallengeData2016.zip (MIT SceneParsing) and pass the folder holding "
    "ADEChallengeData2016, or omit --data-root to use the synthetic dataset"
)


def resolve_root(root: str | Path) -> Path:
    """Find the ``ADEChallengeData2016`` folder from ``root`` (itself or its parent).

    Args:
        root: The ``ADEChallengeData2016`` folder or the folder holding it.

    Returns:
        The folder holding ``images/`` and ``annotations/``.

    Raises:
        DataError: The root is missing or does not hold the ADE layout.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"ADE20K data root {root} does not exist; {_HOW_TO_GET}")
    for cand in (root, root / "ADEChallengeData2016"):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand.resolve()
    raise DataError(
        f"{root} holds no ADE20K layout (no images/ and annotations/ in it or in "
        f"ADEChallengeData2016/); {_HOW_TO_GET}"
    )


def split_files(root: str | Path, split: str) -> SplitFiles:
    """List the items of one split, sorted by file name.

    Args:
        root: Data root (see :func:`resolve_root`).
        split: ``"train"``, ``"val"`` or ``"test"`` (val and test = ``validation``).

    Returns:
        The split's files.

    Raises:
        DataError: Missing root or split folders.
    """
    ade = resolve_root(root)
    if split == "train":
        sub = "training"
    elif split in ("val", "test"):
        sub = "validation"
    else:
        raise DataError(f"unknown split {split!r}; expected train, val or test")
    image_dir, label_dir = ade / "images" / sub, ade / "annotations" / sub
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise DataError(
                f"folder {d} does not exist; the ADE20K root needs images/ and "
                f"annotations/ with training/ and validation/"
            )
    names = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() == ".jpg")
    ids = tuple(n[: -len(".jpg")] for n in names)
    images = tuple(image_dir / n for n in names)
    labels = tuple(label_dir / f"{i}.png" for i in ids)
    sig = listing_signature("ade", split, str(ade), "\n".join(names), image_dir, label_dir)
    return SplitFiles(ids, images, labels, image_dir, sig)
