"""Atomic file writes: the one place that writes a temporary file and renames it into place.

A reader never sees half a file, and a writer interrupted before the rename (an exception, a
``KeyboardInterrupt``) leaves the old file untouched and no temporary file behind. A writer
killed with SIGKILL can leave a hidden ``.<name>.<random>.tmp`` next to the target; readers
never look at those (they match no ``*.json`` / ``*.parquet`` / ``*.pt`` pattern), and the next
write does not either.

Example:
    >>> import json, tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out" / "x.json"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text(json.dumps({"a": 1}))
    >>> json.loads(target.read_text())
    {'a': 1}
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; rename it over ``path`` when the block ends.

    The folder of ``path`` is created if needed. The temporary file exists (empty) when the
    block starts and is created with the process's umask, like a plain ``open(path, "w")``.
    Write it by name (``torch.save(obj, tmp)``, ``tmp.write_text(...)``) or open it yourself.

    Args:
        path: the file to write.

    Yields:
        The temporary path (same folder, hidden name ending in ``.tmp``).

    Raises:
        Whatever the block raises; then ``path`` is untouched and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
