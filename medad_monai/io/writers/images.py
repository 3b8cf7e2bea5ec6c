"""The per-image files of a results folder: anomaly maps as NIfTI (:func:`save_map_nifti`,
:func:`load_map_nifti`) and overlay PNGs (:func:`save_png`), each written to a temporary name and renamed, and the
source image each of them records (:func:`map_source`, :func:`overlay_source`) for reconciling a resumed run."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, PngImagePlugin

from medad_monai.io.figures import to_numpy

__all__ = [
    "META_ECODE",
    "save_map_nifti",
    "load_map_nifti",
    "save_png",
    "overlay_title",
    "map_source",
    "overlay_source",
]

logger = logging.getLogger("medad_monai.io.writers")

#: NIfTI header extension code used for the JSON metadata (6 = "comment" in the NIfTI-1 registry).
META_ECODE = 6


def save_map_nifti(
    map2d: Any,
    path: str | os.PathLike,
    affine: Any | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save a 2D anomaly map as a float32 NIfTI-1 file.

    Orientation: the array is stored exactly as given, axis 0 (the rows, H of a ``(B, C, H, W)`` tensor) becoming
    the NIfTI ``i`` axis and axis 1 the ``j`` axis. This is the rule of :func:`medad_monai.data.readers.load_image`
    for NIfTI inputs (first voxel axis = rows, no reorientation) and the layout MONAI's ``LoadImage``
    (``NibabelReader``) and nibabel's ``get_fdata()`` return, so each of them gives the map back on the grid of
    the network input. Pass the input's affine
    (``MetaTensor.affine``, which MONAI keeps up to date through ``Resize``) to put the map in the same world
    coordinates as the source image; without it the affine is the identity.

    Args:
        map2d: ``(H, W)`` or ``(1, H, W)`` array or tensor.
        path: output file, ending in ``.nii.gz`` or ``.nii``; parent folders are created.
        affine: 4x4 (or 3x3 for 2D, embedded into 4x4) voxel-to-world matrix; None for the identity.
        meta: JSON-serialisable key/values stored in a NIfTI header extension (code 6, "comment"); values that
            JSON cannot encode are stored as their ``str``.

    Returns:
        The path written.

    Example:
        >>> p = save_map_nifti(np.zeros((64, 64), np.float32), "/tmp/case_anomaly_map.nii.gz", meta={"score": 0.1})
        >>> load_map_nifti(p).shape
        (64, 64)
    """
    path = Path(path)
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        raise ValueError(f"save_map_nifti: {path} must end in .nii.gz or .nii.")
    a = to_numpy(map2d)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"save_map_nifti: map for {path} must be (H, W) or (1, H, W), got shape {tuple(a.shape)}.")
    img = nib.Nifti1Image(np.ascontiguousarray(a, dtype=np.float32), _affine4(affine))
    img.header.set_data_dtype(np.float32)
    if meta:
        text = json.dumps(dict(meta), default=str).encode("utf-8")
        img.header.extensions.append(nib.nifti1.Nifti1Extension(META_ECODE, text))
    path.parent.mkdir(parents=True, exist_ok=True)
    # nibabel picks gzip from the suffix, so the temporary name keeps it
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_map_nifti(path: str | os.PathLike, with_meta: bool = False):
    """Read a map written by :func:`save_map_nifti`.

    Args:
        path: ``.nii.gz``/``.nii`` file.
        with_meta: also return the affine and the JSON metadata.

    Returns:
        The ``(H, W)`` float32 array, or ``(array, affine, meta)`` when ``with_meta``.
    """
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    if not with_meta:
        return arr
    meta: dict[str, Any] = {}
    for ext in img.header.extensions:
        if ext.get_code() == META_ECODE:
            try:
                meta.update(json.loads(ext.get_content().decode("utf-8")))
            except (ValueError, UnicodeDecodeError):
                logger.warning("Ignoring an unreadable metadata extension in %s", path)
    return arr, np.asarray(img.affine, dtype=np.float64), meta


def _affine4(affine: Any | None) -> np.ndarray:
    if affine is None:
        return np.eye(4)
    a = np.asarray(to_numpy(affine), dtype=np.float64)
    if a.shape == (3, 3):  # 2D homogeneous matrix: keep x/y and their translation, identity along z
        out = np.eye(4)
        out[:2, :2] = a[:2, :2]
        out[:2, 3] = a[:2, 2]
        return out
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4 or 3x3, got shape {a.shape}.")
    return a


def save_png(img: Image.Image, path: Path, text: Mapping[str, str] | None = None) -> Path:
    """Write a PNG atomically, keeping the panel boxes and ``text`` as PNG text chunks."""
    info = PngImagePlugin.PngInfo()
    chunks = dict(text or {})
    if "panel_boxes" in img.info:
        chunks["panel_boxes"] = img.info["panel_boxes"]
    for k, v in chunks.items():
        info.add_text(k, str(v))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        img.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def overlay_title(path: str, score: float, norm: float | None, label: int, gt: int) -> str:
    parts = [Path(path).name, f"score {score:.4g}"]
    if norm is not None:
        parts.append(f"normalized {norm:.3g}")
    names = {0: "normal", 1: "anomalous"}
    if label in names:
        parts.append(f"pred: {names[label]}")
    if gt in names:
        parts.append(f"truth: {names[gt]}")
    return "   ".join(parts)


def map_source(path: Path) -> str | None:
    """The input image recorded in a map's metadata (header only; the map itself is not read)."""
    try:
        header = nib.load(str(path)).header
    except Exception:  # noqa: BLE001 - an unreadable map is an orphan
        return None
    for ext in header.extensions:
        if ext.get_code() == META_ECODE:
            try:
                return json.loads(ext.get_content().decode("utf-8")).get("image")
            except (ValueError, UnicodeDecodeError):
                return None
    return None


def overlay_source(path: Path) -> str | None:
    """The input image recorded in an overlay PNG's text chunk."""
    try:
        with Image.open(path) as im:
            return im.text.get("image")
    except Exception:  # noqa: BLE001 - an unreadable overlay is an orphan
        return None
