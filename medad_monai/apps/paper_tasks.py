"""The MorphAEus paper's evaluation protocol: one evaluation per pathology task, bootstrap AUROC, and their average.

Bercea et al. (MICCAI 2023) evaluate two tasks on chest radiographs, each pathology set scored against normal test
images: **pneumonia** (RSNA normals vs Lung Opacity) and **COVID-19** (PadChest normals vs COVID-19), and report per
task the AUROC as mean ± std over 5 bootstrap resamples (``dl_utils/boost_test.py``) and the **average AUROC of the
two tasks** (facts in ``shared/reference/morphaeus.md`` §3).

:func:`evaluate_tasks` runs the bundle's own ``evaluate.json`` once per datalist section (``--test_key``; the
converter ``python -m medad_monai datalist_from_morphaeus_csv`` writes ``test_pneumonia`` and ``test_covid``), reads
each run's ``metrics.json`` and per-image ``scores.csv``, adds :func:`~medad_monai.evaluation.metrics.bootstrap_metric`
for AUROC and AP, and writes ``tasks.json`` with the per-task figures and the averages::

    python -m medad_monai evaluate_tasks bundles/morphaeus --datalist /data/cxr/datalist.json \\
        --ckpt_dir bundles/morphaeus/models --output_dir runs/morphaeus_tasks
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from medad_monai.apps.bundle_cli import bundle_command, run_logged
from medad_monai.evaluation.metrics import MORPHAEUS_BOOTSTRAP_SEEDS, bootstrap_metric, image_ap, image_auroc

__all__ = ["PAPER_TASKS", "evaluate_tasks", "task_scores"]

#: the MorphAEus paper's tasks, as ``datalist_from_morphaeus_csv`` names the datalist sections.
PAPER_TASKS = ("test_pneumonia", "test_covid")


def task_scores(scores_csv: str, datalist: str, section: str, dataset_dir: str | None = None) -> tuple[list, list]:
    """``(scores, labels)`` of a section's test items, matched by image path to an evaluation's ``scores.csv``.

    Raises:
        ValueError: an item of the section has no row in ``scores.csv`` (the evaluation skipped or lost it).
    """
    from medad_monai.engine.bundle_utils import datalist_items

    with open(scores_csv) as f:
        rows = {os.path.normpath(r["image"]): float(r["pred_score"]) for r in csv.DictReader(f)}
    scores, labels, missing = [], [], []
    for item in datalist_items(datalist, dataset_dir, section):
        key = os.path.normpath(str(item["image"]))
        if key not in rows:
            missing.append(key)
            continue
        scores.append(rows[key])
        labels.append(int(item["label"]))
    if missing:
        raise ValueError(
            f"{len(missing)} item(s) of '{section}' have no score in {scores_csv} (first: {missing[0]}); the "
            "evaluation did not score them — see its log."
        )
    return scores, labels


def evaluate_tasks(
    bundle: str,
    datalist: str,
    tasks: str | Sequence[str] = PAPER_TASKS,
    output_dir: str = "runs/tasks",
    configs: str | Sequence[str] = (),
    dataset_dir: str | None = None,
    ckpt_dir: str | None = None,
    seeds: Sequence[int] = MORPHAEUS_BOOTSTRAP_SEEDS,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluates a trained bundle on each task (datalist section) and summarises them as the paper does.

    Args:
        bundle: the bundle folder (``bundles/morphaeus`` or ``bundles/memmc_mae``).
        datalist: the datalist JSON holding the task sections.
        tasks: section names, comma-separated or a list (default the paper's ``test_pneumonia,test_covid``).
        output_dir: one sub-folder per task (the evaluation's ``metrics.json``, ``test_results/``, log) and
            ``tasks.json``.
        configs: extra config files of the bundle applied after ``train.json`` (e.g. ``ablation_ae.json``), as
            used for training.
        dataset_dir, ckpt_dir: passed to the bundle (default: the datalist's folder; the bundle's ``models``).
        seeds: bootstrap seeds (default the original's five).
        overrides: further bundle overrides (``--score_method``, ``--map_sigma``, ``--test_antialias`` ...).

    Returns:
        ``{"tasks": {task: {"image_auroc", "image_ap", "image_auroc_bootstrap", "image_ap_bootstrap", "n_normal",
        "n_abnormal", ...metrics.json}}, "average": {"image_auroc", "image_auroc_bootstrap_mean", "image_ap"}}``.
    """
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    configs = [c.strip() for c in configs.split(",") if c.strip()] if isinstance(configs, str) else list(configs)
    if not tasks:
        raise ValueError("evaluate_tasks: give at least one datalist section in --tasks.")
    bundle_root = os.path.abspath(bundle)
    datalist = os.path.abspath(datalist)
    with open(datalist) as f:
        sections = json.load(f)
    absent = [t for t in tasks if t not in sections]
    if absent:
        raise ValueError(
            f"evaluate_tasks: {datalist} has no section {absent} (it has {sorted(sections)}); the paper's tasks come "
            "from `python -m medad_monai datalist_from_morphaeus_csv`."
        )
    os.makedirs(output_dir, exist_ok=True)
    common: dict[str, Any] = {"datalist": datalist, "progress_bar": False, **overrides}
    if dataset_dir is not None:
        common["dataset_dir"] = os.path.abspath(dataset_dir)
    if ckpt_dir is not None:
        common["ckpt_dir"] = os.path.abspath(ckpt_dir)
    results: dict[str, Any] = {}
    for task in tasks:
        out = os.path.abspath(os.path.join(output_dir, task))
        os.makedirs(out, exist_ok=True)
        print(f"\n== {os.path.basename(bundle_root)}: {task}", flush=True)
        cmd = bundle_command(
            bundle_root, ["train.json", *configs, "evaluate.json"], test_key=task, output_dir=out, **common
        )
        run_logged(cmd, os.path.join(out, "log.txt"))
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        scores, labels = task_scores(os.path.join(out, "test_results", "scores.csv"), datalist, task, dataset_dir)
        results[task] = {
            **metrics,
            "image_auroc": image_auroc(scores, labels),
            "image_ap": image_ap(scores, labels),
            "image_auroc_bootstrap": bootstrap_metric(scores, labels, image_auroc, tuple(seeds)),
            "image_ap_bootstrap": bootstrap_metric(scores, labels, image_ap, tuple(seeds)),
            "n_normal": labels.count(0),
            "n_abnormal": labels.count(1),
        }

    def mean(key: str, sub: str | None = None) -> float:
        vals = [r[key][sub] if sub else r[key] for r in results.values()]
        return sum(vals) / len(vals) if all(not math.isnan(v) for v in vals) else math.nan

    summary = {
        "bundle": os.path.basename(bundle_root),
        "datalist": datalist,
        "configs": configs,
        "tasks": results,
        "average": {
            "image_auroc": mean("image_auroc"),
            "image_auroc_bootstrap_mean": mean("image_auroc_bootstrap", "mean"),
            "image_ap": mean("image_ap"),
        },
    }
    with open(os.path.join(output_dir, "tasks.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(_table(summary), flush=True)
    return summary


def _table(summary: dict[str, Any]) -> str:
    lines = [f"\n{'task':24s}{'n (normal/abn.)':>18s}{'AUROC':>8s}{'bootstrap AUROC':>20s}{'AP':>8s}"]
    for task, r in summary["tasks"].items():
        b = r["image_auroc_bootstrap"]
        lines.append(
            f"{task:24s}{r['n_normal']:>9d}/{r['n_abnormal']:<8d}{r['image_auroc']:8.3f}"
            f"{b['mean']:>12.3f} ± {b['std']:.3f}{r['image_ap']:8.3f}"
        )
    a = summary["average"]
    lines.append(f"{'average':24s}{'':18s}{a['image_auroc']:8.3f}{a['image_auroc_bootstrap_mean']:>12.3f}{'':8s}"
                 f"{a['image_ap']:8.3f}")
    return "\n".join(lines)
