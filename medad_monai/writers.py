"""Per-image result writers: anomaly maps as NIfTI, overlay PNGs, a resumable scores CSV and a summary figure.

Everything here is engine-independent (plain dicts of arrays or tensors in, files out); the Ignite wrapper is
:class:`medad_monai.handlers.AnomalyWriterHandler`. Layout of a results folder written by
:class:`AnomalyResultWriter`::

    <output_dir>/scores.csv                          image,pred_score,pred_label[,normalized_score]
    <output_dir>/maps/<stem>_anomaly_map.nii.gz      float32 map on the network's input grid
    <output_dir>/overlays/<stem>_overlay.png         input | reconstruction | heatmap (see medad_monai.visualize)
    <output_dir>/summary.png                         highest- and lowest-scoring overlays (summary_figure)

Design choices (ours): rows are flushed one by one and every file is written to a temporary name and then renamed,
so a killed batch job leaves only complete files and complete rows behind, and ``resume=True`` carries on where it
stopped. A row is written last, after the map and overlay of that image, so a row in ``scores.csv`` means all the
outputs of that image exist.
"""

from __future__ import annotations

import csv
import heapq
import io
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, PngImagePlugin

from medad_monai.outputs import OutputDirLock, write_atomic
from medad_monai.visualize import default_vmax, grid, overlay_panel, to_numpy

__all__ = [
    "save_map_nifti",
    "load_map_nifti",
    "ScoresCSVWriter",
    "AnomalyResultWriter",
    "BackgroundBatchWriter",
    "safe_stem",
    "next_stem",
    "assign_stems",
    "stems_on_disk",
    "write_skipped_csv",
    "read_complete_rows",
    "done_images",
    "done_images_in",
    "part_csv_name",
    "merge_part_files",
    "reconcile_outputs",
]

logger = logging.getLogger(__name__)

#: NIfTI header extension code used for the JSON metadata (6 = "comment" in the NIfTI-1 registry).
_META_ECODE = 6


# ----------------------------------------------------------------------------------------------------------------
# NIfTI maps


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
        img.header.extensions.append(nib.nifti1.Nifti1Extension(_META_ECODE, text))
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
        if ext.get_code() == _META_ECODE:
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


# ----------------------------------------------------------------------------------------------------------------
# scores CSV


