"""``csseg dashboard DIR``: optuna-dashboard on a sweep's Optuna journal, bound to 127.0.0.1.

    csseg dashboard sweeps/<name>                      # the only grid cell's study
    csseg dashboard sweeps/<name> --cell voc-15-1-disjoint --port 8081

Each grid cell keeps its study (named after the cell) in ``optuna-<cell>.log``, a
``JournalStorage`` file that a running sweep keeps appending to; the dashboard reads it live.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from csseg_core.errors import ConfigError

from .export import sweep_info

INSTALL_HINT = "pip install -e '.[dashboard]'"


def journal_path(sweep_dir: str | os.PathLike, cell: str | None = None) -> Path:
    """The journal file of ``cell`` (default: the sweep's only one).

    Raises:
        ConfigError: not a sweep folder, no journal (nothing searched), or several cells and no ``cell``.
    """
    sweep_dir = Path(sweep_dir)
    sweep_info(sweep_dir)
    journals = {p.name[len("optuna-"):-len(".log")]: p for p in sorted(sweep_dir.glob("optuna-*.log"))}
    if not journals:
        raise ConfigError(f"{sweep_dir} has no Optuna journal (optuna-<cell>.log): nothing was searched yet")
    if cell is None and len(journals) > 1:
        raise ConfigError(f"{sweep_dir} has one study per grid cell; pick one with --cell: {', '.join(journals)}")
    cell = cell or next(iter(journals))
    if cell not in journals:
        raise ConfigError(f"no study for cell {cell!r} in {sweep_dir}; cells: {', '.join(journals)}")
    return journals[cell]


def serve(sweep_dir: str | os.PathLike, cell: str | None = None, port: int = 8080,
          echo: Callable[[str], None] = print) -> None:
    """Run optuna-dashboard on the cell's journal until Ctrl-C (127.0.0.1 only)."""
    path = journal_path(sweep_dir, cell)
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise ConfigError(f"csseg dashboard needs optuna-dashboard: {INSTALL_HINT}") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    echo(f"optuna-dashboard on {path.name}: http://127.0.0.1:{port}/  (Ctrl-C stops it)")
    run_server(JournalStorage(JournalFileBackend(str(path))), host="127.0.0.1", port=port)
