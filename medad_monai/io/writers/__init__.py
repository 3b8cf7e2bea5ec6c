"""Per-image result writers: anomaly maps as NIfTI, overlay PNGs, a resumable scores CSV and a summary figure.

Everything here is engine-independent (plain dicts of arrays or tensors in, files out); the Ignite wrapper is
:class:`medad_monai.engine.handlers.AnomalyWriterHandler`. Layout of a results folder written by
:class:`AnomalyResultWriter`::

    <output_dir>/scores.csv                          image,pred_score,pred_label[,normalized_score]
    <output_dir>/maps/<stem>_anomaly_map.nii.gz      float32 map on the network's input grid
    <output_dir>/overlays/<stem>_overlay.png         input | reconstruction | heatmap (see medad_monai.io.figures)
    <output_dir>/summary.png                         highest- and lowest-scoring overlays (summary_figure)

Design choices (ours): rows are flushed one by one and every file is written to a temporary name and then renamed,
so a killed batch job leaves only complete files and complete rows behind, and ``resume=True`` carries on where it
stopped. A row is written last, after the map and overlay of that image, so a row in ``scores.csv`` means all the
outputs of that image exist.

Modules, by concern: :mod:`.result` (:class:`AnomalyResultWriter`, which composes the others), :mod:`.images` (NIfTI
maps and overlay PNGs), :mod:`.rows` (``scores.csv``, complete rows, part files and their merge), :mod:`.layout`
(output stems and reconciling a resumed folder), :mod:`.batch` (checking and unpacking a batch) and
:mod:`.background` (the writer thread). Every name of ``__all__`` is importable from ``medad_monai.io.writers``.
"""

from .background import BackgroundBatchWriter
from .images import load_map_nifti, save_map_nifti
from .layout import assign_stems, next_stem, reconcile_outputs, safe_stem, stems_on_disk
from .result import AnomalyResultWriter
from .rows import (
    ScoresCSVWriter,
    done_images,
    done_images_in,
    merge_part_files,
    part_csv_name,
    read_complete_rows,
    write_skipped_csv,
)

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
