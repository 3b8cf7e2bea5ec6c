"""A report people can read, from what an evaluation wrote: curves, histograms, per-kind tables with bootstrap
confidence intervals, and the best and worst cases as overlays.

::

    python -m medad_monai report runs/demo/morphaeus/eval                       # -> <eval_dir>/report.html
    python -m medad_monai report runs/real/morphaeus/eval --dataset_dir data/real --test_key test_lesions \\
        --output runs/real/morphaeus/report.md

Inputs (what the bundles' ``evaluate.json`` writes into its ``--output_dir``): ``metrics.json``,
``test_results/scores.csv`` (or a ``scores.csv`` beside ``metrics.json``, as the demo's baselines write it) and,
when present, ``test_results/maps/*_anomaly_map.nii.gz``. Labels, masks and lesion kinds come from the datalist
section the evaluation ran on (``--datalist`` / ``--dataset_dir`` / ``--test_key`` as given to the bundle; by default
the embedded demo data and ``test``, like the bundles).

Output: an HTML (default) or Markdown file and, in a folder beside it (``<name>_files/``), the PNG figures:

- ``roc.png`` / ``pr.png``: ROC and precision-recall curves of the image scores, overall and per lesion kind, with
  AUROC / AP and their 95 % bootstrap interval in the legend;
- ``histogram.png``: image scores of normal and abnormal test images with the calibrated image threshold;
- ``false_positives.png``, ``misses.png``, ``best_detections.png``: the highest-scoring normal images, the
  lowest-scoring abnormal images and the highest-scoring abnormal images as input | anomaly-map overlays
  (:func:`medad_monai.io.figures.overlay_panel`, fixed heatmap scale, calibrated pixel threshold outlined in cyan,
  ground truth in green); only when the maps were written.

Numbers: the point values are ``metrics.json``'s (the report recomputes image AUROC / AP from ``scores.csv`` and
pixel AUROC / AP from the maps with :mod:`medad_monai.evaluation.metrics` and warns when they differ). Intervals are
percentile intervals of :func:`medad_monai.evaluation.metrics.bootstrap_metric` over ``n_bootstrap`` resamples of the
test images (seeds ``0 .. n_bootstrap - 1``; pixel AUROC / AP resample whole images, pooling their pixels); the
MorphAEus protocol's mean ± std over its five seeds is given beside them.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medad_monai.evaluation.metrics import (
    MORPHAEUS_BOOTSTRAP_SEEDS,
    MetricUndefinedWarning,
    bootstrap_indices,
    bootstrap_metric,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
)

__all__ = [
    "EvaluationResults",
    "load_evaluation",
    "bootstrap_interval",
    "paired_bootstrap_difference",
    "roc_points",
    "pr_points",
    "evaluation_report",
]

#: metrics.json keys shown in the summary table, in order, with their names in the report.
SUMMARY_KEYS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "image AUROC"),
    ("image_ap", "image AP"),
    ("image_fpr_at_95tpr", "image FPR at 95 % TPR"),
    ("image_f1_max", "image best F1 (oracle)"),
    ("image_tpr_at_threshold", "sensitivity at the calibrated threshold"),
    ("image_fpr_at_threshold", "false-positive rate at the calibrated threshold"),
    ("image_f1_at_threshold", "F1 at the calibrated threshold"),
    ("pixel_auroc", "pixel AUROC"),
    ("pixel_ap", "pixel AP"),
    ("pixel_best_dice", "pixel best Dice (oracle)"),
    ("pixel_dice_at_threshold", "pixel Dice at the calibrated threshold"),
)

_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127))
_OVERALL = (20, 20, 20)
_NORMAL = (31, 119, 180)
_ABNORMAL = (255, 127, 14)
_THRESHOLD = (214, 39, 40)


# ------------------------------------------------------------------------------------------------ reading a run


@dataclass
class EvaluationResults:
    """What one evaluation folder holds, aligned per test image.

    Attributes:
        eval_dir: the folder given.
        results_dir: the folder of ``scores.csv`` (``test_results`` or ``eval_dir`` itself).
        metrics: the content of ``metrics.json``.
        items: the datalist items of the scored images (absolute paths; ``label``, ``lesion``, ``mask`` ...), in
            ``scores.csv`` order.
        scores: image scores, ``(N,)`` float64.
        labels: 0/1 labels, ``(N,)`` int.
        map_files: the anomaly map of each image, or None where none was written.
        n_unscored: datalist items without a row in ``scores.csv`` (skipped by the evaluation).
    """

    eval_dir: Path
    results_dir: Path
    metrics: dict[str, Any]
    items: list[dict[str, Any]]
    scores: np.ndarray
    labels: np.ndarray
    map_files: list[Path | None]
    n_unscored: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def has_maps(self) -> bool:
        return bool(self.map_files) and all(m is not None for m in self.map_files)


def _key(path: str) -> str:
    return os.path.normcase(os.path.normpath(os.path.abspath(str(path))))


def load_evaluation(
    eval_dir: str | os.PathLike,
    datalist: str | None = None,
    dataset_dir: str | None = None,
    test_key: str = "test",
    allow_outside_dataset_dir: bool = False,
) -> EvaluationResults:
    """Reads an evaluation folder and matches its scores to the datalist items it was run on.

    Args:
        eval_dir: the evaluation's ``--output_dir`` (holding ``metrics.json``).
        datalist, dataset_dir, test_key, allow_outside_dataset_dir: as given to the evaluation (defaults as the
            bundles': the embedded demo data, section ``test``).

    Raises:
        FileNotFoundError: no ``metrics.json`` or ``scores.csv``.
        ValueError: an image of ``scores.csv`` is not in the datalist section (a different datalist or section
            than the evaluation's), or its ``label`` column disagrees with the datalist.
    """
    from medad_monai.engine.bundle_utils import datalist_items
    from medad_monai.io.writers import AnomalyResultWriter, load_map_nifti

    eval_dir = Path(eval_dir).expanduser().absolute()
    metrics_file = eval_dir / "metrics.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(
            f"No metrics.json in '{eval_dir}': give the --output_dir of an evaluation (the bundle's evaluate.json)."
        )
    with open(metrics_file, encoding="utf-8") as f:
        metrics = json.load(f)
    results_dir = eval_dir / "test_results"
    if not (results_dir / "scores.csv").is_file():
        results_dir = eval_dir
    if not (results_dir / "scores.csv").is_file():
        raise FileNotFoundError(
            f"No scores.csv in '{eval_dir / 'test_results'}' or '{eval_dir}': run the evaluation with "
            "--write_results true (its default)."
        )
    with open(results_dir / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{results_dir / 'scores.csv'} has no row.")

    section = datalist_items(datalist, dataset_dir, test_key, allow_outside=allow_outside_dataset_dir,
                             check_files=False)
    by_path = {_key(it["image"]): it for it in section}
    items, missing = [], []
    for row in rows:
        item = by_path.get(_key(row["image"]))
        if item is None:
            missing.append(row["image"])
        items.append(item)
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(rows)} images of {results_dir / 'scores.csv'} are not in section '{test_key}' of "
            f"the datalist (first: {missing[0]}); give the --datalist / --dataset_dir / --test_key the evaluation "
            "ran on."
        )
    labels = np.array([int(it["label"]) for it in items])
    if "label" in rows[0]:
        disagree = [r["image"] for r, y in zip(rows, labels) if r["label"] != "" and int(float(r["label"])) != y]
        if disagree:
            raise ValueError(f"The label column of scores.csv disagrees with the datalist for {disagree[:3]}.")

    map_of: dict[str, Path] = {}
    maps_dir = results_dir / "maps"
    if maps_dir.is_dir():
        for path in sorted(maps_dir.glob(f"*{AnomalyResultWriter.MAP_SUFFIX}")):
            _, _, meta = load_map_nifti(path, with_meta=True)
            if meta.get("image"):
                map_of[_key(meta["image"])] = path
    result = EvaluationResults(
        eval_dir=eval_dir,
        results_dir=results_dir,
        metrics=metrics,
        items=items,
        scores=np.array([float(r["pred_score"]) for r in rows], dtype=np.float64),
        labels=labels,
        map_files=[map_of.get(_key(r["image"])) for r in rows],
        n_unscored=len(section) - len(rows),
    )
    if result.n_unscored:
        result.notes.append(
            f"{result.n_unscored} item(s) of section '{test_key}' have no score (skipped by the evaluation; see "
            "'skipped' in metrics.json)."
        )
    if map_of and not result.has_maps:
        result.notes.append("Some images have no anomaly map; pixel figures and examples are left out.")
    return result


# ------------------------------------------------------------------------------------------------ statistics


def _check_resampling(n_resamples: int, level: float) -> None:
    if int(n_resamples) < 2:
        raise ValueError(f"n_resamples must be at least 2, got {n_resamples!r}.")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}.")


def _percentile_interval(values: Sequence[float], level: float) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the finite ``values`` (NaN, NaN when none)."""
    finite = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_interval(
    scores: Any,
    labels: Any,
    metric: Callable[[Any, Any], float] | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
) -> dict[str, Any]:
    """Percentile bootstrap interval of an image metric, from :func:`medad_monai.evaluation.metrics.bootstrap_metric`.

    Resample ``i`` is ``bootstrap_metric``'s resample with seed ``i`` (``i = 0 .. n_resamples - 1``); resamples
    with one class only are left out. The interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of
    the resampled values (numpy's linear interpolation).

    Args:
        scores, labels: image scores and 0/1 labels (or anything ``metric`` takes, see :func:`evaluation_report`
            for pixel AP over resampled images).
        metric: ``f(scores, labels) -> float``; default :func:`medad_monai.evaluation.metrics.image_auroc`.
        n_resamples: number of resamples.
        level: coverage of the interval.

    Returns:
        ``{"low", "high", "level", "n_resamples", "mean", "std"}`` (``n_resamples``: the resamples with a value).
    """
    _check_resampling(n_resamples, level)
    boot = bootstrap_metric(scores, labels, metric, seeds=tuple(range(int(n_resamples))))
    low, high = _percentile_interval(boot["values"], level)
    n_valid = sum(not math.isnan(v) for v in boot["values"])
    return {"low": low, "high": high, "level": float(level), "n_resamples": int(n_valid),
            "mean": boot["mean"], "std": boot["std"]}


def paired_bootstrap_difference(
    scores_a: Any,
    scores_b: Any,
    labels: Any,
    metric: Callable[[Any, Any], float] | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
) -> dict[str, Any]:
    """Difference ``metric(a) - metric(b)`` of two scorings of the **same** test images, with a paired percentile
    bootstrap interval: each resample (:func:`~medad_monai.evaluation.metrics.bootstrap_indices`, seeds
    ``0 .. n_resamples - 1``, the resamples of :func:`bootstrap_interval`) draws the same images for both, so the
    interval reflects how the two differ on the same images, not each one's own spread. ``a`` beats ``b`` beyond
    the interval when ``low > 0``.

    Args:
        scores_a, scores_b: image scores of the two methods, aligned per image.
        labels: 0/1 labels of those images.
        metric: ``f(scores, labels) -> float``; default :func:`medad_monai.evaluation.metrics.image_auroc`.
        n_resamples, level: as :func:`bootstrap_interval`.

    Returns:
        ``{"a", "b", "difference", "low", "high", "level", "n_resamples", "beyond"}``; ``beyond`` is ``"a"``,
        ``"b"`` (the interval excludes 0 on that side) or ``""``.
    """
    import warnings

    metric = image_auroc if metric is None else metric
    a, b, y = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (scores_a, scores_b, labels))
    if not (a.shape == b.shape == y.shape):
        raise ValueError(f"scores_a, scores_b and labels must have one value per image, got {a.shape}, {b.shape}, "
                         f"{y.shape}.")
    _check_resampling(n_resamples, level)
    diffs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricUndefinedWarning)
        for seed in range(int(n_resamples)):
            idx = bootstrap_indices(a.size, seed).numpy()
            diffs.append(float(metric(a[idx], y[idx])) - float(metric(b[idx], y[idx])))
    value_a, value_b = float(metric(a, y)), float(metric(b, y))
    low, high = _percentile_interval(diffs, level)
    return {
        "a": value_a, "b": value_b, "difference": value_a - value_b, "low": low, "high": high, "level": float(level),
        "n_resamples": sum(not math.isnan(d) for d in diffs), "beyond": "a" if low > 0 else ("b" if high < 0 else ""),
    }


