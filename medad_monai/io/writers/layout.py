"""Where each image's outputs go in a results folder: output stems (:func:`safe_stem`, :func:`next_stem`,
:func:`assign_stems`), the stems already taken (:func:`stems_on_disk`), and :func:`reconcile_outputs`, which removes
the maps and overlays a stopped run left without a row."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .images import map_source, overlay_source

__all__ = [
    "MAP_SUFFIX",
    "OVERLAY_SUFFIX",
    "safe_stem",
    "next_stem",
    "assign_stems",
    "stems_on_disk",
    "reconcile_outputs",
]

logger = logging.getLogger("medad_monai.io.writers")

#: file name endings of an image's map (``maps/<stem>_anomaly_map.nii.gz``) and overlay
#: (``overlays/<stem>_overlay.png``)
MAP_SUFFIX = "_anomaly_map.nii.gz"
OVERLAY_SUFFIX = "_overlay.png"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(name: str) -> str:
    """``name`` as a file stem that stays in its folder: runs of characters other than letters, digits, ``. _ -``
    become ``_`` and leading/trailing dots and underscores go (so no separators, no ``..``, no hidden file); DICOM UIDs
    and ordinary names come through unchanged. May return ``""``."""
    return _UNSAFE.sub("_", str(name)).strip("._")


def _strip_ext(name: str) -> str:
    if name.lower().endswith(".gz"):
        name = name[:-3]
    root, ext = os.path.splitext(name)
    return root if ext and root else name


def next_stem(path: str, used: set[str]) -> str:
    """The output stem of ``path`` (see :class:`AnomalyResultWriter`) that is not in ``used``; it is added to ``used``.

    The file name without extension(s), made safe; else ``<parent>_<name>``; else ``<name>_2``, ``<name>_3``, ...
    """
    p = Path(path)
    base = safe_stem(_strip_ext(p.name)) or "image"
    candidates = [base]
    if p.parent.name:
        candidates.append(f"{safe_stem(p.parent.name)}_{base}")
    stem = next((c for c in candidates if c not in used), None)
    k = 2
    while stem is None:
        stem = f"{base}_{k}" if f"{base}_{k}" not in used else None
        k += 1
    used.add(stem)
    return stem


def assign_stems(paths: Sequence[str], output_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Output stems of every path, assigned in list order as one writer would, avoiding the stems of maps and
    overlays already in ``output_dir``. Every process of a distributed run computes the same names from the same
    list, so shards written in parallel never collide."""
    used = stems_on_disk(output_dir) if output_dir is not None else set()
    stems: dict[str, str] = {}
    for path in paths:
        if path not in stems:
            stems[path] = next_stem(path, used)
    return stems


def stems_on_disk(output_dir: str | os.PathLike) -> set[str]:
    """The stems of the maps and overlays already in ``output_dir`` (taken for a resumed run)."""
    out = Path(output_dir)
    return _stems_in(out / "maps", MAP_SUFFIX) | _stems_in(
        out / "overlays", OVERLAY_SUFFIX
    )


def _stems_in(folder: Path, suffix: str) -> set[str]:
    if not folder.is_dir():
        return set()
    return {f.name[: -len(suffix)] for f in folder.iterdir() if f.name.endswith(suffix)}


def reconcile_outputs(output_dir: str | os.PathLike, done: set[str]) -> int:
    """Makes the maps and overlays of ``output_dir`` agree with the images that have a row (``done``).

    The row of an image is written last, so a run killed (or failing) between an image's map and its row leaves a map
    or overlay without a row. Those are removed, with a warning, so the image is written again under the same name
    instead of a new one beside an orphan. Temporary files of a killed write are removed too. When the counts of
    maps and overlays match the rows, nothing is read.

    Returns:
        The number of files removed (temporary files not counted).
    """
    out = Path(output_dir)
    removed = 0
    for folder in (out / "maps", out / "overlays"):
        if folder.is_dir():
            for stale in folder.glob(".tmp-*"):
                stale.unlink()
    for folder, suffix, source in (
        (out / "maps", MAP_SUFFIX, map_source),
        (out / "overlays", OVERLAY_SUFFIX, overlay_source),
    ):
        files = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
        if not files or len(files) == len(done):
            continue  # one output per row: nothing to read
        for f in files:
            image = source(f)
            if image not in done:
                logger.warning(
                    "Removing %s: its image %s has no row in the results (a run stopped while writing it); it is "
                    "written again.", f, image,
                )
                f.unlink()
                removed += 1
    return removed
