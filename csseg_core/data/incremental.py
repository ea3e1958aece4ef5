"""Incremental views: which images a step keeps and how its labels are remapped.

Implements ``sdr_reference.md`` §2.3 (SDR / MiB ``tasks.py`` + dataset classes). With
``cur`` = classes of the step, ``old`` = classes of earlier steps, ``idx(c)`` = model index
(position of ``c`` in ``Scenario.order``):

=========== ======================================== =========================================
split       images kept                              label map
=========== ======================================== =========================================
train       disjoint / sequential: >=1 ``cur`` and   disjoint / overlapped: ``cur`` -> idx,
            every id in ``cur | old | {0, 255}``;    everything else (old, future, 255) -> 0.
            overlapped: >=1 ``cur``                  sequential: ``cur | old`` -> idx,
                                                     255 -> 255, future -> 0 (*)
current     >=1 ``cur`` (always the overlap filter)  0 and ``cur`` -> idx (sequential: also
                                                     ``old``), the rest -> 255
test        >=1 seen class (``cur | old``)           0 and seen -> idx, unseen -> 255
val         as test                                  as test
=========== ======================================== =========================================

(*) Sequential mode, against the reference at HEAD (LTTM/SDR ``623bcb6`` "patch sequential
data scenario", VOC only; its ADE class reorders ``0 | old | cur`` and sends every other id to
0 in train and 255 in val, as we do): its VOC train and ``current`` (its "val") views apply
the identity to the raw ids. With the standard class orders raw id = model index, so train labels agree on the
disjoint-filtered images it uses; future ids can only appear with an ``index_dir`` partition,
where we map them to 0 (as the other modes do) and the reference would pass ids >= the class
count to the loss. In ``current`` we map ids outside ``cur | old | {0}`` to 255 where the
reference keeps them raw: its metric ignores ids >= the class count, so mIoU is identical, and
its val loss would index past the logits. With a permuted order (``19-1b``, ADE ``b``/``c``)
the reference's identity skips the reordering; we always map ids to model indices.
ADE: id 0 ("other") -> 0 at train and -> 255 at val/test (ignored; index 0 still exists).
The remap is a 256-entry uint8 lookup table.

Where the images come from (one rule for VOC, ADE and the synthetic sets):

* ``test`` and ``current`` read the dataset's evaluation images (VOC ``val``, ADE
  ``validation``). ``current`` is the reference code's "val" view (only the step's classes);
  ``test`` is what every paper reports.
* ``val`` is the **held-out validation split**: a fraction ``val_fraction`` of the dataset's
  *train* list (VOC ``train_aug``/``train``, ADE ``training``), chosen by a hash of each image
  id (:func:`heldout_mask`), so it depends on the dataset and the fraction only, never on a
  seed or a method. It is evaluated with test semantics. ``train`` never holds one of these
  images, at any step, in any mode, with or without an ``index_dir`` partition. Sweeps select
  on ``val``; ``test`` is only reported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from csseg_core.data import ade, filter_cache, voc
from csseg_core.data import files as dio
from csseg_core.data.synth import default_data_root
from csseg_core.data.transforms import EvalTransform, TrainTransform
from csseg_core.errors import ConfigError, DataError
from csseg_core.scenarios import Scenario, check_mode, get_scenario

SPLITS = ("train", "val", "test", "current")
DEFAULT_SPLITS = ("train", "val", "test")
DEFAULT_VAL_FRACTION = 0.15
READERS = {"voc": voc, "ade": ade}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def label_lut(scenario: Scenario, mode: str, step: int, split: str) -> np.ndarray:
    """The 256-entry lookup table mapping dataset ids to model indices for one view.

    Args:
        scenario: The scenario.
        mode: ``disjoint``, ``overlapped`` or ``sequential``.
        step: Step index.
        split: ``train``, ``val``, ``test`` or ``current`` (``val`` = ``test`` semantics).

    Returns:
        uint8 array of length 256; apply as ``lut[label]``.
    """
    mode = check_mode(mode)
    _check_split(split)
    split = "test" if split == "val" else split
    inv = {c: i for i, c in enumerate(scenario.order)}
    cur, old = scenario.labels(step), scenario.labels_old(step)
    if split == "train":
        lut = np.zeros(256, dtype=np.uint8)
        keep = old + cur if mode == "sequential" else cur
        if mode == "sequential":
            lut[255] = 255
    else:
        lut = np.full(256, 255, dtype=np.uint8)
        keep = cur if (split == "current" and mode != "sequential") else old + cur
    for c in keep:
        lut[c] = inv[c]
    lut[0] = 255 if (split != "train" and scenario.dataset == "ade") else 0
    return lut


def keep_mask(
    presence: np.ndarray, scenario: Scenario, mode: str, step: int, split: str
) -> np.ndarray:
    """Which images a view keeps, from the per-image label presence.

    Args:
        presence: ``N x 256`` bool array (``presence[i, c]``: image ``i`` holds id ``c``).
        scenario: The scenario.
        mode: ``disjoint``, ``overlapped`` or ``sequential``.
        step: Step index.
        split: ``train``, ``val``, ``test`` or ``current`` (``val`` = ``test`` semantics).

    Returns:
        Bool vector of length ``N``.
    """
    mode = check_mode(mode)
    _check_split(split)
    split = "test" if split == "val" else split
    presence = np.asarray(presence, dtype=bool).reshape(-1, 256)
    cur, old = list(scenario.labels(step)), list(scenario.labels_old(step))
    if split == "test":
        return presence[:, old + cur].any(axis=1)
    has_cur = presence[:, cur].any(axis=1)
    if split == "current" or mode == "overlapped":
        return has_cur
    allowed = np.zeros(256, dtype=bool)
    allowed[[0, 255] + old + cur] = True
    return has_cur & ~(presence & ~allowed).any(axis=1)


def heldout_mask(ids: tuple[str, ...] | list[str], fraction: float) -> np.ndarray:
    """Which train images are held out for validation: ``hash(id) < fraction``.

    The choice of each image depends on its id and the fraction only (SHA-1 of the id mapped
    to [0, 1)), so it is the same for every seed, method, scenario and step, stable when the
    list is reordered or grows, and nested: a larger fraction holds out a superset.

    Args:
        ids: Image ids of the train split.
        fraction: Fraction in [0, 1) to hold out; 0 holds out nothing.

    Returns:
        Bool vector of length ``len(ids)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1) (got {fraction}); e.g. --set val_fraction=0.15")
    if fraction == 0.0:
        return np.zeros(len(ids), dtype=bool)
    u = np.array([int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "big") for i in ids], dtype=np.uint64)
    return (u >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def read_index_list(index_dir: str | Path, step: int, ids: tuple[str, ...]) -> np.ndarray:
    """Read ``train-<step>.npy`` / ``.txt`` (indices or image ids) from ``index_dir``.

    Args:
        index_dir: Folder of per-step lists (e.g. the reference ADE partition).
        step: Step index.
        ids: The train split's image ids, in reader order.

    Returns:
        Sorted unique int64 indices into ``ids``.

    Raises:
        DataError: Missing list, unknown ids or indices out of range.
    """
    d = Path(index_dir).expanduser()
    npy, txt = d / f"train-{step}.npy", d / f"train-{step}.txt"
    if npy.is_file():
        try:
            idx = np.load(npy, allow_pickle=False).astype(np.int64).ravel()
        except (OSError, ValueError) as err:
            raise DataError(f"index list {npy} is unreadable ({err}); rewrite it") from None
        source = npy
    elif txt.is_file():
        tokens, source = txt.read_text().split(), txt
        pos = {x: i for i, x in enumerate(ids)}
        if all(t in pos for t in tokens):
            idx = np.array([pos[t] for t in tokens], dtype=np.int64)
        elif all(t.lstrip("-").isdigit() for t in tokens):
            idx = np.array([int(t) for t in tokens], dtype=np.int64)
        else:
            bad = next(t for t in tokens if t not in pos)
            raise DataError(f"index list {txt} names image {bad!r} that is not in the train split")
    else:
        raise DataError(
            f"index list {npy} (or {txt.name}) does not exist; "
            "add the per-step lists or drop --index-dir"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= len(ids)):
        raise DataError(
            f"index list {source} holds indices outside 0..{len(ids) - 1}; "
            "it was made for a different dataset"
        )
    return np.unique(idx)


def filter_indices(
    dataset: str,
    files: dio.SplitFiles,
    scenario: Scenario,
    mode: str,
    step: int,
    split: str,
    cache_dir: Path,
    index_dir: str | Path | None = None,
) -> np.ndarray:
    """Indices of the images one view keeps, cached on disk.

    Args:
        dataset: ``"voc"`` or ``"ade"``.
        files: The split's files.
        scenario: The scenario.
        mode: Mode name.
        step: Step index.
        split: Split name.
        cache_dir: Cache folder.
        index_dir: Optional per-step train lists replacing the train filter.

    Returns:
        Sorted int64 indices into ``files``.
    """
    num_classes = READERS[dataset].NUM_CLASSES
    use_index = index_dir is not None and split == "train"
    index_sig = ""
    if use_index:
        d = Path(index_dir).expanduser()
        cands = [p for p in (d / f"train-{step}.npy", d / f"train-{step}.txt") if p.is_file()]
        index_sig = dio.listing_signature(*cands) if cands else "missing"
    key = filter_cache.cache_key(
        kind="filter",
        dataset=dataset,
        sig=files.signature,
        steps=scenario.steps,
        mode=mode,
        step=step,
        split=split,
        index=index_sig,
    )
    path = Path(cache_dir) / f"filter-{scenario.name}-{mode}-{split}-{step}-{key}.npy"

    def compute() -> np.ndarray:
        if use_index:
            return read_index_list(index_dir, step, files.ids)
        presence = filter_cache.presence_table(files, dataset, num_classes, Path(cache_dir))
        return np.flatnonzero(keep_mask(presence, scenario, mode, step, split)).astype(np.int64)

    return filter_cache.cached_array(path, compute)


class IncrementalSegmentation(Dataset):
    """One split of one step: items ``(image 3xHxW float, label HxW long)`` in model space.

    Args:
        images: Image paths.
        labels: Label paths.
        ids: Image ids.
        lut: 256-entry uint8 remap table.
        transform: Paired transform ``(image, label uint8) -> (tensor, tensor)``.
        num_classes: Largest valid dataset class id (label range check).
        cache_images: Decode everything once at construction and keep it in memory.
    """

    def __init__(
        self,
        images: tuple[Path, ...],
        labels: tuple[Path, ...],
        ids: tuple[str, ...],
        lut: np.ndarray,
        transform: Callable,
        num_classes: int,
        cache_images: bool = False,
    ) -> None:
        self.images, self.labels, self.ids = tuple(images), tuple(labels), tuple(ids)
        self.lut, self.transform, self.num_classes = lut, transform, num_classes
        self._memory: list | None = None
        if cache_images:
            with ThreadPoolExecutor(8) as pool:
                self._memory = list(pool.map(self._decode, range(len(self.ids))))

    def __len__(self) -> int:
        return len(self.ids)

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, lbl_path = self.images[index], self.labels[index]
        image = dio.load_image(img_path)
        label = dio.load_label(lbl_path, self.num_classes)
        if label.shape != (image.height, image.width):
            raise dio.DataFileError(
                f"label {lbl_path} is {label.shape[1]}x{label.shape[0]} but image {img_path} is "
                f"{image.width}x{image.height}; the label must match its image"
            )
        return np.asarray(image), self.lut[label]

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded ``(H x W x 3 uint8 image, H x W uint8 label in model space)``, untransformed."""
        return self._memory[index] if self._memory is not None else self._decode(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.raw(index)
        return self.transform(image, label)


def build_datasets(
    dataset: str,
    root: str | Path | None,
    scenario: Scenario | str,
    mode: str,
    step: int,
    *,
    crop_size: int,
    crop_val: bool = True,
    cache_dir: str | Path | None = None,
    index_dir: str | Path | None = None,
    splits: tuple[str, ...] = DEFAULT_SPLITS,
    cache_images: bool = False,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> dict[str, IncrementalSegmentation]:
    """Build the train / val / test (/ current) views of one step (see the module docstring).

    Args:
        dataset: ``"voc"`` or ``"ade"``.
        root: Data root; ``None`` uses (and creates once) the synthetic dataset.
        scenario: Scenario or its name.
        mode: ``disjoint``, ``overlapped`` or ``sequential``.
        step: Step index.
        crop_size: Train crop and eval crop side.
        crop_val: Resize + centre-crop val/test images (reference default) or keep them whole.
        cache_dir: Filter cache folder (default ``$CSSEG_HOME/filters``).
        index_dir: Optional per-step train lists (``train-<step>.npy``/``.txt``).
        splits: Which splits to build (default ``train``, ``val``, ``test``).
        cache_images: Keep decoded images in memory (small / synthetic data).
        val_fraction: Fraction of the train list held out as ``val`` (never trained on);
            0 holds out nothing and then ``val`` cannot be built.

    Returns:
        ``{split: dataset}``; each dataset exposes ``ids`` and ``__len__``.

    Raises:
        ConfigError: Unknown dataset, scenario, mode, split or step.
        DataError: Missing or bad data, or a view left empty by the filter.
    """
    if dataset not in READERS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(READERS)}")
    sc = get_scenario(scenario)
    if sc.dataset != dataset:
        raise ConfigError(f"scenario {sc.name} is a {sc.dataset} scenario, not {dataset}")
    mode = check_mode(mode)
    sc.labels(step)  # validates the step
    for split in splits:
        _check_split(split)
    if root is None:
        root = default_data_root(dataset)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else filter_cache.default_cache_dir()
    reader = READERS[dataset]
    out: dict[str, IncrementalSegmentation] = {}
    held: np.ndarray | None = None
    if "val" in splits and val_fraction <= 0:
        raise ConfigError("val_fraction=0 holds out no validation images; set --set val_fraction=0.15 "
                          "or evaluate on test only")
    for split in splits:
        files = reader.split_files(root, "train" if split in ("train", "val") else "test")
        idx = filter_indices(dataset, files, sc, mode, step, split, cache_dir, index_dir)
        if split in ("train", "val"):
            if held is None:
                held = heldout_mask(files.ids, val_fraction)
            idx = idx[held[idx]] if split == "val" else idx[~held[idx]]
        if idx.size == 0 and split == "val":
            raise DataError(
                f"scenario {sc.name}, mode {mode}, step {step}: val_fraction={val_fraction} holds out no image "
                f"of {files.source} with a seen class; raise --set val_fraction (default {DEFAULT_VAL_FRACTION})")
        if idx.size == 0:
            what = f"a class of step {step}" if split in ("train", "current") else "a seen class"
            raise DataError(
                f"scenario {sc.name}, mode {mode}, step {step}: the {split} split is empty after "
                f"filtering (none of the {len(files.ids)} images of {files.source} holds {what}); "
                "check the data root, the scenario or the mode"
            )
        images = tuple(files.images[i] for i in idx)
        dio.check_exists(images, files.source, "image")
        transform = (
            TrainTransform(crop_size) if split == "train" else EvalTransform(crop_size, crop_val)
        )
        out[split] = IncrementalSegmentation(
            images,
            tuple(files.labels[i] for i in idx),
            tuple(files.ids[i] for i in idx),
            label_lut(sc, mode, step, split),
            transform,
            reader.NUM_CLASSES,
            cache_images,
        )
    return out