class ScoresCSVWriter:
    """Appends one row per image to a CSV file, flushing after every row.

    The first column identifies the image (``"image"`` by default). The header is written once, when the file is
    new or empty. With ``resume=True`` an existing file is kept: its header must match, a last row cut short by a
    killed job is dropped, and :meth:`done_images` tells the caller which images need no new run. With
    ``resume=False`` an existing file is replaced.

    Values are written with ``str`` after converting tensors and numpy scalars to Python numbers, so floats keep
    full precision; ``None`` becomes an empty cell.

    Args:
        path: CSV file; parent folders are created.
        fieldnames: the leading columns, the first being the image identifier.
        extra_fields: more columns appended after ``fieldnames`` (e.g. ``("normalized_score",)``).
        resume: keep an existing file and append to it.

    Example:
        >>> with ScoresCSVWriter("/tmp/scores.csv") as w:
        ...     w.write({"image": "a.png", "pred_score": 0.12, "pred_label": 1})
        >>> sorted(ScoresCSVWriter("/tmp/scores.csv", resume=True).done_images())
        ['a.png']
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fieldnames: Sequence[str] = ("image", "pred_score", "pred_label"),
        extra_fields: Sequence[str] = (),
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        self.fieldnames = tuple(fieldnames) + tuple(f for f in extra_fields if f not in fieldnames)
        if not self.fieldnames:
            raise ValueError(f"ScoresCSVWriter for {self.path} needs at least one column.")
        self._done: set[str] = set()
        self._rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        need_header = True
        if resume and self.path.exists() and self.path.stat().st_size > 0:
            self._load_existing()
            need_header = False
        elif self.path.exists() and self.path.stat().st_size > 0:
            logger.info("Replacing existing %s (resume=False)", self.path)
        self._fh = open(self.path, "a" if not need_header else "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh)
        if need_header:
            self._writer.writerow(self.fieldnames)
            self._fh.flush()

    def _load_existing(self) -> None:
        header, rows, torn = read_complete_rows(self.path)
        if torn:
            # a job killed mid-row: drop the incomplete row so the file stays a valid table
            logger.warning("Dropping an incomplete last row of %s: %r", self.path, torn[:200])
            with open(self.path, "rb+") as fb:
                fb.truncate(os.path.getsize(self.path) - len(torn))
        if header is None:
            raise ValueError(f"{self.path} has no complete header line; delete it or use resume=False.")
        if tuple(header) != self.fieldnames:
            raise ValueError(
                f"Cannot resume {self.path}: its columns are {header} but this writer writes {list(self.fieldnames)}. "
                "Use another output folder, or resume=False to start the file again."
            )
        for row in rows:
            self._done.add(row[0])
            self._rows += 1

    def write(self, row: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Append one row and flush it.

        Args:
            row: column -> value; missing columns are left empty.
            fields: more column values (``write(image="a.png", pred_score=0.1)``).
        """
        values = dict(row or {}, **fields)
        unknown = set(values) - set(self.fieldnames)
        if unknown:
            raise ValueError(f"{self.path}: unknown column(s) {sorted(unknown)}; columns are {list(self.fieldnames)}.")
        key = values.get(self.fieldnames[0])
        if key is None or str(key) == "":
            raise ValueError(f"{self.path}: every row needs a value for the {self.fieldnames[0]!r} column.")
        self._writer.writerow([_cell(values.get(f)) for f in self.fieldnames])
        self._fh.flush()
        self._done.add(str(key))
        self._rows += 1

    def done_images(self) -> set[str]:
        """Identifiers (first column) of every row in the file, including rows kept from a resumed file."""
        return set(self._done)

    def __len__(self) -> int:
        return self._rows

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> ScoresCSVWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_complete_rows(path: str | os.PathLike) -> tuple[list[str] | None, list[list[str]], bytes]:
    """The rows of a CSV file written row by row, without a last row cut short by a killed writer.

    A row is complete when its line ending was written (rows are flushed whole, so a kill can only cut the last one).

    Returns:
        ``(header, rows, torn)``: the header (``None`` when even it is incomplete), the complete non-empty rows, and
        the bytes of the incomplete last row (empty when there is none).
    """
    data = Path(path).read_bytes()
    cut = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
    reader = csv.reader(io.StringIO(data[:cut].decode("utf-8"), newline=""))
    header = next(reader, None)
    return header, [row for row in reader if row], data[cut:]


def done_images(csv_path: str | os.PathLike, column: str = "image") -> set[str]:
    """The images that have a complete row in a results CSV (``scores.csv``) of an earlier run: what a resumed run
    need not process again. An incomplete last row does not count. Empty when the file does not exist."""
    if not os.path.isfile(csv_path):
        return set()
    header, rows, _ = read_complete_rows(csv_path)
    if not header or column not in header:
        return set()
    i = header.index(column)
    return {row[i] for row in rows if len(row) > i}


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if hasattr(v, "item"):  # numpy / torch scalars -> Python numbers (full-precision str)
        n = v.numel() if hasattr(v, "numel") else np.asarray(v).size
        if n == 1:
            v = v.item()
    if isinstance(v, bool):
        return str(int(v))
    return str(v)


# ----------------------------------------------------------------------------------------------------------------
# all results of an evaluation / inference run


