"""On-disk caches: per-image label presence and per-step filter results.

Both are small ``.npy`` files in the cache directory (default ``$CSSEG_HOME/filters``, with
``CSSEG_HOME`` defaulting to ``~/.cache/csseg``). Keys hash the split's listing signature
(list-file content and mtimes, see :func:`csseg_core.data.files.listing_signature`), so a changed
dataset gets new entries. Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from csseg_core.atomic import atomic_path
from csseg_core.data import files as dio

CACHE_VERSION = 1


def csseg_home() -> Path:
    """The csseg cache root: ``$CSSEG_HOME`` or ``~/.cache/csseg``."""
    return Path(os.environ.get("CSSEG_HOME") or "~/.cache/csseg").expanduser()


def default_cache_dir() -> Path:
    """Default folder of the filter caches: ``$CSSEG_HOME/filters``."""
    return csseg_home() / "filters"


def cache_key(**fields) -> str:
    """Hash JSON-serialisable fields into a 20-character hex key.

    Args:
        **fields: Everything the cached value depends on.

    Returns:
        The key.
    """
    blob = json.dumps({"v": CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array)
    except OSError:  # a read-only cache only costs recomputation
        pass


def _load(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None


def cached_array(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Load ``path`` if it holds a valid array, else compute, save and return it.

    Args:
        path: The ``.npy`` cache file.
        compute: Builds the array when the cache misses.

    Returns:
        The array.
    """
    arr = _load(path)
    if arr is None:
        arr = compute()
        _save_atomic(path, arr)
    return arr


def scan_presence(
    labels: tuple[Path, ...], num_classes: int, workers: int | None = None
) -> np.ndarray:
    """Read every label PNG once and record which ids it holds.

    PNG decoding releases the GIL, so a thread pool scales over cores.

    Args:
        labels: Label files.
        num_classes: Largest valid class id (ids above it other than 255 raise).
        workers: Threads (default: up to 8, one per core).

    Returns:
        ``N x 256`` bool array.

    Raises:
        DataFileError: A missing or corrupt label, or out-of-range ids.
    """

    def one(path: Path) -> np.ndarray:
        return dio.label_presence(dio.load_label(path, num_classes))

    if not labels:
        return np.zeros((0, 256), dtype=bool)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if workers == 1 or len(labels) < 64:
        rows = [one(p) for p in labels]
    else:
        with ThreadPoolExecutor(workers) as pool:
            rows = list(pool.map(one, labels, chunksize=32))
    return np.stack(rows)


def presence_table(
    files: dio.SplitFiles, dataset: str, num_classes: int, cache_dir: Path
) -> np.ndarray:
    """Label presence per image of a split, cached on disk (bit-packed).

    Args:
        files: The split's files.
        dataset: ``"voc"`` or ``"ade"``.
        num_classes: Largest valid class id.
        cache_dir: Cache folder.

    Returns:
        ``N x 256`` bool array.
    """
    key = cache_key(kind="presence", dataset=dataset, sig=files.signature, n=len(files.labels))
    path = Path(cache_dir) / f"presence-{dataset}-{key}.npy"
    packed = cached_array(
        path, lambda: np.packbits(scan_presence(files.labels, num_classes), axis=1)
    )
    if packed.shape != (len(files.labels), 32):
        packed = np.packbits(scan_presence(files.labels, num_classes), axis=1)
        _save_atomic(path, packed)
    return np.unpackbits(packed, axis=1).astype(bool)
