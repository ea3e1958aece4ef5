"""Step states: plain dicts that ``torch.save`` and ``torch.load(weights_only=True)`` handle.

A state is ``{"step", "config", "model", "statistics", "history", "val_history"}``: model
weights, the statistics later steps need (prototypes, EWC Fisher, PI and RW scores), the
resolved config and the test / validation ``miou_all`` of every step so far. ``state_to_numpy`` / ``state_from_numpy`` convert
it for the Ray object store (numpy arrays travel zero-copy; they come back read-only, so
``state_from_numpy`` copies them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path
from .errors import ConfigError, first_line


def _map(obj: Any, fn_leaf) -> Any:
    if isinstance(obj, dict):
        return {k: _map(v, fn_leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn_leaf) for v in obj)
    return fn_leaf(obj)


def state_to_numpy(state: dict) -> dict:
    """Return a copy of ``state`` whose tensors are numpy arrays (for the object store)."""
    return _map(state, lambda v: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)


def state_from_numpy(state: dict) -> dict:
    """Inverse of :func:`state_to_numpy`; arrays are copied (object-store arrays are read-only)."""
    return _map(state, lambda v: torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray) else v)


def save_state(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _numpy_scalar_globals() -> list:
    """What unpickling numpy scalars needs (the official code saves ``best_score`` as one)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray.scalar, np.dtype, *(type(np.dtype(t)) for t in ("float64", "float32", "int64"))]


def load_state(path: str | os.PathLike, cfg=None) -> dict:
    """Load a state with ``weights_only=True`` (a checkpoint never executes code).

    With ``cfg``, a checkpoint written by the official SDR code (``{"model_state": ...}``) is
    converted to a csseg state for ``cfg``'s model (:func:`csseg_core.models.official.state_from_official`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; pass the .pt file written by `csseg train`")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(err).__name__}: {first_line(err)}); it is not a csseg state") from None
    if cfg is not None:
        from .models.official import is_official_checkpoint, state_from_official

        if is_official_checkpoint(state):
            return state_from_official(state, cfg, str(path))
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ConfigError(f"checkpoint {path} is not a csseg step state (no 'model'/'step' keys) "
                          "nor an official SDR checkpoint (no 'model_state')")
    return state
