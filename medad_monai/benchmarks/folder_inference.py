"""End-to-end folder inference through a bundle's ``inference.json``: read, preprocess, infer, write.

The bundle's inference config is parsed and its ``evaluator`` run in-process on a folder of PNG images (what
``python -m monai.bundle run --config_file configs/inference.json --input_dir <folder>`` runs, without the process
start), once writing maps, overlays and ``scores.csv`` (the config's defaults) and once writing ``scores.csv`` only.
The ratio of the two says whether the job is bound by writing (issue 12: it should not be; target: writing adds at most
10 %).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from medad_monai.benchmarks.bundle_config import bundle_parser
from medad_monai.benchmarks.report import Row, Section
from medad_monai.benchmarks.timing import synchronize

__all__ = ["folder_inference_row", "add_folder_inference", "write_png_folder"]

WRITING_COST_TARGET = 1.1


def write_png_folder(folder: str, n_images: int, size: int = 256, seed: int = 0) -> list[str]:
    """``n_images`` smooth random 8-bit grayscale PNGs of ``size``² in ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_images):
        coarse = rng.random((size // 16, size // 16))
        img = np.kron(coarse, np.ones((16, 16))) * 200 + rng.random((size, size)) * 55
        path = os.path.join(folder, f"img_{i:05d}.png")
        Image.fromarray(img.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def folder_inference_row(
    bundle: str,
    configuration: str,
    state_dict: dict,
    n_images: int,
    reps: int = 3,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    target: bool = False,
) -> Row:
    """Seconds per image of the bundle's inference job on a folder: reference = the job writing ``scores.csv`` only,
    ours = the job as configured (also maps and overlays). Without a calibration (random weights).

    Args:
        bundle, configuration: see :func:`~medad_monai.benchmarks.bundle_config.bundle_parser`.
        state_dict: weights of the bundle's training network (saved as ``models/model.pt`` for the job).
        n_images: PNG images in the folder (256x256, resized by the bundle's preprocessing).
        reps: timed runs of each variant, interleaved.
        warmup: untimed runs of each variant first.
        device: where the network runs.
        target: attach issue 12's target (writing adds at most 10 %).
    """
    device = torch.device(device)
    quiet = _DropUncalibratedNotice()
    logging.getLogger("medad_monai").addFilter(quiet)
    try:
        med = _timed_jobs(bundle, configuration, state_dict, n_images, reps, warmup, device)
    finally:
        logging.getLogger("medad_monai").removeFilter(quiet)
    return Row(
        f"folder job end to end, {n_images} PNGs [per image]",
        "ms",
        med["no_write"],
        med["write"],
        min_speedup=1.0 / WRITING_COST_TARGET if target else None,
        target_text=f"ours <= {WRITING_COST_TARGET:g}x ref" if target else "",
        why=("maps (NIfTI, gzip) and overlays (PNG) are encoded on one worker thread beside the loop "
             "(writers.BackgroundBatchWriter); with 2 cores busy with inference, encoding still competes for them."),
    )


class _DropUncalibratedNotice(logging.Filter):
    """The jobs run without a calibration on purpose: their "no calibration.json" notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No calibration.json")


def _timed_jobs(bundle, configuration, state_dict, n_images, reps, warmup, device) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="medad_bench_") as tmp:
        write_png_folder(os.path.join(tmp, "images"), n_images)
        ckpt_dir = os.path.join(tmp, "models")
        os.makedirs(ckpt_dir)
        torch.save(state_dict, os.path.join(ckpt_dir, "model.pt"))
        times: dict[str, list[float]] = {"no_write": [], "write": []}
        run = 0
        for rep in range(warmup + reps):
            order = ("no_write", "write") if rep % 2 == 0 else ("write", "no_write")
            for variant in order:
                run += 1
                writing = variant == "write"
                parser = bundle_parser(
                    bundle,
                    "inference.json",
                    configuration,
                    device,
                    {
                        "input_dir": os.path.join(tmp, "images"),
                        "ckpt_dir": ckpt_dir,
                        "output_dir": os.path.join(tmp, f"out_{run}"),
                        "progress_bar": False,
                        "write_maps": writing,
                        "write_overlays": writing,
                    },
                )
                evaluator = parser.get_parsed_content("evaluator")
                synchronize(device)
                t0 = time.perf_counter()
                evaluator.run()
                synchronize(device)
                if rep >= warmup:
                    times[variant].append(time.perf_counter() - t0)
                out = os.path.join(tmp, f"out_{run}")
                _check_outputs(out, n_images, writing)
    return {k: float(np.median(v)) / n_images for k, v in times.items()}


def _check_outputs(output_dir: str, n_images: int, writing: bool) -> None:
    """The job wrote one ``scores.csv`` row per image (and, when writing, maps and overlays)."""
    with open(os.path.join(output_dir, "scores.csv")) as f:
        rows = [line for line in f.read().splitlines()[1:] if line.strip()]
    if len(rows) != n_images:
        raise RuntimeError(f"benchmark: the inference job wrote {len(rows)} scores for {n_images} images.")
    if writing:
        written = sum(len(files) for _, _, files in os.walk(output_dir))
        if written < 2 * n_images:
            raise RuntimeError(f"benchmark: the inference job wrote {written} files for {n_images} images.")


def add_folder_inference(
    section: Section,
    bundle: str,
    configuration: str,
    state_dict: dict,
    n_images: int,
    reps: int,
    warmup: int,
    device: torch.device | str,
    target: bool,
) -> None:
    """Adds the folder-job row of :func:`folder_inference_row` and the note that explains it to ``section``."""
    section.notes.append(
        "folder job: the bundle's inference.json evaluator in-process (read, preprocess, infer, write); "
        "reference = writing scores.csv only, ours = + maps and overlays (the config's default)"
    )
    section.rows.append(
        folder_inference_row(bundle, configuration, state_dict, n_images, reps, warmup, device, target=target)
    )
