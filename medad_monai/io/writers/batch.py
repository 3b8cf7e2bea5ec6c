"""Reading the batches given to :meth:`~medad_monai.io.writers.AnomalyResultWriter.write_batch`: checks, numpy columns,
image paths and affines (:func:`unpack_batch`), and per-image values (:func:`item_value`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medad_monai.io.figures import to_numpy

__all__ = ["UnpackedBatch", "unpack_batch", "item_value", "add_batch_axis"]


@dataclass
class UnpackedBatch:
    """A checked batch of ``n`` images: ``anomaly_map`` ``(n, 1, H, W)``, ``pred_score`` ``(n,)``, the other columns
    as numpy (``None`` when absent), one path per image and the per-image affines (``None`` when unknown)."""

    amap: np.ndarray
    scores: np.ndarray
    cols: dict[str, Any]
    paths: list[str]
    affines: np.ndarray | None


def unpack_batch(batch: Mapping[str, Any], need_image: bool, unnamed: Iterator[int]) -> UnpackedBatch:
    """Checks a batch dict and reads its columns (keys: :meth:`~medad_monai.io.writers.AnomalyResultWriter.write_batch`).

    Args:
        batch: a dict of batched values.
        need_image: the batch must hold the ``image`` (overlays are written).
        unnamed: a counter (``itertools.count()``) that numbers images without a path (``image_<n>``).

    Raises:
        ValueError: when a key is missing or the columns do not have one entry per image.
    """
    for key in ("anomaly_map", "pred_score"):
        if batch.get(key) is None:
            raise ValueError(f"AnomalyResultWriter: the batch has no {key!r} (keys: {sorted(batch)}).")
    amap = to_numpy(batch["anomaly_map"])
    if amap.ndim == 3:
        amap = amap[:, None]
    if amap.ndim != 4 or amap.shape[1] != 1:
        raise ValueError(f"AnomalyResultWriter: anomaly_map must be (B, 1, H, W), got shape {tuple(amap.shape)}.")
    n = amap.shape[0]
    scores = to_numpy(batch["pred_score"]).reshape(-1)
    image = batch.get("image")
    if image is None and need_image:
        raise ValueError("AnomalyResultWriter: write_overlays=True needs the 'image' in the batch.")
    cols: dict[str, Any] = {
        "image": None if image is None else to_numpy(image),
        "reconstruction": _opt_np(batch, "reconstruction"),
        "pred_label": _opt_np(batch, "pred_label"),
        "label": _opt_np(batch, "label"),
        "mask": _opt_np(batch, "mask"),
        "has_mask": _opt_np(batch, "has_mask"),
        "normalized_score": _opt_np(batch, "normalized_score"),
    }
    for k, v in [("pred_score", scores)] + list(cols.items()):
        if v is not None and k != "mask" and np.ndim(v) > 0 and len(v) != n:
            raise ValueError(f"AnomalyResultWriter: {k!r} has {len(v)} entries but anomaly_map has {n}.")
    if cols["mask"] is not None and len(cols["mask"]) != n:
        raise ValueError(f"AnomalyResultWriter: 'mask' has {len(cols['mask'])} entries but anomaly_map has {n}.")
    paths = _paths(batch, image, n, unnamed)
    affines = _affines(image, n)
    return UnpackedBatch(amap=amap, scores=scores, cols=cols, paths=paths, affines=affines)


def _opt_np(batch: Mapping[str, Any], key: str) -> np.ndarray | None:
    v = batch.get(key)
    return None if v is None else to_numpy(v)


def item_value(col: np.ndarray | None, i: int, default: Any = None) -> Any:
    if col is None:
        return default
    v = np.asarray(col[i]).reshape(-1)
    if v.size != 1:
        return default
    v = v[0].item()
    return int(v) if isinstance(v, bool) else v


def _paths(batch: Mapping[str, Any], image: Any, n: int, seq: Iterator[int]) -> list[str]:
    paths = batch.get("image_path")
    if paths is None and image is not None:
        meta = getattr(image, "meta", None)
        if isinstance(meta, Mapping):
            paths = meta.get("filename_or_obj")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if paths is None:
        return [f"image_{next(seq):06d}" for _ in range(n)]
    paths = [str(p) for p in paths]
    if len(paths) != n:
        raise ValueError(f"AnomalyResultWriter: {len(paths)} image paths for a batch of {n} maps.")
    return paths


def _affines(image: Any, n: int) -> np.ndarray | None:
    aff = getattr(image, "affine", None)
    if aff is None:
        return None
    a = np.asarray(to_numpy(aff), dtype=np.float64)
    if a.ndim == 2:
        return np.broadcast_to(a, (n,) + a.shape)
    return a if a.shape[0] == n else None


def add_batch_axis(item: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in item.items():
        if v is None:
            out[k] = None
        elif k == "image_path":
            out[k] = [v] if isinstance(v, (str, os.PathLike)) else v
        elif hasattr(v, "unsqueeze"):
            out[k] = v.unsqueeze(0)
        else:
            out[k] = np.asarray(v)[None]
    return out
