"""Reading images and label maps with one-line errors that name the file.

Errors raised here may happen inside DataLoader worker processes. PyTorch re-raises them in
the main process as ``type(err)(message_with_traceback)``; :class:`DataFileError` reduces
such a message back to its last line so the user still sees one line naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from csseg_core.errors import DataError, first_line

_TRACEBACK_MARK = "Traceback (most recent call last)"


class DataFileError(DataError):
    """A :class:`DataError` about one file whose message survives DataLoader workers."""

    def __init__(self, message: str = "") -> None:
        text = str(message)
        if _TRACEBACK_MARK in text:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            last = lines[-1] if lines else text
            prefix = f"{type(self).__module__}.{type(self).__name__}: "
            for p in (prefix, f"{type(self).__name__}: "):
                if last.startswith(p):
                    last = last[len(p) :]
            text = last
        super().__init__(text)


@contextlib.contextmanager
def _decoding(path: Path, kind: str, fix: str, detail: bool = False) -> Iterator[None]:
    """Turn a missing or undecodable ``kind`` file (image, label) into one :class:`DataFileError` line."""
    try:
        yield
    except DataFileError:
        raise
    except FileNotFoundError:
        raise DataFileError(f"{kind} {path} does not exist; restore it or remove its id from the list file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        why = f"{type(err).__name__}: {first_line(err) or 'no detail'}" if detail else type(err).__name__
        raise DataFileError(f"{kind} {path} is unreadable or corrupt ({why}); {fix}") from None


@dataclass(frozen=True)
class SplitFiles:
    """The image/label files of one dataset split, in reader order.

    Attributes:
        ids: Image ids (file stem), one per item.
        images: Image paths.
        labels: Label PNG paths.
        source: The list file (or image folder) the items come from, for messages.
        signature: Content hash of the listing, part of every cache key.
    """

    ids: tuple[str, ...]
    images: tuple[Path, ...]
    labels: tuple[Path, ...]
    source: Path
    signature: str


def listing_signature(*parts: str | Path) -> str:
    """Hash strings and file stats (path, size, mtime) into a short hex signature.

    Args:
        *parts: Strings, or paths whose content (files) or mtime (folders) is hashed.

    Returns:
        A 16-character hex digest.
    """
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, Path):
            st = part.stat()
            h.update(f"{part}|{st.st_mtime_ns}|".encode())
            if part.is_file():
                h.update(part.read_bytes())
        else:
            h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def load_image(path: Path) -> Image.Image:
    """Decode an image file as RGB.

    Args:
        path: Image file.

    Returns:
        The decoded RGB image.

    Raises:
        DataFileError: Missing, unreadable or corrupt file.
    """
    with _decoding(path, "image", "re-download it or remove its id from the list file", detail=True):
        with Image.open(path) as im:
            return im.convert("RGB")


def load_label(path: Path, num_classes: int) -> np.ndarray:
    """Decode a label PNG (palette or grayscale indices) and check its ids.

    Args:
        path: Label PNG.
        num_classes: Largest valid class id (20 for VOC, 150 for ADE); 255 is always allowed.

    Returns:
        ``H x W`` uint8 array of dataset class ids.

    Raises:
        DataFileError: Missing or corrupt file, a colour (RGB) label, or ids out of range.
    """
    with _decoding(path, "label", "re-download it"):
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataFileError(
                    f"label {path} has mode {im.mode}; expected a palette or grayscale PNG of "
                    "class ids (convert colour masks to class-id PNGs)"
                )
            arr = np.asarray(im)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            _raise_range(path, np.unique(arr[(arr < 0) | (arr > 255)]), num_classes)
        arr = arr.astype(np.uint8)
    check_label_range(arr, path, num_classes)
    return arr


def voc_colormap(n: int = 256) -> np.ndarray:
    """The Pascal VOC palette (bit-interleaved class id), ``n x 3`` uint8: the colours of
    VOC's palette label PNGs, and of labels and predictions in TensorBoard samples."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    ids = np.arange(n)
    for shift in range(8):
        for ch in range(3):
            bit = (ids >> ch) & 1
            cmap[:, ch] |= (bit << (7 - shift)).astype(np.uint8)
        ids = ids >> 3
    return cmap


def label_presence(arr: np.ndarray) -> np.ndarray:
    """Which of the 256 ids occur in a uint8 label map.

    Args:
        arr: uint8 label map.

    Returns:
        Boolean vector of length 256.
    """
    return np.bincount(arr.ravel(), minlength=256) > 0


def check_label_range(arr: np.ndarray, path: Path, num_classes: int) -> None:
    """Raise if ``arr`` holds ids above ``num_classes`` other than 255.

    Args:
        arr: uint8 label map.
        path: File name for the message.
        num_classes: Largest valid class id.

    Raises:
        DataFileError: Out-of-range ids.
    """
    if arr.size and int(arr.max()) > num_classes:
        bad = np.unique(arr[(arr > num_classes) & (arr != 255)])
        if bad.size:
            _raise_range(path, bad, num_classes)


def _raise_range(path: Path, bad: np.ndarray, num_classes: int) -> None:
    shown = ", ".join(str(int(v)) for v in bad[:8])
    raise DataFileError(
        f"label {path} holds class ids {shown} outside 0..{num_classes} (255 = void); "
        "fix or remove this label map"
    )


def check_exists(files: tuple[Path, ...], source: Path, what: str) -> None:
    """Raise for the first listed file that does not exist.

    Args:
        files: Paths to check.
        source: The list file or folder they come from, for the message.
        what: ``"image"`` or ``"label"``.

    Raises:
        DataError: A missing file.
    """
    for f in files:
        if not os.path.exists(f):
            raise DataError(
                f"{what} {f} listed in {source} does not exist; restore it or fix the list"
            )
