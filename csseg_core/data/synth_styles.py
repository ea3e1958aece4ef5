"""Alternative looks of the synthetic data (``csseg data synth --style``).

The ``default`` style lives in :mod:`csseg_core.data.synth` and is untouched (its files are
byte-identical across versions). The styles here change every statistic a model could
latch onto, so that a profile calibrated on several styles is not tuned to one look:

- ``blobs``: irregular star-shaped blobs (class-specific number of lobes and lobe depth);
  textures are dot lattices, smooth noise blotches, grids and plain fills with class-specific
  spacing; colours are a different class→hue assignment with saturation tiers instead of
  brightness tiers; backgrounds are coloured, more saturated smooth noise; stronger pixel noise.
- ``polygons``: regular polygons with 3-7 sides, rings (annuli, whose hole shows the
  background) and diamonds; textures are stripes of other periods and angles and plaids;
  per-image colour jitter; backgrounds carry faint random stripes (a distractor texture) on
  a grey gradient.

As in the default style, the class of object ``i % n_classes + 1`` is drawn on top of image
``i``, so every class appears in train and val; VOC objects get a 1-2 px void ring (ADE: 0).
Everything is drawn by a ``numpy`` Generator seeded by ``(seed, split, index, style id)``.
"""

from __future__ import annotations

import colorsys
from functools import cache

import numpy as np

STYLES = ("default", "blobs", "polygons")
_STYLE_ID = {"blobs": 101, "polygons": 202}


def _perm(n: int, key: int) -> np.ndarray:
    """A fixed permutation of ``range(n)`` (independent of the dataset seed)."""
    return np.random.default_rng([key, n]).permutation(n)


