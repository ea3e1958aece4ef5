"""Synthetic segmentation data written in the real VOC / ADE20K on-disk layout.

Every class has a fixed, learnable appearance (independent of the seed): a saturated
colour (hue + saturation/brightness tier; unique per class, VOC and ADE), a texture (stripes of a
class-specific period and orientation, or a checkerboard) and shape statistics (ellipse /
rectangle / triangle with a class-specific size range). Backgrounds are smooth,
low-saturation noise. Each image holds 1-3 objects; the first object's class cycles over
all classes and is drawn on top, so every class appears in train and val. VOC objects get a
1-2 px void (255) ring like VOC's boundaries; ADE has no void id, so there the ring is 0
("other"), as in real ADE annotations. Every image has its own
``numpy`` Generator seeded by ``(seed, split, index)``: same seed, byte-identical files.
This is the ``default`` style; ``generate(style=...)`` (``csseg data synth --style``) draws
the other looks of :mod:`csseg_core.data.synth_styles`.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from csseg_core.data.files import voc_colormap
from csseg_core.data.filter_cache import csseg_home
from csseg_core.data.synth_styles import STYLES, draw_clutter, render_style
from csseg_core.errors import ConfigError

GENERATOR_VERSION = {"voc": 1, "ade": 2}
"""Per dataset; bumped when its images change (ADE 2: one colour per class), so the default set is made again."""
NUM_FOREGROUND = {"voc": 20, "ade": 150}
DEFAULTS = {
    "voc": {"n_train": 1200, "n_val": 300, "size": 96},
    "ade": {"n_train": 1500, "n_val": 300, "size": 96},
}
_SHAPES = ("ellipse", "rectangle", "triangle")


def object_classes(rng: np.random.Generator, index: int, n_cls: int, p_count: tuple[float, float, float]) -> list[int]:
    """1–3 distinct classes of one image (``p_count``: P(1), P(2), P(3) objects); the last is the
    guaranteed class ``index % n_cls + 1`` (drawn on top), the others any class but that one."""
    first = index % n_cls + 1
    n_obj = int(rng.choice([1, 2, 3], p=list(p_count)))
    others = rng.choice(n_cls - 1, size=n_obj - 1, replace=False) + 1
    return [int(o) + (o >= first) for o in others] + [first]


def place_object(rng: np.random.Generator, radius: tuple[float, float], size: int, aspect: tuple[float, float],
                 margin: float) -> tuple[float, float, float, float, int, tuple[int, int, int, int]]:
    """Radii, centre, border width and bounding box ``(y0, y1, x0, x1)`` of one object (a fixed draw order)."""
    r = rng.uniform(*radius) * size
    a = rng.uniform(*aspect)
    rx, ry = r * np.sqrt(a), r / np.sqrt(a)
    cx = rng.uniform(margin * rx, size - margin * rx)
    cy = rng.uniform(margin * ry, size - margin * ry)
    border = int(rng.integers(1, 3))
    box = (max(0, int(cy - ry) - 3), min(size, int(cy + ry) + 4), max(0, int(cx - rx) - 3), min(size, int(cx + rx) + 4))
    return rx, ry, cx, cy, border, box


def class_style(c: int, n_classes: int) -> dict:
    """Fixed appearance parameters of foreground class ``c`` (1-based).

    Args:
        c: Class id.
        n_classes: Number of foreground classes of the dataset.

    Returns:
        ``{"rgb", "texture", "period", "angle", "shape", "radius"}``.
    """
    k = c - 1
    if n_classes <= 20:  # VOC: 10 hues x 2 brightness tiers, so the colour is unique
        tier = k // 10
        hue = (k % 10) / 10 + (0.05 if tier == 1 else 0.0)
        sat, value = 0.9, (0.95, 0.5)[tier]
        tex = (k * 3) % 5
    else:  # ADE: 50 hues x 3 (saturation, brightness) tiers: the colour is unique too, texture is a second cue
        tier = k // 50
        hue = (k % 50) / 50 + tier / 150
        sat, value = ((0.9, 0.95), (0.55, 0.75), (0.95, 0.5))[tier]
        tex = k % 5
    rgb = np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, value), dtype=np.float32)
    return {
        "rgb": rgb,
        "texture": "checker" if tex == 4 else "stripes",
        "period": (4, 7, 10)[(k // 3) % 3],
        "angle": (0.0, 45.0, 90.0, 135.0, 45.0)[tex],
        "shape": _SHAPES[k % 3],
        "radius": ((0.12, 0.19), (0.17, 0.26), (0.24, 0.34))[(k // 2) % 3],
    }


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


@cache
def _texture_tile(c: int, n_classes: int, size: int) -> np.ndarray:
    """Class texture (0/1 uint8) on a ``size + 16`` square; random offsets give the phase."""
    style = class_style(c, n_classes)
    p = style["period"]
    yy, xx = np.mgrid[0 : size + 16, 0 : size + 16].astype(np.float32)
    if style["texture"] == "checker":
        tile = (xx // (p / 2) + yy // (p / 2)) % 2
    else:
        a = np.deg2rad(style["angle"])
        tile = ((xx * np.cos(a) + yy * np.sin(a)) // (p / 2)) % 2
    return tile.astype(np.uint8)


@cache
def _upsampler(grid: int, size: int) -> np.ndarray:
    """``size x grid`` bilinear interpolation matrix (align corners)."""
    pos = np.linspace(0.0, grid - 1.0, size)
    lo = np.minimum(np.floor(pos).astype(int), grid - 2)
    frac = (pos - lo).astype(np.float32)
    mat = np.zeros((size, grid), dtype=np.float32)
    mat[np.arange(size), lo] = 1.0 - frac
    mat[np.arange(size), lo + 1] = frac
    return mat


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    grid = int(rng.integers(3, 8))
    up, up3 = _upsampler(grid, size), _upsampler(3, size)
    gray = up @ rng.uniform(0.25, 0.75, (grid, grid)).astype(np.float32) @ up.T
    coarse = rng.uniform(-0.06, 0.06, (3, 3, 3)).astype(np.float32)  # (channel, gy, gx)
    tint = np.stack([up3 @ coarse[ch] @ up3.T for ch in range(3)], axis=-1)
    return gray[..., None] + tint


def render(
    dataset: str, index: int, split_code: int, seed: int, size: int, style: str = "default", clutter: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image and its label map.

    Args:
        dataset: ``"voc"`` or ``"ade"``.
        index: Image index within the split (selects the guaranteed class).
        split_code: 0 for train, 1 for val.
        seed: Dataset seed.
        size: Image side.
        style: ``"default"`` or another of ``synth_styles.STYLES``.
        clutter: Up to this many unlabelled objects (background) under the labelled ones
            (:func:`synth_styles.draw_clutter`); 0 draws none, and the image is the same as before.

    Returns:
        ``(size x size x 3 uint8 image, size x size uint8 label)``.
    """
    n_cls = NUM_FOREGROUND[dataset]
    void = 255 if dataset == "voc" else 0
    if style != "default":
        return render_style(n_cls, void, style, index, split_code, seed, size, clutter)
    rng = np.random.default_rng([seed, split_code, index])
    image = _background(rng, size)
    if clutter:
        draw_clutter(style, image, clutter, seed, split_code, index)
    label = np.zeros((size, size), dtype=np.uint8)
    for c in object_classes(rng, index, n_cls, (0.4, 0.35, 0.25)):
        style = class_style(c, n_cls)
        rx, ry, cx, cy, border, (y0, y1, x0, x1) = place_object(rng, style["radius"], size, (0.75, 1.33), 0.6)
        oy, ox = (int(v) for v in rng.integers(0, 16, 2))
        dy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
        dx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
        if style["shape"] == "ellipse":
            mask = dx * dx + dy * dy <= 1.0
        elif style["shape"] == "rectangle":
            mask = (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
        else:  # triangle pointing up: t = 0 at the apex, 1 at the base
            t = (dy + 1.0) / 2.0
            mask = (t >= 0.0) & (t <= 1.0) & (np.abs(dx) <= t * 1.1)
        ring = _dilate(mask, border) & ~mask
        tile = _texture_tile(c, n_cls, size)[oy + y0 : oy + y1, ox + x0 : ox + x1]
        region, lab = image[y0:y1, x0:x1], label[y0:y1, x0:x1]
        region[mask] = style["rgb"] * (0.6 + 0.4 * tile[mask][:, None].astype(np.float32))
        lab[ring] = void
        lab[mask] = c
    image += 0.035 * rng.standard_normal((size, size, 1), dtype=np.float32)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), label