def _counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """TP and FP counts of ``score >= t`` at each distinct score ``t`` (decreasing), and the class sizes."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return tps, fps, int(y.sum()), int((~y).sum())


def roc_points(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the ROC curve through every distinct score, starting at ``(0, 0)`` (the points whose
    trapezoidal area is :func:`medad_monai.evaluation.metrics.image_auroc`)."""
    tps, fps, p, n = _counts(np.asarray(scores), np.asarray(labels))
    if p == 0 or n == 0:
        raise ValueError(f"A ROC curve needs both classes; got {p} abnormal and {n} normal images.")
    return np.r_[0.0, fps / n], np.r_[0.0, tps / p]


def pr_points(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(recall, precision)`` at every distinct score (decreasing), the steps of the precision-recall curve
    whose step-wise area ``sum (R_k - R_{k-1}) P_k`` is :func:`medad_monai.evaluation.metrics.image_ap`."""
    tps, fps, p, _ = _counts(np.asarray(scores), np.asarray(labels))
    if p == 0:
        raise ValueError("A precision-recall curve needs at least one abnormal image.")
    return tps / p, tps / (tps + fps)


# ------------------------------------------------------------------------------------------------ drawing


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


class _Plot:
    """A line / bar chart drawn with PIL at ``ss`` times the size and downsampled, so lines look smooth."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim=(0.0, 1.0), ylim=(0.0, 1.0),
                 size=(560, 440), ss: int = 2) -> None:
        self.ss, self.size = ss, size
        self.img = Image.new("RGB", (size[0] * ss, size[1] * ss), (255, 255, 255))
        self.draw = ImageDraw.Draw(self.img)
        self.font, self.small = _font(13 * ss), _font(11 * ss)
        self.x0, self.x1 = 62 * ss, (size[0] - 18) * ss
        self.y0, self.y1 = 36 * ss, (size[1] - 52) * ss
        self.xlim, self.ylim = (float(xlim[0]), float(xlim[1])), (float(ylim[0]), float(ylim[1]))
        self.draw.text((self.x0, 10 * ss), title, font=_font(15 * ss), fill=(0, 0, 0))
        w = self.draw.textlength(xlabel, font=self.font)
        self.draw.text(((self.x0 + self.x1 - w) / 2, self.y1 + 26 * ss), xlabel, font=self.font, fill=(0, 0, 0))
        label = Image.new("RGB", (int(self.draw.textlength(ylabel, font=self.font)) + 4, 16 * ss), (255, 255, 255))
        ImageDraw.Draw(label).text((2, 0), ylabel, font=self.font, fill=(0, 0, 0))
        label = label.rotate(90, expand=True)
        self.img.paste(label, (6 * ss, int((self.y0 + self.y1 - label.height) / 2)))

    def px(self, x: float, y: float) -> tuple[float, float]:
        (a, b), (c, d) = self.xlim, self.ylim
        return (self.x0 + (x - a) / (b - a) * (self.x1 - self.x0), self.y1 - (y - c) / (d - c) * (self.y1 - self.y0))

    def axes(self, xticks: Sequence[float], yticks: Sequence[float], fmt: str = "{:.1f}") -> None:
        ss = self.ss
        for t in xticks:
            x, _ = self.px(t, self.ylim[0])
            self.draw.line([(x, self.y0), (x, self.y1)], fill=(235, 235, 235), width=ss)
            text = fmt.format(t)
            self.draw.text((x - self.draw.textlength(text, font=self.small) / 2, self.y1 + 6 * ss), text,
                           font=self.small, fill=(60, 60, 60))
        for t in yticks:
            _, y = self.px(self.xlim[0], t)
            self.draw.line([(self.x0, y), (self.x1, y)], fill=(235, 235, 235), width=ss)
            text = fmt.format(t)
            self.draw.text((self.x0 - 6 * ss - self.draw.textlength(text, font=self.small), y - 7 * ss), text,
                           font=self.small, fill=(60, 60, 60))
        self.draw.rectangle([self.x0, self.y0, self.x1, self.y1], outline=(0, 0, 0), width=ss)

    def line(self, xs: Sequence[float], ys: Sequence[float], colour, width: float = 2.0, dash: int = 0) -> None:
        pts = [self.px(float(x), float(y)) for x, y in zip(xs, ys)]
        w = max(1, int(round(width * self.ss)))
        if not dash:
            self.draw.line(pts, fill=colour, width=w, joint="curve")
            return
        on, step = True, dash * self.ss
        for (xa, ya), (xb, yb) in zip(pts[:-1], pts[1:]):
            length = math.hypot(xb - xa, yb - ya)
            k = 0.0
            while k < length:
                e = min(k + step, length)
                if on:
                    self.draw.line([(xa + (xb - xa) * k / length, ya + (yb - ya) * k / length),
                                    (xa + (xb - xa) * e / length, ya + (yb - ya) * e / length)], fill=colour, width=w)
                on, k = not on, e

    def bars(self, edges: np.ndarray, heights: np.ndarray, colour, alpha: float = 0.45) -> None:
        layer = Image.new("RGBA", self.img.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        for a, b, h in zip(edges[:-1], edges[1:], heights):
            if h <= 0:
                continue
            (xa, ya), (xb, yb) = self.px(a, h), self.px(b, self.ylim[0])
            d.rectangle([xa, ya, xb, yb], fill=(*colour, int(255 * alpha)), outline=(*colour, 255), width=self.ss)
        self.img = Image.alpha_composite(self.img.convert("RGBA"), layer).convert("RGB")
        self.draw = ImageDraw.Draw(self.img)

    def legend(self, entries: Sequence[tuple[str, Any, int]], loc: str = "lower right") -> None:
        """``entries``: ``(text, colour, dash)``."""
        ss = self.ss
        line_h = 17 * ss
        width = max(self.draw.textlength(t, font=self.small) for t, _, _ in entries) + 40 * ss
        height = line_h * len(entries) + 8 * ss
        x = self.x1 - width - 8 * ss if "right" in loc else self.x0 + 8 * ss
        y = self.y1 - height - 8 * ss if "lower" in loc else self.y0 + 8 * ss
        self.draw.rectangle([x, y, x + width, y + height], fill=(255, 255, 255), outline=(180, 180, 180), width=ss)
        for k, (text, colour, dash) in enumerate(entries):
            cy = y + 4 * ss + k * line_h + line_h / 2
            if dash:
                for j in range(0, 24, 8):
                    self.draw.line([(x + (6 + j) * ss, cy), (x + (10 + j) * ss, cy)], fill=colour, width=2 * ss)
            else:
                self.draw.line([(x + 6 * ss, cy), (x + 28 * ss, cy)], fill=colour, width=3 * ss)
            self.draw.text((x + 34 * ss, cy - 7 * ss), text, font=self.small, fill=(0, 0, 0))

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.img.resize(self.size, Image.LANCZOS).save(path, format="PNG")
        return path


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt_ci(value: float, ci: dict[str, Any] | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if ci is None or math.isnan(ci["low"]):
        return f"{value:.3f}"
    return f"{value:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _curves(out_dir: Path, res: EvaluationResults, groups: dict[str, np.ndarray], stats: dict[str, Any]) -> list[Path]:
    """ROC and PR figures: all abnormal images, then each lesion kind against all normals."""
    normal = res.labels == 0
    roc = _Plot("ROC curve (image scores)", "false-positive rate", "true-positive rate")
    roc.axes(_ticks(0, 1), _ticks(0, 1))
    roc.line([0, 1], [0, 1], (170, 170, 170), 1.0, dash=4)
    pr = _Plot("Precision-recall curve (image scores)", "recall", "precision")
    pr.axes(_ticks(0, 1), _ticks(0, 1))
    roc_legend, pr_legend = [], []
    curves = [("all abnormal", np.ones(len(res.labels), bool), _OVERALL, 2.6)]
    curves += [(k, normal | m, _PALETTE[i % len(_PALETTE)], 1.6) for i, (k, m) in enumerate(groups.items())]
    for name, keep, colour, width in curves:
        s, y = res.scores[keep], res.labels[keep]
        if y.min() == y.max():
            continue
        fpr, tpr = roc_points(s, y)
        roc.line(fpr, tpr, colour, width)
        recall, precision = pr_points(s, y)
        pr.line(np.r_[0.0, np.repeat(recall, 2)[:-1]], np.r_[np.repeat(precision, 2)], colour, width)
        st = stats["all"] if name == "all abnormal" else stats["by_lesion"][name]
        roc_legend.append((f"{name}: AUROC {_fmt_ci(st['image_auroc'], st['image_auroc_ci'])}", colour, 0))
        pr_legend.append((f"{name}: AP {_fmt_ci(st['image_ap'], st['image_ap_ci'])}", colour, 0))
    prevalence = float(res.labels.mean())
    pr.line([0, 1], [prevalence, prevalence], (170, 170, 170), 1.0, dash=4)
    roc_legend.append(("chance", (170, 170, 170), 1))
    pr_legend.append((f"chance, all abnormal (prevalence {prevalence:.2f})", (170, 170, 170), 1))
    roc.legend(roc_legend, "lower right")
    pr.legend(pr_legend, "lower left")
    return [roc.save(out_dir / "roc.png"), pr.save(out_dir / "pr.png")]


def _histogram(out_dir: Path, res: EvaluationResults, threshold: float | None) -> Path:
    s, y = res.scores, res.labels
    lo, hi = float(s.min()), float(s.max())
    if threshold is not None and math.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        hi = lo + 1.0
    pad = 0.03 * (hi - lo)
    edges = np.linspace(lo - pad, hi + pad, 31)
    h0 = np.histogram(s[y == 0], edges)[0] / max(1, int((y == 0).sum()))
    h1 = np.histogram(s[y == 1], edges)[0] / max(1, int((y == 1).sum()))
    top = float(max(h0.max(initial=0), h1.max(initial=0))) * 1.15 or 1.0
    plot = _Plot("Image scores", "image anomaly score", "share of the class's images",
                 xlim=(edges[0], edges[-1]), ylim=(0.0, top))
    xt = _ticks(edges[0], edges[-1])
    plot.axes(xt, _ticks(0.0, top), fmt="{:.3g}")
    plot.bars(edges, h0, _NORMAL)
    plot.bars(edges, h1, _ABNORMAL)
    entries = [(f"normal (n={int((y == 0).sum())})", _NORMAL, 0), (f"abnormal (n={int((y == 1).sum())})", _ABNORMAL, 0)]
    if threshold is not None and math.isfinite(threshold):
        plot.line([threshold, threshold], [0.0, top], _THRESHOLD, 2.0, dash=5)
        entries.append((f"calibrated threshold {threshold:.4g}", _THRESHOLD, 1))
    plot.legend(entries, "upper right")
    return plot.save(out_dir / "histogram.png")


# ------------------------------------------------------------------------------------------------ maps and examples


def _grid_arrays(res: EvaluationResults, channels: int) -> tuple[list, list, list, list]:
    """Anomaly maps ``(H, W)`` and, on the same grid, the images ``(C, H, W)``, masks ``(H, W)`` and has-mask flags,
    loaded with the bundles' own test transform."""
    from medad_monai.data import anomaly_transforms
    from medad_monai.io.writers import load_map_nifti

    maps = [load_map_nifti(p) for p in res.map_files]
    transforms: dict[tuple[int, int], Any] = {}
    images, masks, has = [], [], []
    for item, amap in zip(res.items, maps):
        shape = tuple(int(v) for v in amap.shape[-2:])
        if shape not in transforms:
            transforms[shape] = anomaly_transforms(spatial_size=shape, channels=channels)
        keep = {k: item[k] for k in ("image", "mask", "label") if k in item}
        d = transforms[shape](keep)
        images.append(d["image"])
        masks.append(np.asarray(d["mask"])[0] > 0.5)
        has.append(bool(d["has_mask"]))
    return maps, images, masks, has


def _examples(out_dir: Path, res: EvaluationResults, maps, images, masks, has, n: int) -> dict[str, Path]:
    from medad_monai.io.figures import grid, overlay_panel

    threshold = res.metrics.get("pixel_threshold")
    order = np.argsort(res.scores, kind="mergesort")
    normal = [int(i) for i in order[::-1] if res.labels[i] == 0]
    abnormal_low = [int(i) for i in order if res.labels[i] == 1]
    picks = {
        "false_positives": ("Highest-scoring normal images (false positives)", normal[:n]),
        "misses": ("Lowest-scoring abnormal images (misses)", abnormal_low[:n]),
        "best_detections": ("Highest-scoring abnormal images (best detections)", abnormal_low[::-1][:n]),
    }
    files = {}
    for key, (title, idx) in picks.items():
        if not idx:
            continue
        panels = []
        for i in idx:
            side = max(maps[i].shape)
            lesion = str(res.items[i].get("lesion") or "")
            parts = [Path(res.items[i]["image"]).name] + ([lesion] if lesion not in ("", "none") else [])
            caption = "   ".join(parts + [f"score {res.scores[i]:.4g}"])
            panels.append(
                overlay_panel(
                    images[i], None, maps[i], pixel_threshold=threshold, gt_mask=masks[i] if has[i] else None,
                    title=caption, scale=max(1, int(round(192 / side))),
                )
            )
        files[key] = out_dir / f"{key}.png"
        grid(panels, ncols=min(len(panels), 4), title=title).save(files[key], format="PNG")
    return files


# ------------------------------------------------------------------------------------------------ the report


def _group_stats(scores: np.ndarray, labels: np.ndarray, n_boot: int) -> dict[str, Any]:
    return {
        "n_normal": int((labels == 0).sum()),
        "n_abnormal": int((labels == 1).sum()),
        "image_auroc": image_auroc(scores, labels),
        "image_auroc_ci": bootstrap_interval(scores, labels, image_auroc, n_boot),
        "image_ap": image_ap(scores, labels),
        "image_ap_ci": bootstrap_interval(scores, labels, image_ap, n_boot),
    }


def _pixel_stats(maps, masks, has, labels: np.ndarray, n_boot: int) -> dict[str, Any] | None:
    """Pixel AUROC / AP over the images the metrics use (with a mask, or normal), with bootstrap intervals over
    resampled images: ``bootstrap_metric`` resamples image indices, and the pooled pixels of the chosen images give
    the metric (an image drawn twice counts twice)."""
    import torch

    keep = [i for i in range(len(labels)) if has[i] or labels[i] == 0]
    if not any(has[i] and labels[i] == 1 for i in keep):
        return None
    m = torch.as_tensor(np.stack([maps[i] for i in keep]))
    g = torch.as_tensor(np.stack([masks[i] for i in keep]))
    idx = np.arange(len(keep), dtype=np.float64)
    y = labels[keep]

    def over_images(metric: Callable[[Any, Any], float]) -> Callable[[Any, Any], float]:
        def resampled(index, _labels) -> float:
            chosen = torch.as_tensor(index).long()
            return metric(m[chosen], g[chosen])

        return resampled

    return {
        "pixel_auroc": pixel_auroc(m, g),
        "pixel_ap": pixel_ap(m, g),
        "pixel_auroc_ci": bootstrap_interval(idx, y, over_images(pixel_auroc), n_boot) if n_boot >= 2 else None,
        "pixel_ap_ci": bootstrap_interval(idx, y, over_images(pixel_ap), n_boot) if n_boot >= 2 else None,
        "pixel_ap_morphaeus": bootstrap_metric(idx, y, over_images(pixel_ap)),
        "n_images": len(keep),
    }


def _by(res: EvaluationResults, key: str) -> dict[str, np.ndarray]:
    values = sorted({str(it.get(key)) for it, y in zip(res.items, res.labels) if y == 1 and it.get(key)})
    return {v: np.array([y == 1 and str(it.get(key)) == v for it, y in zip(res.items, res.labels)]) for v in values}


def evaluation_report(
    eval_dir: str,
    output: str | None = None,
    datalist: str | None = None,
    dataset_dir: str | None = None,
    test_key: str = "test",
    n_bootstrap: int = 1000,
    n_bootstrap_pixel: int = 200,
    n_examples: int = 4,
    channels: int = 1,
    allow_outside_dataset_dir: bool = False,
    title: str | None = None,
) -> dict[str, Any]:
    """Writes the report of one evaluation (see the module docstring for what it holds).

    Args:
        eval_dir: the evaluation's ``--output_dir`` (``metrics.json``, ``test_results/``).
        output: the report file, ``.html`` (default ``<eval_dir>/report.html``) or ``.md``; the figures go to
            ``<output without suffix>_files/``.
        datalist, dataset_dir, test_key, allow_outside_dataset_dir: the data the evaluation ran on, as given to the
            bundle (default: the embedded demo data, section ``test``).
        n_bootstrap: resamples of the image-level intervals.
        n_bootstrap_pixel: resamples of the pixel AUROC and AP intervals (each sorts every test pixel; 0 leaves
            them out).
        n_examples: images per example figure.
        channels: 1 (grey) or 3 (RGB) for drawing the examples, as the bundle's ``--channels``.
        title: heading of the report (default: the bundle name and the folder).

    Returns:
        the report's numbers: ``metrics`` (metrics.json), ``all`` (image AUROC / AP with intervals), ``pixel``,
        ``by_lesion``, ``by_size``, ``morphaeus_bootstrap``, ``notes``, ``figures`` (paths) and ``output``.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_evaluation`; an ``output`` other than ``.html`` / ``.md``.
    """
    t0 = time.perf_counter()
    res = load_evaluation(eval_dir, datalist, dataset_dir, test_key, allow_outside_dataset_dir)
    out_file = Path(output).expanduser().absolute() if output else res.eval_dir / "report.html"
    if out_file.suffix.lower() not in (".html", ".md"):
        raise ValueError(f"The report is written as .html or .md; got output={str(out_file)!r}.")
    fig_dir = out_file.with_name(out_file.stem + "_files")
    fig_dir.mkdir(parents=True, exist_ok=True)
    if res.labels.min() == res.labels.max():
        raise ValueError(f"The test set of {res.eval_dir} has one class only; curves and AUROC need both.")

    metrics = res.metrics
    notes = list(res.notes)
    stats: dict[str, Any] = {"all": _group_stats(res.scores, res.labels, n_bootstrap)}
    normal = res.labels == 0
    lesion_groups = _by(res, "lesion")
    size_groups = _by(res, "lesion_size")
    stats["by_lesion"] = {k: _group_stats(res.scores[normal | m], res.labels[normal | m], n_bootstrap)
                          for k, m in lesion_groups.items()}
    stats["by_size"] = {k: _group_stats(res.scores[normal | m], res.labels[normal | m], n_bootstrap)
                        for k, m in size_groups.items()}
    stats["morphaeus_bootstrap"] = {
        "image_auroc": bootstrap_metric(res.scores, res.labels, image_auroc),
        "image_ap": bootstrap_metric(res.scores, res.labels, image_ap),
        "seeds": list(MORPHAEUS_BOOTSTRAP_SEEDS),
    }
    for key in ("image_auroc", "image_ap"):
        if metrics.get(key) is not None and abs(stats["all"][key] - float(metrics[key])) > 1e-9:
            notes.append(
                f"{key} from scores.csv ({stats['all'][key]:.6f}) differs from metrics.json ({metrics[key]:.6f}): "
                "scores.csv does not hold exactly the evaluated images (an interrupted or resumed run?)."
            )

    figures = _curves(fig_dir, res, lesion_groups, stats)
    figures.append(_histogram(fig_dir, res, metrics.get("image_threshold")))
    stats["pixel"] = None
    examples: dict[str, Path] = {}
    if res.has_maps:
        maps, images, masks, has = _grid_arrays(res, channels)
        stats["pixel"] = _pixel_stats(maps, masks, has, res.labels, int(n_bootstrap_pixel))
        if stats["pixel"] is not None:
            for key in ("pixel_auroc", "pixel_ap"):
                if metrics.get(key) is not None and abs(stats["pixel"][key] - float(metrics[key])) > 1e-6:
                    notes.append(
                        f"{key} from the maps ({stats['pixel'][key]:.6f}) differs from metrics.json "
                        f"({metrics[key]:.6f}): the maps or masks are not those of the evaluation."
                    )
        examples = _examples(fig_dir, res, maps, images, masks, has, int(n_examples))
    else:
        notes.append("No anomaly maps in this folder: no pixel intervals and no example overlays.")

    heading = title or f"Evaluation report: {metrics.get('bundle', res.eval_dir.name)} ({res.eval_dir})"
    context = {
        "heading": heading,
        "res": res,
        "stats": stats,
        "notes": notes,
        "figures": {p.stem: p for p in figures},
        "examples": examples,
        "test_key": test_key,
        "n_bootstrap": int(n_bootstrap),
        "n_bootstrap_pixel": int(n_bootstrap_pixel),
        "out_file": out_file,
    }
    text = _html(context) if out_file.suffix.lower() == ".html" else _markdown(context)
    out_file.write_text(text, encoding="utf-8")
    print(f"report: {out_file} ({len(figures) + len(examples)} figures in {fig_dir}, "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)
    return {
        "metrics": metrics,
        "all": stats["all"],
        "pixel": stats["pixel"],
        "by_lesion": stats["by_lesion"],
        "by_size": stats["by_size"],
        "morphaeus_bootstrap": stats["morphaeus_bootstrap"],
        "notes": notes,
        "figures": [str(p) for p in figures] + [str(p) for p in examples.values()],
        "output": str(out_file),
    }


# ------------------------------------------------------------------------------------------------ writing


def _summary_rows(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metrics.json key present: key, name, value, interval text, MorphAEus-protocol text."""
    metrics, stats = ctx["res"].metrics, ctx["stats"]
    intervals = {"image_auroc": stats["all"]["image_auroc_ci"], "image_ap": stats["all"]["image_ap_ci"]}
    morph = {k: stats["morphaeus_bootstrap"][k] for k in ("image_auroc", "image_ap")}
    if stats["pixel"] is not None:
        intervals["pixel_auroc"] = stats["pixel"]["pixel_auroc_ci"]
        intervals["pixel_ap"] = stats["pixel"]["pixel_ap_ci"]
        morph["pixel_ap"] = stats["pixel"]["pixel_ap_morphaeus"]
    rows = []
    for key, name in SUMMARY_KEYS:
        value = metrics.get(key)
        if value is None:
            continue
        ci = intervals.get(key)
        m = morph.get(key)
        rows.append({
            "key": key,
            "name": name,
            "value": float(value),
            "ci": "" if ci is None or math.isnan(ci["low"]) else f"[{ci['low']:.3f}, {ci['high']:.3f}]",
            "morphaeus": "" if m is None or math.isnan(m["mean"]) else f"{m['mean']:.3f} ± {m['std']:.3f}",
        })
    return rows


def _group_rows(groups: dict[str, Any]) -> list[list[str]]:
    return [[k, str(g["n_abnormal"]), f"{g['image_auroc']:.3f}",
             "" if math.isnan(g["image_auroc_ci"]["low"]) else
             f"[{g['image_auroc_ci']['low']:.3f}, {g['image_auroc_ci']['high']:.3f}]"] for k, g in groups.items()]


def _facts(ctx: dict[str, Any]) -> list[str]:
    res, metrics = ctx["res"], ctx["res"].metrics
    facts = [f"test images: {int((res.labels == 0).sum())} normal, {int((res.labels == 1).sum())} abnormal "
             f"(datalist section '{ctx['test_key']}')"]
    if metrics.get("score_method"):
        facts.append(f"image score: {metrics['score_method']} of the anomaly map")
    for key, name in (("image_threshold", "calibrated image threshold"), ("pixel_threshold", "pixel threshold")):
        if metrics.get(key) is not None:
            facts.append(f"{name}: {float(metrics[key]):.4g}")
    return facts


def _method_text(ctx: dict[str, Any]) -> str:
    return (
        f"Values are those of metrics.json. Intervals: 95 % percentile bootstrap over {ctx['n_bootstrap']} resamples "
        f"of the test images (pixel AUROC / AP: {ctx['n_bootstrap_pixel']} resamples of whole images, pixels "
        "pooled), from "
        "medad_monai.evaluation.metrics.bootstrap_metric with seeds 0, 1, 2, ...; 'MorphAEus bootstrap' is the mean ± std over "
        f"the five seeds {', '.join(str(s) for s in MORPHAEUS_BOOTSTRAP_SEEDS)} of the original evaluation. Per "
        "lesion kind and size: that kind's abnormal images against all normal images. Oracle values choose their "
        "threshold on the test labels."
    )


def _rel(path: Path, ctx: dict[str, Any]) -> str:
    return os.path.relpath(path, ctx["out_file"].parent).replace(os.sep, "/")


def _html(ctx: dict[str, Any]) -> str:
    e = html.escape
    rows = "\n".join(
        f'<tr><td>{e(r["name"])}</td><td class="num" data-key="{r["key"]}" data-value="{r["value"]!r}">'
        f'{r["value"]:.3f}</td><td class="num">{e(r["ci"])}</td><td class="num">{e(r["morphaeus"])}</td></tr>'
        for r in _summary_rows(ctx)
    )

    def table(title: str, groups: dict[str, Any], what: str) -> str:
        if not groups:
            return ""
        body = "\n".join(
            f'<tr><td>{e(k)}</td><td class="num">{n}</td><td class="num" data-key="{e(what)}:{e(k)}">{a}</td>'
            f'<td class="num">{ci}</td></tr>' for k, n, a, ci in _group_rows(groups)
        )
        return (f"<h2>{e(title)}</h2>\n<table><tr><th>{e(what)}</th><th>abnormal images</th><th>image AUROC</th>"
                f"<th>95 % CI</th></tr>\n{body}\n</table>")

    figs = ctx["figures"]
    curves = "".join(f'<img src="{e(_rel(figs[k], ctx))}" alt="{k}">' for k in ("roc", "pr", "histogram") if k in figs)
    examples = "".join(
        f'<h3>{e(k.replace("_", " "))}</h3><img class="wide" src="{e(_rel(p, ctx))}" alt="{k}">'
        for k, p in ctx["examples"].items()
    )
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in ctx["notes"])
    facts = "".join(f"<li>{e(f)}</li>" for f in _facts(ctx))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(ctx['heading'])}</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; color: #111; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; }} th {{ background: #f3f3f3; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 32%; margin: 4px; border: 1px solid #ddd; }} img.wide {{ max-width: 100%; }}
.note {{ background: #fff4e0; border-left: 4px solid #f0a020; padding: 6px 10px; }}
</style></head><body>
<h1>{e(ctx['heading'])}</h1>
<ul>{facts}</ul>
{notes}
<h2>Summary</h2>
<table><tr><th>metric</th><th>value</th><th>95 % CI</th><th>MorphAEus bootstrap (mean ± std)</th></tr>
{rows}
</table>
<h2>Curves and score distributions</h2>
<div>{curves}</div>
{table("Image AUROC by lesion kind", ctx["stats"]["by_lesion"], "lesion")}
{table("Image AUROC by lesion size", ctx["stats"]["by_size"], "lesion_size")}
<h2>Examples</h2>
{examples or '<p>No anomaly maps were written by this evaluation.</p>'}
<p><small>{e(_method_text(ctx))} Written by python -m medad_monai report.</small></p>
</body></html>
"""


def _markdown(ctx: dict[str, Any]) -> str:
    lines = [f"# {ctx['heading']}", ""]
    lines += [f"- {f}" for f in _facts(ctx)] + [""]
    lines += [f"> **Note.** {n}\n" for n in ctx["notes"]]
    lines += ["## Summary", "", "| metric | value | 95 % CI | MorphAEus bootstrap (mean ± std) |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['value']:.3f} | {r['ci']} | {r['morphaeus']} |" for r in _summary_rows(ctx)]
    lines += ["", "## Curves and score distributions", ""]
    lines += [f"![{k}]({_rel(p, ctx)})" for k, p in ctx["figures"].items()] + [""]
    for title, groups, what in (("Image AUROC by lesion kind", ctx["stats"]["by_lesion"], "lesion"),
                                ("Image AUROC by lesion size", ctx["stats"]["by_size"], "lesion_size")):
        if groups:
            lines += [f"## {title}", "", f"| {what} | abnormal images | image AUROC | 95 % CI |", "|---|---|---|---|"]
            lines += [f"| {' | '.join(r)} |" for r in _group_rows(groups)] + [""]
    lines += ["## Examples", ""]
    if ctx["examples"]:
        for k, p in ctx["examples"].items():
            lines += [f"### {k.replace('_', ' ')}", "", f"![{k}]({_rel(p, ctx)})", ""]
    else:
        lines += ["No anomaly maps were written by this evaluation.", ""]
    lines += [f"_{_method_text(ctx)} Written by python -m medad_monai report._", ""]
    return "\n".join(lines)
