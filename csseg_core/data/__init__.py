"""VOC / ADE20K loaders, incremental views, paired transforms and the synthetic generator.

Main entry: :func:`build_datasets` -> ``{"train", "val", "test"}`` torch Datasets (``val`` held out
from the train list, see :mod:`csseg_core.data.incremental`) yielding
``(image 3xHxW float, label HxW long in model index space)``.
"""

from csseg_core.data.files import DataFileError
from csseg_core.data.filter_cache import csseg_home, default_cache_dir
from csseg_core.data.incremental import (
    DEFAULT_SPLITS,
    DEFAULT_VAL_FRACTION,
    SPLITS,
    IncrementalSegmentation,
    build_datasets,
    filter_indices,
    heldout_mask,
    keep_mask,
    label_lut,
    read_index_list,
)
from csseg_core.data.synth import default_data_root, generate
from csseg_core.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "DEFAULT_SPLITS",
    "DEFAULT_VAL_FRACTION",
    "SPLITS",
    "DataFileError",
    "EvalTransform",
    "IncrementalSegmentation",
    "TrainTransform",
    "build_datasets",
    "csseg_home",
    "default_cache_dir",
    "default_data_root",
    "filter_indices",
    "heldout_mask",
    "generate",
    "keep_mask",
    "label_lut",
    "read_index_list",
]