def _layout(root: Path, dataset: str, split: str, i: int) -> tuple[Path, Path, str]:
    if dataset == "voc":
        base = root / "VOCdevkit" / "VOC2012"
        name = f"{2007 if split == 'train' else 2008}_{i:06d}"
        return base / "JPEGImages" / f"{name}.jpg", base / "SegmentationClass" / f"{name}.png", name
    base = root / "ADEChallengeData2016"
    sub, tag = ("training", "train") if split == "train" else ("validation", "val")
    name = f"ADE_{tag}_{i + 1:08d}"
    return base / "images" / sub / f"{name}.jpg", base / "annotations" / sub / f"{name}.png", name


def generate(
    root: str | Path,
    dataset: str = "voc",
    n_train: int | None = None,
    n_val: int | None = None,
    size: int = 96,
    seed: int = 0,
    workers: int | None = None,
    style: str = "default",
    clutter: int = 0,
) -> Path:
    """Write a synthetic dataset in the real on-disk layout.

    Args:
        root: Output folder (gets ``VOCdevkit/VOC2012`` or ``ADEChallengeData2016``).
        dataset: ``"voc"`` (20 classes) or ``"ade"`` (150 classes).
        n_train: Train images (default 1200 for VOC, 1500 for ADE).
        n_val: Val images (default 300).
        size: Image side in pixels.
        seed: Seed; the same seed writes byte-identical files.
        workers: Writer threads (default: one per core, up to 8).
        style: The look (``synth_styles.STYLES``); ``"default"`` is the embedded dataset's.
        clutter: Up to this many unlabelled background objects per image (0: none, the default).

    Returns:
        ``root``, a data root the readers accept.

    Raises:
        ConfigError: Unknown dataset or style, or fewer images than classes in a split.
    """
    if dataset not in NUM_FOREGROUND:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: voc, ade")
    if style not in STYLES:
        raise ConfigError(f"unknown synthetic style {style!r}; valid styles: {', '.join(STYLES)}")
    n_cls = NUM_FOREGROUND[dataset]
    n_train = DEFAULTS[dataset]["n_train"] if n_train is None else int(n_train)
    n_val = DEFAULTS[dataset]["n_val"] if n_val is None else int(n_val)
    if min(n_train, n_val) < n_cls:
        raise ConfigError(
            f"synthetic {dataset} needs at least {n_cls} train and val images so "
            f"every class appears (got {n_train} / {n_val})"
        )
    if not 0 <= int(clutter) <= 10:
        raise ConfigError(f"clutter {clutter} is out of range; pass 0 (none) to 10 unlabelled objects per image")
    if size < 32:
        raise ConfigError(f"synthetic image size {size} is too small; use 32 or more")
    root = Path(root)
    palette = voc_colormap().ravel().tolist()

    def write(job: tuple[str, int]) -> str:
        split, i = job
        img_path, lbl_path, name = _layout(root, dataset, split, i)
        image, label = render(dataset, i, 0 if split == "train" else 1, seed, size, style, int(clutter))
        Image.fromarray(image).save(img_path, quality=95)
        lbl = Image.frombytes("P" if dataset == "voc" else "L", (size, size), label.tobytes())
        if dataset == "voc":
            lbl.putpalette(palette)
        lbl.save(lbl_path, optimize=False)
        return name

    jobs = [("train", i) for i in range(n_train)] + [("val", i) for i in range(n_val)]
    try:
        for split in ("train", "val"):
            img_path, lbl_path, _ = _layout(root, dataset, split, 0)
            img_path.parent.mkdir(parents=True, exist_ok=True)
            lbl_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot write the synthetic dataset to {root} ({err.strerror}); pass a writable --root") from None
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        names = list(pool.map(write, jobs, chunksize=16))
    if dataset == "voc":
        sets = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True, exist_ok=True)
        (sets / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
        (sets / "val.txt").write_text("\n".join(names[n_train:]) + "\n")
        _mark_synthetic(root / "VOCdevkit" / "VOC2012")
    return root


def _mark_synthetic(voc: Path) -> None:
    """Mark a synthetic VOC folder: it has no train_aug list by design (no warning about it)."""
    from csseg_core.data.voc import SYNTHETIC_MARKER

    marker = voc / SYNTHETIC_MARKER
    if voc.is_dir() and not marker.exists():
        marker.write_text("written by csseg data synth; train.txt is the whole training set\n")


def default_params(dataset: str = "voc") -> dict:
    """Parameters of the embedded default synthetic dataset (hashed into its folder name)."""
    if dataset not in DEFAULTS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: voc, ade")
    return {"dataset": dataset, **DEFAULTS[dataset], "seed": 0, "version": GENERATOR_VERSION[dataset]}


def default_target(dataset: str = "voc") -> Path:
    """Where :func:`default_data_root` keeps the default synthetic dataset (made or not)."""
    digest = hashlib.sha1(json.dumps(default_params(dataset), sort_keys=True).encode()).hexdigest()[:10]
    return csseg_home() / "synthetic" / f"{dataset}-{digest}"


def default_data_root(dataset: str = "voc") -> Path:
    """The default synthetic dataset, generated once into ``$CSSEG_HOME/synthetic``.

    Generation writes into a temporary folder renamed into place at the end, so an
    interrupted run is never reused. Prints one line to stderr naming the folder.

    Args:
        dataset: ``"voc"`` or ``"ade"``.

    Returns:
        The data root.
    """
    params = default_params(dataset)
    target = default_target(dataset)
    parent = target.parent
    if not target.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}-tmp-"))
        try:
            generate(
                tmp, dataset, params["n_train"], params["n_val"], params["size"], params["seed"]
            )
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # lost a race only if someone else finished
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if dataset == "voc":
        _mark_synthetic(target / "VOCdevkit" / "VOC2012")  # sets cached by older versions
    # one line per process, not one per step; none in a sweep's Ray workers (the sweep prints it once)
    if target not in _ANNOUNCED and os.environ.get("CSSEG_SYNTHETIC_NOTE", "1") != "0":
        _ANNOUNCED.add(target)
        print(
            f"csseg: no --data-root given, using the synthetic {dataset.upper()} dataset at {target}",
            file=sys.stderr,
        )
    return target


_ANNOUNCED: set[Path] = set()