class AnomalyResultWriter:
    """Writes the per-image results of an anomaly-detection run and keeps a summary of the extremes.

    For each image of a batch it writes, in this order:

    1. ``maps/<stem>_anomaly_map.nii.gz`` with :func:`save_map_nifti` (affine taken from the input ``MetaTensor``
       when there is one; metadata: source path, score, label, threshold);
    2. ``overlays/<stem>_overlay.png`` with :func:`medad_monai.visualize.overlay_panel`, on a heatmap scale fixed
       for the whole run (``overlay_vmin``/``overlay_vmax``, never per image);
    3. a row ``image,pred_score,pred_label[,normalized_score]`` of ``scores.csv``.

    ``<stem>`` is the input's file name without its extension(s) (``.nii.gz`` counts as one), with characters
    other than letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``. When a different input already used that
    stem (two ``image.png`` in different folders), the parent folder's name is prefixed (``<parent>_<stem>``), and
    if that is taken too a counter is appended (``<stem>_2``, ``<stem>_3``, ...). With ``resume=True`` the stems
    of files already in ``maps/``/``overlays/`` count as taken, so a resumed job never overwrites another image.

    An exception while writing one image is logged with that image's path and recorded in :attr:`failures`; the
    other images are still written. Since the row comes last, a failed image has no row and a resumed run tries it
    again. Malformed batches (missing keys, inconsistent batch sizes) raise ``ValueError`` at once, since they
    would fail for every image.

    Args:
        output_dir: results folder.
        calibration: optional calibration object (duck-typed: ``pixel_threshold``, and ``normalize_score(score)``
            when it has one); gives the default ``pixel_threshold`` and the ``normalized_score`` column.
        write_maps: write the NIfTI maps.
        write_overlays: write the overlay PNGs.
        pixel_threshold: outline threshold of the overlays; defaults to ``calibration.pixel_threshold``, else
            no outline.
        overlay_vmin: map value drawn darkest.
        overlay_vmax: map value drawn brightest; default ``2 * pixel_threshold`` (threshold mid-scale) when a
            threshold is known, else 1.0. Fixed for the whole run.
        score_normalizer: ``score -> normalized score``; when given (or the calibration has ``normalize_score``)
            a ``normalized_score`` column is written. A ``normalized_score`` entry in the batch takes precedence.
        resume: keep an existing ``scores.csv`` and skip images already listed in it; maps and overlays without a
            row are removed first (:func:`reconcile_outputs`) unless ``reconcile=False``.
        summary_size: how many overlays to keep in memory for :meth:`summary_figure` (half highest, half lowest).
        scale, alpha, cmap: passed to :func:`~medad_monai.visualize.overlay_panel`.
        transpose_overlays: draw overlays transposed. Not needed with :mod:`medad_monai.data.readers`, which keep
            rows as rows; set it when images were read with MONAI's ``PILReader`` default
            ``reverse_indexing=True`` (width first), so overlays look like the source PNGs. Maps are always stored
            on the tensor's own grid.
        csv_name: the rows' file in ``output_dir``.
        lock: hold :class:`~medad_monai.outputs.OutputDirLock` on ``output_dir`` until :meth:`close`, so a second run
            on the folder is refused (a distributed run's processes share one lock, held by rank 0).
        stems: precomputed output stems per image path (:func:`assign_stems`), for processes writing shards of one
            list into one folder.
        reconcile: see ``resume``.

    Example:
        >>> w = AnomalyResultWriter("/tmp/results", pixel_threshold=0.1)
        >>> w.write_batch({"image": img, "reconstruction": rec, "anomaly_map": amap, "pred_score": scores,
        ...                "pred_label": labels, "image_path": paths})  # doctest: +SKIP
        >>> w.summary_figure("/tmp/results/summary.png"); w.close()  # doctest: +SKIP
    """

    MAP_SUFFIX = "_anomaly_map.nii.gz"
    OVERLAY_SUFFIX = "_overlay.png"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        calibration: Any | None = None,
        write_maps: bool = True,
        write_overlays: bool = True,
        pixel_threshold: float | None = None,
        overlay_vmin: float = 0.0,
        overlay_vmax: float | None = None,
        score_normalizer: Callable[[float], float] | None = None,
        resume: bool = False,
        summary_size: int = 16,
        scale: int = 2,
        alpha: float = 0.5,
        cmap: str = "inferno",
        transpose_overlays: bool = False,
        csv_name: str = "scores.csv",
        lock: bool = True,
        stems: Mapping[str, str] | None = None,
        reconcile: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.maps_dir = self.output_dir / "maps"
        self.overlays_dir = self.output_dir / "overlays"
        self.write_maps = bool(write_maps)
        self.write_overlays = bool(write_overlays)
        if pixel_threshold is None and calibration is not None:
            pixel_threshold = getattr(calibration, "pixel_threshold", None)
        self.pixel_threshold = None if pixel_threshold is None else float(pixel_threshold)
        self.overlay_vmin = float(overlay_vmin)
        if overlay_vmax is None:
            overlay_vmax = default_vmax(self.overlay_vmin, self.pixel_threshold)
        self.overlay_vmax = float(overlay_vmax)
        if not self.overlay_vmax > self.overlay_vmin:
            raise ValueError(
                f"overlay_vmax ({self.overlay_vmax}) must be greater than overlay_vmin ({self.overlay_vmin})."
            )
        if score_normalizer is None and callable(getattr(calibration, "normalize_score", None)):
            score_normalizer = calibration.normalize_score
        self.score_normalizer = score_normalizer
        self.scale, self.alpha, self.cmap = int(scale), float(alpha), cmap
        self.transpose_overlays = bool(transpose_overlays)
        self.summary_size = max(0, int(summary_size))

        extra = ("normalized_score",) if score_normalizer is not None else ()
        self._lock = OutputDirLock(self.output_dir, "writing anomaly results")
        if lock:
            self._lock.acquire()
        try:
            self.scores = ScoresCSVWriter(self.output_dir / csv_name, extra_fields=extra, resume=resume)
        except Exception:
            self._lock.release()
            raise
        self._done = self.scores.done_images()
        self._stem_of: dict[str, str] = {}
        self._used_stems: set[str] = set()
        if stems is not None:
            self._stem_of.update(stems)
            self._used_stems |= set(stems.values())
        if resume:
            if reconcile:
                reconcile_outputs(self.output_dir, self._done)
            self._used_stems |= stems_on_disk(self.output_dir)
        #: ``(image path, error message)`` of every image that could not be written.
        self.failures: list[tuple[str, str]] = []
        #: images fully written by this writer (rows kept from a resumed file not included).
        self.n_written = 0
        #: images skipped because ``scores.csv`` already had them (``resume=True``).
        self.n_skipped = 0
        self._seq = itertools.count()  # tie-breaker in the heaps, so panels are never compared
        self._unnamed = itertools.count()
        self._high: list[tuple[float, int, Image.Image]] = []  # min-heap of the highest scores
        self._low: list[tuple[float, int, Image.Image]] = []  # min-heap of negated scores: the lowest scores

    # ------------------------------------------------------------------------------------------------------------
    def done_images(self) -> set[str]:
        """Image paths already in ``scores.csv`` (from a resumed file or written by this writer)."""
        return set(self._done)

    def write_batch(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Write every image of a batch.

        Args:
            batch: a dict of batched values: ``image`` (B, C, H, W), ``anomaly_map`` (B, 1, H, W), ``pred_score``
                (B,), and optionally ``reconstruction`` (B, C, H, W), ``pred_label`` (B,), ``image_path``
                (list of B str; else ``filename_or_obj`` of a MONAI ``MetaTensor``, else ``image_<n>``), ``mask``
                (B, 1, H, W) with ``has_mask`` (B,), ``label`` (B,) ground truth and ``normalized_score`` (B,).
                A list of per-image dicts (MONAI's decollated output, no batch axis) is accepted too.
        """
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
            for item in batch:
                self.write_batch(_add_batch_axis(item))
            return
        if not isinstance(batch, Mapping):
            raise ValueError(f"AnomalyResultWriter.write_batch expects a dict or a list of dicts, got {type(batch)}.")
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
        if image is None and self.write_overlays:
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
        paths = _paths(batch, image, n, self._unnamed)
        affines = _affines(image, n)

        for i in range(n):
            path = paths[i]
            if path in self._done:
                self.n_skipped += 1
                continue
            try:
                self._write_one(i, path, amap[i], float(scores[i]), cols, None if affines is None else affines[i])
            except Exception as e:  # noqa: BLE001 - one bad image must not stop a batch job
                msg = f"{type(e).__name__}: {e}"
                logger.error("Could not write the results of %s: %s", path, msg)
                self.failures.append((path, msg))

    __call__ = write_batch

    def _write_one(self, i: int, path: str, amap: np.ndarray, score: float, cols: dict, affine) -> None:
        stem = self._stem(path)
        label = _item(cols["pred_label"], i, default=-1)
        norm = _item(cols["normalized_score"], i)
        if norm is None and self.score_normalizer is not None:
            norm = float(self.score_normalizer(score))
        if self.write_maps:
            meta = {"image": path, "pred_score": score, "pred_label": label, "pixel_threshold": self.pixel_threshold}
            save_map_nifti(amap, self.maps_dir / f"{stem}{self.MAP_SUFFIX}", affine=affine, meta=meta)
        need_panel = self.write_overlays or self._wants_for_summary(score)
        if need_panel:
            gt = None
            if cols["mask"] is not None and (cols["has_mask"] is None or bool(cols["has_mask"][i])):
                gt = cols["mask"][i]
            panel = overlay_panel(
                cols["image"][i],
                None if cols["reconstruction"] is None else cols["reconstruction"][i],
                amap,
                pixel_threshold=self.pixel_threshold,
                vmin=self.overlay_vmin,
                vmax=self.overlay_vmax,
                gt_mask=gt,
                title=_title(path, score, norm, label, _item(cols["label"], i, default=-1)),
                scale=self.scale,
                alpha=self.alpha,
                cmap=self.cmap,
                transpose=self.transpose_overlays,
            )
            if self.write_overlays:
                png_text = {"image": path, "pred_score": repr(score)}
                _save_png(panel, self.overlays_dir / f"{stem}{self.OVERLAY_SUFFIX}", png_text)
            self._remember(score, panel)
        row = {"image": path, "pred_score": score, "pred_label": label}
        if "normalized_score" in self.scores.fieldnames:
            row["normalized_score"] = norm
        self.scores.write(row)
        self._done.add(path)
        self.n_written += 1

    # ------------------------------------------------------------------------------------------------------------
    def _stem(self, path: str) -> str:
        if path not in self._stem_of:
            self._stem_of[path] = next_stem(path, self._used_stems)
        return self._stem_of[path]

    def _wants_for_summary(self, score: float) -> bool:
        if self.summary_size == 0 or not math.isfinite(score):
            return False
        k_hi, k_lo = self._capacity()
        high_enough = k_hi > 0 and (len(self._high) < k_hi or score > self._high[0][0])
        low_enough = k_lo > 0 and (len(self._low) < k_lo or -score > self._low[0][0])
        return high_enough or low_enough

    def _capacity(self) -> tuple[int, int]:
        return self.summary_size - self.summary_size // 2, self.summary_size // 2

    def _remember(self, score: float, panel: Image.Image) -> None:
        if self.summary_size == 0 or not math.isfinite(score):
            return
        k_hi, k_lo = self._capacity()
        seq = next(self._seq)
        for heap, key, cap in ((self._high, score, k_hi), (self._low, -score, k_lo)):
            if cap == 0:
                continue
            if len(heap) < cap:
                heapq.heappush(heap, (key, seq, panel))
            elif key > heap[0][0]:
                heapq.heapreplace(heap, (key, seq, panel))

    def summary_candidates(self) -> list[tuple[float, Image.Image]]:
        """``(score, overlay)`` of the highest and lowest scores kept for the summary figure (to merge the
        candidates of several processes with :meth:`add_summary_candidates`)."""
        kept = {seq: (key, panel) for key, seq, panel in self._high}
        kept.update({seq: (-key, panel) for key, seq, panel in self._low})
        return list(kept.values())

    def add_summary_candidates(self, candidates: Iterable[tuple[float, Image.Image]]) -> None:
        """Offers overlays written elsewhere (another process) to the summary figure."""
        for score, panel in candidates:
            self._remember(float(score), panel)

    def summary_figure(self, path: str | os.PathLike, n: int = 16, ncols: int = 4) -> Path | None:
        """Tile the overlays of the highest- and lowest-scoring images written so far.

        Args:
            path: PNG file to write.
            n: images in the figure, half highest (top block, descending) and half lowest (bottom block,
                ascending); limited by ``summary_size`` and by the number of images seen. An image is shown once
                even when few images make it both high and low.
            ncols: overlays per row.

        Returns:
            The path written, or None when no image has been written yet.
        """
        n_hi, n_lo = int(n) - int(n) // 2, int(n) // 2
        high = sorted(self._high, key=lambda t: (-t[0], t[1]))[:n_hi]
        shown = {seq for _, seq, _ in high}
        low = [t for t in sorted(self._low, key=lambda t: (-t[0], t[1])) if t[1] not in shown][:n_lo]
        if not high and not low:
            logger.warning("No overlay to put in the summary figure %s", path)
            return None
        blocks = []
        # wider gaps than inside a strip, so neighbouring strips read as separate cases
        if high:
            blocks.append(grid([t[2] for t in high], ncols=ncols, pad=16, title=f"{len(high)} highest anomaly scores"))
        if low:
            blocks.append(grid([t[2] for t in low], ncols=ncols, pad=16, title=f"{len(low)} lowest anomaly scores"))
        fig = blocks[0] if len(blocks) == 1 else grid(blocks, ncols=1, pad=0)
        return _save_png(fig, Path(path))

    def close(self) -> None:
        """Close ``scores.csv``, release the output folder and log a one-line report."""
        self.scores.close()
        self._lock.release()
        if self.failures:
            logger.warning(
                "%d image(s) could not be written to %s (first: %s: %s)",
                len(self.failures), self.output_dir, *self.failures[0],
            )

    def __enter__(self) -> AnomalyResultWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# helpers

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def write_skipped_csv(path: str, skipped: list[dict]) -> str:
    """Writes ``image,reason`` rows of the items a run skipped (all at once, through a temporary file)."""
    _write_csv_atomic(path, ["image", "reason"], ([item["image"], item["reason"]] for item in skipped))
    return path


def _write_csv_atomic(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A whole CSV table written by atomic replace (:func:`~medad_monai.outputs.write_atomic`)."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    write_atomic(path, text.getvalue())


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


class BackgroundBatchWriter:
    """Runs ``write_batch`` of an :class:`AnomalyResultWriter` on one worker thread, so encoding maps (gzip) and
    overlays (PNG) overlaps the next batches' inference instead of holding up the loop. Batches are written in the
    order they were submitted (one worker, a FIFO queue), so rows, names and resume behave as with direct writes;
    at most ``max_pending`` batches wait (bounded memory). An error that would have stopped a direct write (a
    malformed batch) is raised by the next :meth:`submit` or by :meth:`close`.

    Args:
        writer: the writer (anything with ``write_batch(batch)``).
        max_pending: batches queued before :meth:`submit` waits.
    """

    def __init__(self, writer: Any, max_pending: int = 4) -> None:
        import queue
        import threading

        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(max_pending)))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="medad-result-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is not None:
                continue  # after an error nothing more is written; the error reaches the run
            try:
                self.writer.write_batch(batch)
            except BaseException as e:  # noqa: BLE001 - handed to the submitting thread
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, batch: Any) -> None:
        """Queues one batch (waits while ``max_pending`` are queued)."""
        self._raise()
        self._queue.put(batch)

    def close(self) -> None:
        """Waits until every queued batch is written and stops the worker; raises a pending error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()


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
    return _stems_in(out / "maps", AnomalyResultWriter.MAP_SUFFIX) | _stems_in(
        out / "overlays", AnomalyResultWriter.OVERLAY_SUFFIX
    )


def part_csv_name(rank: int, csv_name: str = "scores.csv") -> str:
    """The file a process of a distributed run writes its rows to before they are merged into ``csv_name``."""
    stem, _, ext = csv_name.rpartition(".")
    return f"{stem}.part{int(rank)}.{ext}"


def _part_files(output_dir: Path, csv_name: str) -> list[Path]:
    stem, _, ext = csv_name.rpartition(".")
    return sorted(output_dir.glob(f"{stem}.part*.{ext}"))


def done_images_in(output_dir: str | os.PathLike, csv_name: str = "scores.csv") -> set[str]:
    """Images with a complete row in ``output_dir``'s ``scores.csv`` or in the part files of a distributed run that
    stopped before merging them: what a resumed run need not process again."""
    out = Path(output_dir)
    done = done_images(out / csv_name)
    for part in _part_files(out, csv_name):
        done |= done_images(part)
    return done


def merge_part_files(output_dir: str | os.PathLike, order: Sequence[str], csv_name: str = "scores.csv") -> int:
    """Merges the part files of a distributed run (and the rows already in ``csv_name``) into ``csv_name``: one row
    per image, in the order of ``order`` (images not in it last, in file order), written by atomic replace; the part
    files are then removed.

    Returns:
        The number of rows in the merged file.

    Raises:
        ValueError: when the files do not have the same columns.
    """
    out = Path(output_dir)
    target = out / csv_name
    sources = ([target] if target.exists() else []) + _part_files(out, csv_name)
    header, rows, seen = None, [], set()
    for src in sources:
        h, body, _ = read_complete_rows(src)
        if h is None:
            continue
        if header is None:
            header = h
        elif h != header:
            raise ValueError(f"Cannot merge {src}: its columns {h} differ from {header}.")
        for row in body:
            if row[0] not in seen:
                seen.add(row[0])
                rows.append(row)
    if header is None:
        return 0
    position = {p: i for i, p in enumerate(order)}
    rows.sort(key=lambda r: position.get(r[0], len(position)))  # stable: unknown rows keep their order
    _write_csv_atomic(target, header, rows)
    for part in _part_files(out, csv_name):
        part.unlink()
    return len(rows)


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
        (out / "maps", AnomalyResultWriter.MAP_SUFFIX, _map_source),
        (out / "overlays", AnomalyResultWriter.OVERLAY_SUFFIX, _overlay_source),
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


def _map_source(path: Path) -> str | None:
    """The input image recorded in a map's metadata (header only; the map itself is not read)."""
    try:
        header = nib.load(str(path)).header
    except Exception:  # noqa: BLE001 - an unreadable map is an orphan
        return None
    for ext in header.extensions:
        if ext.get_code() == _META_ECODE:
            try:
                return json.loads(ext.get_content().decode("utf-8")).get("image")
            except (ValueError, UnicodeDecodeError):
                return None
    return None


def _overlay_source(path: Path) -> str | None:
    """The input image recorded in an overlay PNG's text chunk."""
    try:
        with Image.open(path) as im:
            return im.text.get("image")
    except Exception:  # noqa: BLE001 - an unreadable overlay is an orphan
        return None


def _stems_in(folder: Path, suffix: str) -> set[str]:
    if not folder.is_dir():
        return set()
    return {f.name[: -len(suffix)] for f in folder.iterdir() if f.name.endswith(suffix)}


def _save_png(img: Image.Image, path: Path, text: Mapping[str, str] | None = None) -> Path:
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


def _opt_np(batch: Mapping[str, Any], key: str) -> np.ndarray | None:
    v = batch.get(key)
    return None if v is None else to_numpy(v)


def _item(col: np.ndarray | None, i: int, default: Any = None) -> Any:
    if col is None:
        return default
    v = np.asarray(col[i]).reshape(-1)
    if v.size != 1:
        return default
    v = v[0].item()
    return int(v) if isinstance(v, bool) else v


def _paths(batch: Mapping[str, Any], image: Any, n: int, seq: Iterable[int]) -> list[str]:
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


def _add_batch_axis(item: Mapping[str, Any]) -> dict[str, Any]:
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


def _title(path: str, score: float, norm: float | None, label: int, gt: int) -> str:
    parts = [Path(path).name, f"score {score:.4g}"]
    if norm is not None:
        parts.append(f"normalized {norm:.3g}")
    names = {0: "normal", 1: "anomalous"}
    if label in names:
        parts.append(f"pred: {names[label]}")
    if gt in names:
        parts.append(f"truth: {names[gt]}")
    return "   ".join(parts)
