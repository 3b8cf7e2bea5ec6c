"""Output files that cannot tear: whole-file writes by atomic replace, and one run at a time per output folder.

- :func:`write_atomic` writes a file's bytes into a hidden temporary file beside it and ``os.replace``-s it, so a
  reader, or the next run after a kill, sees the old file or the new one, never half of one. ``calibration.json``,
  ``metrics.json``, ``skipped.csv`` and the JSON summaries go through it.
- :class:`OutputDirLock` holds an exclusive lock on ``<output_dir>/.medad.lock`` for the life of a run that writes
  into the folder. A second run on the same folder is refused with the first one's process id, instead of
  interleaving its rows with the first one's. The operating system releases the lock when the holder dies, even by
  SIGKILL, so a crashed run never blocks its own ``--resume``.

Row-by-row files (``scores.csv``) are appended one flushed row at a time; a row cut short by a kill is dropped on
resume (:class:`medad_monai.io.writers.ScoresCSVWriter`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "write_json_atomic", "OutputDirLock", "OutputDirBusyError"]

LOCK_NAME = ".medad.lock"


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes ``data`` to ``path`` whole or not at all (temporary file in the same folder, then ``os.replace``).

    Args:
        path: the file; parent folders are created.
        data: text (written as UTF-8) or bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.partial"
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike, allow_nan: bool = True) -> Path:
    """``obj`` as indented JSON (trailing newline) through :func:`write_atomic`.

    Args:
        obj: JSON-serialisable object.
        path: the file.
        allow_nan: write NaN/Infinity (Python's JSON extension); ``False`` raises on them (standard JSON).
    """
    return write_atomic(path, json.dumps(obj, indent=4, allow_nan=allow_nan) + "\n")


class OutputDirBusyError(RuntimeError):
    """Another live process is writing into the output folder."""


class OutputDirLock:
    """An exclusive, non-blocking lock on an output folder (``fcntl.flock`` on ``<folder>/.medad.lock``).

    Use as a context manager or with :meth:`acquire` / :meth:`release`. Re-acquiring in the process that holds it is
    a no-op. Where ``fcntl`` does not exist (Windows) the lock is advisory only and never refuses.

    Args:
        output_dir: the folder; created when missing.
        what: what the run is, for the message (``"inference"``).

    Raises:
        OutputDirBusyError: from :meth:`acquire`, naming the folder, the holder's process id and what to do.
    """

    _held: dict[str, OutputDirLock] = {}

    def __init__(self, output_dir: str | os.PathLike, what: str = "run") -> None:
        self.output_dir = Path(output_dir)
        self.what = what
        self._fh = None

    @property
    def path(self) -> Path:
        return self.output_dir / LOCK_NAME

    def acquire(self) -> OutputDirLock:
        key = str(self.output_dir.resolve())
        holder = self._held.get(key)
        if holder is not None and holder is not self:
            return self  # this process already holds the folder (e.g. an evaluator and its writer)
        if self._fh is not None:
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: advisory only
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                owner = fh.read().strip() or "unknown"
                fh.close()
                raise OutputDirBusyError(
                    f"{self.output_dir} is in use by another run ({owner}). Two runs writing to one output folder "
                    "would mix their rows; wait for it to finish, or pass another --output_dir."
                ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, {self.what}")
        fh.flush()
        self._fh = fh
        self._held[key] = self
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        key = str(self.output_dir.resolve())
        if self._held.get(key) is self:
            del self._held[key]
        self._fh.close()  # closing the descriptor releases the flock
        self._fh = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (manifests, weights provenance, dataset caches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
