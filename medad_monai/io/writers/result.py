"""All results of an evaluation or inference run: :class:`AnomalyResultWriter` writes each image's map, overlay and
row (through :mod:`.images`, :mod:`.rows` and :mod:`.layout`) and keeps the overlays of the extreme scores for a
summary figure."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medad_monai.io.outputs import OutputDirLock
from medad_monai.io.figures import default_vmax, grid, overlay_panel

from .batch import add_batch_axis, item_value, unpack_batch
from .images import overlay_title, save_map_nifti, save_png
from .layout import MAP_SUFFIX, OVERLAY_SUFFIX, next_stem, reconcile_outputs, stems_on_disk
from .rows import ScoresCSVWriter

__all__ = ["AnomalyResultWriter"]

logger = logging.getLogger("medad_monai.io.writers")


class AnomalyResultWriter:
    """Writes the per-image results of an anomaly-detection run and keeps a summary of the extremes.

    For each image of a batch it writes, in this order:

    1. ``maps/<stem>_anomaly_map.nii.gz`` with :func:`save_map_nifti` (affine taken from the input ``MetaTensor``
       when there is one; metadata: source path, score, label, threshold);
    2. ``overlays/<stem>_overlay.png`` with :func:`medad_monai.io.figures.overlay_panel`, on a heatmap scale fixed
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
        scale, alpha, cmap: passed to :func:`~medad_monai.io.figures.overlay_panel`.
        transpose_overlays: draw overlays transposed. Not needed with :mod:`medad_monai.data.readers`, which keep
            rows as rows; set it when images were read with MONAI's ``PILReader`` default
            ``reverse_indexing=True`` (width first), so overlays look like the source PNGs. Maps are always stored
            on the tensor's own grid.
        csv_name: the rows' file in ``output_dir``.
        lock: hold :class:`~medad_monai.io.outputs.OutputDirLock` on ``output_dir`` until :meth:`close`, so a second run
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

    # the names of an image's outputs (module constants of .layout, also reachable from the class)
    MAP_SUFFIX = MAP_SUFFIX
    OVERLAY_SUFFIX = OVERLAY_SUFFIX

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
                self.write_batch(add_batch_axis(item))
            return
        if not isinstance(batch, Mapping):
            raise ValueError(f"AnomalyResultWriter.write_batch expects a dict or a list of dicts, got {type(batch)}.")
        b = unpack_batch(batch, need_image=self.write_overlays, unnamed=self._unnamed)
        for i in range(b.amap.shape[0]):
            path = b.paths[i]
            if path in self._done:
                self.n_skipped += 1
                continue
            try:
                affine = None if b.affines is None else b.affines[i]
                self._write_one(i, path, b.amap[i], float(b.scores[i]), b.cols, affine)
            except Exception as e:  # noqa: BLE001 - one bad image must not stop a batch job
                msg = f"{type(e).__name__}: {e}"
                logger.error("Could not write the results of %s: %s", path, msg)
                self.failures.append((path, msg))

    __call__ = write_batch

    def _write_one(self, i: int, path: str, amap: np.ndarray, score: float, cols: dict, affine) -> None:
        stem = self._stem(path)
        label = item_value(cols["pred_label"], i, default=-1)
        norm = item_value(cols["normalized_score"], i)
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
                title=overlay_title(path, score, norm, label, item_value(cols["label"], i, default=-1)),
                scale=self.scale,
                alpha=self.alpha,
                cmap=self.cmap,
                transpose=self.transpose_overlays,
            )
            if self.write_overlays:
                png_text = {"image": path, "pred_score": repr(score)}
                save_png(panel, self.overlays_dir / f"{stem}{self.OVERLAY_SUFFIX}", png_text)
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
        return save_png(fig, Path(path))

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
