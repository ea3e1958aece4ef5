"""Paired image/label transforms (the reference pipeline), on PIL images and numpy arrays.

Train: RandomResizedCrop(crop, scale=(0.5, 2.0), ratio=(3/4, 4/3)) with torchvision's
parameter sampling (10 attempts, then the centre-crop fallback; a scale above 1 of the area
often fails the fit test, as in the reference) -> horizontal flip (p=0.5) -> tensor ->
ImageNet normalisation. Eval: resize the shorter side to ``crop`` and centre-crop
(``crop_val=True``, the reference default) or the full image. Images are resampled bilinearly,
labels with NEAREST. Randomness comes from torch's generator, so ``torch.manual_seed`` and the
DataLoader's per-worker seeding make it reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.5, 2.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Sample a crop box as torchvision's ``RandomResizedCrop.get_params`` does.

    Args:
        height: Image height.
        width: Image width.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).

    Returns:
        ``(top, left, crop_height, crop_width)``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,)))
            j = int(torch.randint(0, width - w + 1, size=(1,)))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_tensor_pair(
    image: Image.Image | np.ndarray, label: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert to a normalised float image tensor and a LongTensor label.

    Args:
        image: RGB image (PIL or ``H x W x 3`` uint8 array).
        label: ``H x W`` uint8 label map (already in model index space).

    Returns:
        ``(3 x H x W float32, H x W int64)``.
    """
    arr = np.array(image, dtype=np.uint8, copy=True)  # writable, never shared with a cache
    img = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    img = img.sub_(_MEAN).div_(_STD)
    return img, torch.from_numpy(np.array(label, dtype=np.int64, copy=True))


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


class TrainTransform:
    """RandomResizedCrop -> horizontal flip -> tensor -> normalise, on (image, label).

    Args:
        crop_size: Output side length.
        scale: Area range of the crop.
        ratio: Aspect-ratio range of the crop.
        flip_p: Probability of a horizontal flip.
    """

    def __init__(
        self,
        crop_size: int,
        scale: tuple[float, float] = (0.5, 2.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
    ) -> None:
        self.crop_size = int(crop_size)
        self.scale, self.ratio, self.flip_p = scale, ratio, flip_p

    def __call__(self, image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply to one pair (image PIL/array, label uint8 array)."""
        image = _as_pil(image)
        width, height = image.size
        i, j, h, w = random_resized_crop_params(height, width, self.scale, self.ratio)
        size, box = (self.crop_size, self.crop_size), (j, i, j + w, i + h)
        image = image.resize(size, Image.BILINEAR, box=box)
        lbl = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST, box=box))
        img = np.asarray(image)
        if float(torch.rand(1)) < self.flip_p:
            img, lbl = img[:, ::-1], lbl[:, ::-1]
        return to_tensor_pair(img, lbl)


class EvalTransform:
    """Resize shorter side + centre crop (``crop_val``) or the full image, then normalise.

    Args:
        crop_size: Side length of the centre crop.
        crop_val: Whether to resize and crop; ``False`` keeps the full image.
    """

    def __init__(self, crop_size: int, crop_val: bool = True) -> None:
        self.crop_size, self.crop_val = int(crop_size), bool(crop_val)

    def __call__(self, image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply to one pair (image PIL/array, label uint8 array)."""
        if not self.crop_val:
            return to_tensor_pair(image, label)
        image = _as_pil(image)
        width, height = image.size
        c = self.crop_size
        if width <= height:
            new_w, new_h = c, int(c * height / width)
        else:
            new_w, new_h = int(c * width / height), c
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BILINEAR)
            label = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.NEAREST))
        top = int(round((new_h - c) / 2.0))
        left = int(round((new_w - c) / 2.0))
        img = np.asarray(image)[top : top + c, left : left + c]
        return to_tensor_pair(img, label[top : top + c, left : left + c])
