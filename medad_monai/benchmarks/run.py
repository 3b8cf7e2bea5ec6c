"""``python -m medad_monai benchmark``: every comparison of the benchmark in one run, printed as one table."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence

import monai
import torch

from medad_monai.benchmarks.memmc_mae import memmc_mae_section
from medad_monai.benchmarks.morphaeus import morphaeus_section
from medad_monai.benchmarks.pixel_metrics import pixel_metrics_section
from medad_monai.benchmarks.report import Section, format_markdown, format_table

__all__ = ["run_benchmark", "FULL_CASES", "SMALL_CASES"]

#: (bundle, configuration) pairs of the full mode
FULL_CASES = (("morphaeus", "demo"), ("morphaeus", "paper"), ("memmc_mae", "demo"), ("memmc_mae", "paper"))
#: the small mode runs the demo configurations only (the paper ones take tens of seconds per step on a CPU)
SMALL_CASES = (("morphaeus", "demo"), ("memmc_mae", "demo"))

_SECTIONS = {"morphaeus": morphaeus_section, "memmc_mae": memmc_mae_section}
#: images of the end-to-end folder inference per (bundle, configuration) in the full mode (the small mode uses 4)
FOLDER_IMAGES = {
    ("morphaeus", "demo"): 32,
    ("morphaeus", "paper"): 64,
    ("memmc_mae", "demo"): 32,
    ("memmc_mae", "paper"): 16,
}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def run_benchmark(
    small: bool = False,
    bundles: str | Sequence[str] | None = None,
    configurations: str | Sequence[str] | None = None,
    metrics: bool = True,
    folder: bool = True,
    reps: int | None = None,
    warmup: int = 1,
    threads: int | None = None,
    device: str | None = None,
    output_json: str | None = None,
    output_markdown: str | None = None,
) -> dict:
    """Times both bundles and the pixel metrics against their references and prints the table.

    For each bundle configuration (the bundle's ``train.json``/``inference.json``, alone = "paper" or with
    ``demo.json`` = "demo"): train-step time (forward, backward and optimizer step with the bundle's loss), its peak
    memory and FLOPs, inference time per image of the network alone at batch 1 and N, and of the bundle's inference
    job on a folder (read, preprocess, infer, write) with and without writing maps and overlays. References:
    MorphAEus as the original code computes it (VGG with weight gradients, target features with a graph, unfused Swish,
    box-filter NCC; :mod:`medad_monai.benchmarks.morphaeus_reference`), for MemMC-MAE a plain MAE of the same width,
    for the pixel metrics scikit-learn. Repetitions of a comparison are interleaved; medians are reported. A missed
    target of issue 12 is printed with the factor by which it is missed and why.

    Args:
        small: seconds-long run for CI: the demo configurations at batch 2, folder jobs on 4 images (one run each),
            metrics on 8 maps of 64x64, one thread. Default: the full mode at the issue's sizes (MorphAEus batch 64
            at 1x128x128, MemMC-MAE ViT-B/16 at 224x224 batch 8 with K = 4 masks, metrics on 200 maps of 256x256).
        bundles: ``"morphaeus"``, ``"memmc_mae"`` or both (comma-separated); default both.
        configurations: ``"paper"``, ``"demo"`` or both; default those of the mode.
        metrics: include the pixel-metric comparison.
        folder: include the end-to-end inference job on a folder (bundle ``inference.json``, with and without
            writing maps and overlays).
        reps: timed repetitions per comparison (default 5, small mode 3).
        warmup: untimed calls per candidate before timing.
        threads: ``torch.set_num_threads`` for the run (restored after it); default torch's, 1 in the small mode
            (calls of a few milliseconds stall at every OpenMP barrier when a shared CI machine is busy).
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        output_json: also write the table and the environment to this JSON file.
        output_markdown: also write the table as Markdown (as in ``docs/performance.md``) to this file.

    Returns:
        ``{"environment": {...}, "sections": [...]}`` (as written to ``output_json``).
    """
    previous_threads = torch.get_num_threads()
    if threads or small:
        torch.set_num_threads(int(threads or 1))
    try:
        return _run(small, bundles, configurations, metrics, folder, reps, warmup, device, output_json, output_markdown)
    finally:
        torch.set_num_threads(previous_threads)


def _run(small, bundles, configurations, metrics, folder, reps, warmup, device, output_json, output_markdown) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps = int(reps if reps is not None else (3 if small else 5))
    wanted_bundles = _as_list(bundles)
    wanted_configs = _as_list(configurations)
    cases = [
        (b, c)
        for b, c in (SMALL_CASES if small else FULL_CASES)
        if (wanted_bundles is None or b in wanted_bundles) and (wanted_configs is None or c in wanted_configs)
    ]
    unknown = set(wanted_bundles or []) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"benchmark: unknown bundle(s) {sorted(unknown)}; choose from {sorted(_SECTIONS)}.")
    env = {
        "mode": "small" if small else "full",
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "reps": reps,
        "warmup": warmup,
    }
    print(
        f"medad_monai benchmark ({env['mode']} mode): torch {env['torch']}, monai {env['monai']}, "
        f"device {env['device']}, {env['torch_threads']} torch thread(s) on {env['cpu_count']} CPUs ({env['cpu']}); "
        f"{reps} interleaved repetition(s) after {warmup} warm-up, medians; ref/ours > 1 means ours is faster (or "
        "smaller).",
        flush=True,
    )
    t0 = time.perf_counter()
    sections: list[Section] = []
    batch = 2 if small else None
    min_call = 0.0 if small else 0.3
    for bundle, configuration in cases:
        print(f"... {bundle} {configuration}", flush=True)
        sections.append(
            _SECTIONS[bundle](
                configuration,
                batch_size=batch,
                reps=reps,
                warmup=warmup,
                device=dev,
                min_call_seconds=min_call,
                folder_images=(4 if small else FOLDER_IMAGES[(bundle, configuration)]) if folder else 0,
                folder_reps=1 if small else None,
            )
        )
    if metrics:
        print("... pixel metrics", flush=True)
        n_maps, size = (8, 64) if small else (200, 256)
        sections.append(pixel_metrics_section(n_maps, size, reps=reps, warmup=warmup))
    table = format_table(sections)
    print(table)
    env["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n(benchmark took {env['seconds']:.0f} s)")
    result = {"environment": env, "sections": [s.to_dict() for s in sections]}
    if output_json:
        os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
        with open(output_json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"written: {output_json}")
    if output_markdown:
        os.makedirs(os.path.dirname(os.path.abspath(output_markdown)), exist_ok=True)
        with open(output_markdown, "w") as f:
            f.write(format_markdown(result))
        print(f"written: {output_markdown}")
    return result