@cache
def class_look(style: str, c: int, n_classes: int) -> dict:
    """Fixed appearance of foreground class ``c`` (1-based) in ``style``.

    Returns:
        A dict with ``rgb`` (float32 array), ``texture`` and its parameters, ``shape`` and its
        parameters, and ``radius`` (a (lo, hi) fraction of the image side).
    """
    k = c - 1
    n_col = 20 if n_classes <= 20 else 30
    col = int(_perm(n_col, _STYLE_ID[style])[k % n_col])
    # 5 texture kinds; for ADE (150 classes) the texture index separates the 5 colour groups.
    tex = (k * 2) % 5 if n_classes <= 20 else k // n_col
    if style == "blobs":
        tier = col // 10
        hue = (col % 10) / 10 + 0.03 * tier
        sat, val = ((0.95, 0.9), (0.5, 0.95), (0.8, 0.55))[tier]
        return {
            "rgb": np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, val), dtype=np.float32),
            "texture": ("dots", "noise", "grid", "plain", "dots_sparse")[tex],
            "period": (5, 8, 11)[(k // 5) % 3],
            "lobes": (3, 4, 5, 6)[k % 4],
            "depth": (0.18, 0.32)[(k // 4) % 2],
            "shape": "blob",
            "radius": ((0.14, 0.22), (0.2, 0.3), (0.26, 0.36))[(k // 3) % 3],
        }
    tier = col // 10
    hue = (col % 10) / 10 + 0.05 * tier
    sat, val = ((0.75, 0.85), (0.95, 0.6), (0.6, 1.0))[tier]
    shapes = ("poly3", "poly4", "poly5", "poly6", "ring", "diamond", "poly7")
    return {
        "rgb": np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, val), dtype=np.float32),
        "texture": ("stripes", "stripes", "plaid", "stripes", "plain")[tex],
        "period": (3, 6, 9, 12)[(k // 2) % 4],
        "angle": (30.0, 75.0, 0.0, 120.0, 0.0)[tex],
        "shape": shapes[k % 7],
        "radius": ((0.15, 0.23), (0.21, 0.31), (0.27, 0.37))[(k // 7) % 3],
    }


def _smooth(rng: np.random.Generator, grid: int, size: int, channels: int) -> np.ndarray:
    """Bilinearly upsampled ``grid x grid`` uniform noise, ``size x size x channels``."""
    from csseg_core.data.synth import _upsampler

    up = _upsampler(grid, size)
    coarse = rng.uniform(0.0, 1.0, (channels, grid, grid)).astype(np.float32)
    return np.stack([up @ coarse[ch] @ up.T for ch in range(channels)], axis=-1)


def _background(style: str, rng: np.random.Generator, size: int) -> np.ndarray:
    if style == "blobs":
        base = _smooth(rng, int(rng.integers(2, 6)), size, 3)
        gray = base.mean(-1, keepdims=True)
        return 0.2 + 0.6 * (0.55 * gray + 0.45 * base)  # coloured, fairly saturated
    # polygons: grey gradient + faint random stripes (a distractor texture)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    g = rng.uniform(-0.3, 0.3, 2)
    gray = rng.uniform(0.35, 0.65) + g[0] * (xx - 0.5) + g[1] * (yy - 0.5)
    a = rng.uniform(0, np.pi)
    period = rng.uniform(5.0, 14.0)
    stripes = ((xx * np.cos(a) + yy * np.sin(a)) * size // (period / 2)) % 2
    tint = rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    return (gray + 0.08 * stripes)[..., None].astype(np.float32) + tint


def _mask(look: dict, rng: np.random.Generator, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Object mask on normalised coordinates (the unit disc is the object's extent)."""
    d = np.sqrt(dx * dx + dy * dy)
    shape = look["shape"]
    if shape == "blob":
        theta = np.arctan2(dy, dx)
        n, depth = look["lobes"], look["depth"]
        r = 1.0 - depth + depth * np.cos(n * theta + rng.uniform(0, 2 * np.pi))
        r = r + 0.08 * np.cos((n + 1) * theta + rng.uniform(0, 2 * np.pi))
        return d <= np.clip(r, 0.35, 1.0)
    if shape == "ring":
        return (d <= 1.0) & (d >= 0.55)
    if shape == "ellipse":  # the default style's shapes (its clutter objects)
        return d <= 1.0
    if shape == "rectangle":
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    if shape == "triangle":
        t = (dy + 1.0) / 2.0
        return (t >= 0.0) & (t <= 1.0) & (np.abs(dx) <= t * 1.1)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    n = int(shape[4:])  # regular polygon inscribed in the unit circle, random rotation
    theta = np.arctan2(dy, dx) - rng.uniform(0, 2 * np.pi)
    sector = np.pi / n
    local = np.mod(theta, 2 * sector) - sector
    return d * np.cos(local) <= np.cos(sector)


def _texture(look: dict, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Texture in [0, 1] on absolute pixel coordinates ``ys`` x ``xs`` (random phase)."""
    p = look["period"]
    oy, ox = rng.uniform(0, p, 2)
    yy, xx = ys[:, None] + oy, xs[None, :] + ox
    kind = look["texture"]
    if kind in ("dots", "dots_sparse"):
        q = p if kind == "dots" else 2 * p
        fy, fx = np.mod(yy, q) - q / 2, np.mod(xx, q) - q / 2
        return (fy * fy + fx * fx <= (q / 3.5) ** 2).astype(np.float32)
    if kind == "grid":
        return ((np.mod(yy, p) < 1.5) | (np.mod(xx, p) < 1.5)).astype(np.float32)
    if kind == "noise":
        return (rng.uniform(0, 1, (len(ys), len(xs))) < 0.35).astype(np.float32)
    if kind == "plain":
        return np.ones((len(ys), len(xs)), dtype=np.float32)
    a = np.deg2rad(look["angle"])
    s1 = np.floor((xx * np.cos(a) + yy * np.sin(a)) / (p / 2)) % 2
    if kind == "checker":
        return ((s1 + np.floor((-xx * np.sin(a) + yy * np.cos(a)) / (p / 2))) % 2).astype(np.float32)
    if kind == "plaid":
        s2 = np.floor((-xx * np.sin(a) + yy * np.cos(a)) / (p / 2)) % 2
        return (0.5 * (s1 + s2)).astype(np.float32)
    return s1.astype(np.float32)


#: shape and texture families of each style's objects (clutter objects draw from the same families)
_FAMILIES = {
    "default": (("ellipse", "rectangle", "triangle"), ("stripes", "checker")),
    "blobs": (("blob",), ("dots", "noise", "grid", "plain", "dots_sparse")),
    "polygons": (("poly3", "poly4", "poly5", "poly6", "ring", "diamond", "poly7"), ("stripes", "plaid", "plain")),
}


def clutter_look(style: str, rng: np.random.Generator) -> dict:
    """A random look for an unlabelled (background) object: the style's shapes and textures with a
    random colour, so it looks like the dataset's objects without being one of its classes' looks."""
    shapes, textures = _FAMILIES[style]
    return {
        "rgb": np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.35, 1.0), rng.uniform(0.45, 1.0)),
                        dtype=np.float32),
        "texture": str(rng.choice(textures)), "period": float(rng.uniform(4.0, 12.0)),
        "angle": float(rng.choice([0.0, 30.0, 45.0, 75.0, 90.0, 120.0, 135.0])),
        "shape": str(rng.choice(shapes)), "lobes": int(rng.integers(3, 7)), "depth": float(rng.uniform(0.18, 0.32)),
        "radius": (0.12, 0.3),
    }


def draw_clutter(style: str, image: np.ndarray, clutter: int, seed: int, split_code: int, index: int) -> None:
    """Draw 0..``clutter`` unlabelled objects on ``image`` (in place; the label map keeps them background).

    Real photos are full of objects of no annotated class, which a segmentation model must call
    background (the "background shift" MiB and SDR are about); without them, every object a
    step-0 model has seen is an old class, and it calls any new object an old class too. The
    objects come from their own random stream, so the labelled objects drawn over them are the
    same as without clutter.
    """
    from csseg_core.data.synth import place_object

    rng = np.random.default_rng([seed, split_code, index, 7, _STYLE_ID.get(style, 0)])
    size = image.shape[0]
    for _ in range(int(rng.integers(0, clutter + 1))):
        look = clutter_look(style, rng)
        rx, ry, cx, cy, _, (y0, y1, x0, x1) = place_object(rng, look["radius"], size, (0.75, 1.33), 0.5)
        ys, xs = np.arange(y0, y1, dtype=np.float32), np.arange(x0, x1, dtype=np.float32)
        mask = _mask(look, rng, (xs[None, :] - cx) / rx, (ys[:, None] - cy) / ry)
        tex = _texture(look, rng, ys, xs)
        image[y0:y1, x0:x1][mask] = look["rgb"] * (0.55 + 0.45 * tex[mask][:, None])


def render_style(dataset_classes: int, void: int, style: str, index: int, split_code: int, seed: int,
                 size: int, clutter: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image and its label map in ``style`` (not ``default``).

    Args:
        dataset_classes: Number of foreground classes (20 for VOC, 150 for ADE).
        void: Label of the ring around objects (255 for VOC, 0 for ADE).
        style: One of :data:`STYLES` other than ``default``.
        index, split_code, seed, size, clutter: As in :func:`csseg_core.data.synth.render`.

    Returns:
        ``(size x size x 3 uint8 image, size x size uint8 label)``.
    """
    from csseg_core.data.synth import _dilate, object_classes, place_object

    n_cls = dataset_classes
    rng = np.random.default_rng([seed, split_code, index, _STYLE_ID[style]])
    image = _background(style, rng, size)
    if clutter:
        draw_clutter(style, image, clutter, seed, split_code, index)
    label = np.zeros((size, size), dtype=np.uint8)
    for c in object_classes(rng, index, n_cls, (0.35, 0.4, 0.25)):  # the guaranteed class is drawn on top
        look = class_look(style, c, n_cls)
        rx, ry, cx, cy, border, (y0, y1, x0, x1) = place_object(rng, look["radius"], size, (0.8, 1.25), 0.5)
        ys = np.arange(y0, y1, dtype=np.float32)
        xs = np.arange(x0, x1, dtype=np.float32)
        mask = _mask(look, rng, (xs[None, :] - cx) / rx, (ys[:, None] - cy) / ry)
        if not mask.any():
            mask[(y1 - y0) // 2, (x1 - x0) // 2] = True
        tex = _texture(look, rng, ys, xs)
        rgb = look["rgb"]
        if style == "polygons":  # per-object colour jitter
            rgb = np.clip(rgb * rng.uniform(0.85, 1.15) + rng.uniform(-0.04, 0.04, 3), 0, 1).astype(np.float32)
        ring = _dilate(mask, border) & ~mask
        region, lab = image[y0:y1, x0:x1], label[y0:y1, x0:x1]
        shade = 0.55 + 0.45 * tex[mask][:, None]
        region[mask] = rgb * shade
        lab[ring] = void
        lab[mask] = c
    noise = 0.05 if style == "blobs" else 0.03
    image += noise * rng.standard_normal((size, size, 1), dtype=np.float32)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), label
