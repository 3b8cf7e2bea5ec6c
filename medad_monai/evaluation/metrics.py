"""Image- and pixel-level anomaly detection metrics, vectorised in torch and checked against scikit-learn.

Every curve metric comes from one sort of the scores (no loop over thresholds): at each distinct score ``t``
(predicted positive when ``score >= t``, scikit-learn's convention for curves) the counts ``TP(t)`` and ``FP(t)`` give
the whole ROC and precision-recall curve. Ties are handled like scikit-learn: tied scores form one curve point. One
evaluation sorts its pixels once for all pixel metrics (:func:`pixel_metrics`, :func:`compute_anomaly_metrics`); the
single-metric functions each sort again. On CPU the sort is NumPy's value sort (no permutation is computed): the
smaller class's scores are then located among the sorted distinct scores by binary search, which gives the same
counts as sorting (score, label) pairs.

- ``auroc``: trapezoidal area under the ROC curve through all distinct thresholds (= ``roc_auc_score``).
- ``ap``: step-wise average precision ``sum_k (R_k - R_{k-1}) P_k`` without interpolation
  (= ``average_precision_score``).
- ``fpr_at_95tpr``/``fpr_at_99tpr``: the FPR of the first ROC point (by decreasing threshold) whose TPR is >= 0.95
  / 0.99, the FPR@TPR convention of Bercea et al. (MorphAEus evaluation code). It equals ``fpr[argwhere(tpr >= x)[0]]``
  of ``roc_curve(..., drop_intermediate=False)``; scikit-learn's default ``drop_intermediate=True`` gives the same
  value except when the first such point lies inside a run of collinear points (only possible with tied scores of
  both classes), where it can report a larger FPR.
- ``f1_max``: the largest F1 over all thresholds (anomalib's ``F1Max``; = max of ``2PR/(P+R)`` from
  ``precision_recall_curve``).
- ``pixel_best_dice``: the best pooled Dice ``2TP/(2TP+FP+FN)`` over **all** distinct thresholds of the pooled test
  pixels (MedIAnomaly's Best-Dice, which samples 200 quantile thresholds instead). It is an **oracle**: the threshold
  is chosen on the test labels, so it is an upper bound for comparison with published numbers, not a deployable
  result. The deployable number is ``pixel_dice_at_threshold`` at the pixel threshold calibrated on healthy
  validation data (:mod:`medad_monai.evaluation.calibration`).
- ``*_at_threshold``: confusion-matrix metrics with the calibrated rule "anomalous when value > threshold".

A metric that is undefined for the data (e.g. AUROC with only one class; AP, F1 and Dice with no positive) is NaN
and a :class:`MetricUndefinedWarning` is issued; nothing raises. Labels must be 0 (normal) or 1 (anomalous);
masks are binarised at ``> 0.5``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from medad_monai.evaluation.calibration import Reservoir
from medad_monai.evaluation.scoring import to_tensor

__all__ = [
    "MetricUndefinedWarning",
    "image_auroc",
    "image_ap",
    "image_fpr_at_tpr",
    "image_fpr_at_95tpr",
    "image_fpr_at_99tpr",
    "image_f1_max",
    "image_f1_at_threshold",
    "image_accuracy_at_threshold",
    "image_tpr_at_threshold",
    "image_fpr_at_threshold",
    "pixel_auroc",
    "pixel_ap",
    "pixel_best_dice",
    "pixel_metrics",
    "pixel_dice_at_threshold",
    "compute_anomaly_metrics",
    "AnomalyMetricAccumulator",
    "MORPHAEUS_BOOTSTRAP_SEEDS",
    "bootstrap_indices",
    "bootstrap_metric",
]

#: seeds of the original MorphAEus paper protocol (``dl_utils/boost_test.py``): five bootstrap resamples per task.
MORPHAEUS_BOOTSTRAP_SEEDS = (101822, 101922, 102022, 102122, 102222)

#: default number of test pixels kept exactly by :class:`AnomalyMetricAccumulator` (50M: 200 MB of float32 values
#: plus 50 MB of labels; the sort in ``compute`` needs roughly 1.5 GB more at this size).
DEFAULT_MAX_PIXELS = 50_000_000


class MetricUndefinedWarning(UserWarning):
    """A metric is undefined for the given labels (e.g. a single class) and was returned as NaN."""


def _undefined(name: str, reason: str) -> float:
    warnings.warn(
        f"medad_monai.evaluation.metrics: {name} is undefined ({reason}); returning NaN.", MetricUndefinedWarning, stacklevel=3
    )
    return math.nan


def _ratio(num: int, den: int, name: str, reason: str) -> float:
    return num / den if den > 0 else _undefined(name, reason)


# ---------------------------------------------------------------------------------------------------------------------
# input handling


def _scores_1d(x: Any, name: str) -> torch.Tensor:
    s = to_tensor(x, name).detach().reshape(-1)
    if not s.is_floating_point():
        s = s.double()
    if s.numel() and bool(torch.isnan(s).any()):
        raise ValueError(f"medad_monai.evaluation.metrics: {name} contain {int(torch.isnan(s).sum())} NaN value(s).")
    return s


def _labels_1d(x: Any, name: str = "labels") -> torch.Tensor:
    y = to_tensor(x, name).detach().reshape(-1)
    if y.dtype == torch.bool:
        return y
    if y.numel() and not bool(((y == 0) | (y == 1)).all()):
        bad = sorted({float(v) for v in y[(y != 0) & (y != 1)].unique()[:5].tolist()})
        raise ValueError(
            f"medad_monai.evaluation.metrics: {name} must be 0 (normal) or 1 (anomalous); found {bad}. A label of -1 means the "
            "item has no ground truth: remove it from the test list or label it."
        )
    return y == 1


def _mask_bool(x: Any, name: str = "masks") -> torch.Tensor:
    m = to_tensor(x, name).detach()
    return m if m.dtype == torch.bool else m > 0.5


def _pair(scores: Any, labels: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = _scores_1d(scores, f"{what} scores")
    y = _labels_1d(labels, f"{what} labels").to(s.device)
    if s.numel() != y.numel():
        raise ValueError(f"medad_monai.evaluation.metrics: {s.numel()} {what} scores but {y.numel()} {what} labels.")
    return s, y


def _pixel_pair(maps: Any, masks: Any) -> tuple[torch.Tensor, torch.Tensor]:
    m = to_tensor(maps, "maps").detach()
    g = _mask_bool(masks)
    if m.shape != g.shape:
        try:
            g = torch.broadcast_to(g, m.shape)
        except RuntimeError as e:
            raise ValueError(f"medad_monai.evaluation.metrics: masks {tuple(g.shape)} do not match maps {tuple(m.shape)}.") from e
    return _scores_1d(m, "map values"), g.reshape(-1).to(m.device)


# ---------------------------------------------------------------------------------------------------------------------
# one sort + cumsum


@dataclass
class _Curve:
    """Counts at each distinct threshold, thresholds decreasing (``TP``/``FP`` of ``score >= threshold``)."""

    thresholds: torch.Tensor
    tps: torch.Tensor  # int64, non-decreasing
    fps: torch.Tensor

    @property
    def n_pos(self) -> int:
        return int(self.tps[-1]) if self.tps.numel() else 0

    @property
    def n_neg(self) -> int:
        return int(self.fps[-1]) if self.fps.numel() else 0

    @cached_property
    def tps0(self) -> torch.Tensor:
        """``TP`` as float64 with the curve's origin (0) in front; converted once for all metrics of the curve."""
        return torch.cat([torch.zeros(1, dtype=torch.float64, device=self.tps.device), self.tps.double()])

    @cached_property
    def fps0(self) -> torch.Tensor:
        """``FP`` as float64 with the origin in front."""
        return torch.cat([torch.zeros(1, dtype=torch.float64, device=self.fps.device), self.fps.double()])

    @cached_property
    def n_ge(self) -> torch.Tensor:
        """``TP + FP`` (scores ``>= threshold``) as float64; shared by AP and F1."""
        return self.tps0[1:] + self.fps0[1:]


def _curve(s: torch.Tensor, y: torch.Tensor) -> _Curve:
    n = s.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return _Curve(s.new_zeros(0), empty, empty)
    if s.device.type == "cpu":
        return _curve_cpu(s, y)
    srt, order = torch.sort(s, descending=True)
    ys = y[order]
    del order
    last_of_run = torch.nonzero(srt[1:] != srt[:-1]).squeeze(1)
    idx = torch.cat([last_of_run, torch.tensor([n - 1], device=s.device)])
    cum_dtype = torch.int32 if n < 2**31 - 1 else torch.int64  # halves the memory of the pixel cumsum
    tps = torch.cumsum(ys, 0, dtype=cum_dtype)[idx].long()
    fps = idx + 1 - tps
    return _Curve(srt[idx], tps, fps)


def _curve_cpu(s: torch.Tensor, y: torch.Tensor) -> _Curve:
    """:func:`_curve` by one NumPy value sort (no argsort, no gather): same thresholds and counts.

    The negated scores are sorted ascending (the scores descending, an exact sign flip); run ``k`` of equal scores
    ``u_k`` ends at index ``end_k``, so ``end_k + 1`` scores are ``>= u_k``. Every score of the smaller class equals one
    ``u_k``: a binary search finds its run, a bincount and a cumulative sum give that class's count ``>= u_k``, and the
    other class's count is the difference.
    """
    values = (s if s.dtype in (torch.float32, torch.float64) else s.float()).contiguous().numpy()
    labels = y.contiguous().numpy()
    n = values.size
    desc = np.negative(values)
    desc.sort()  # the one sort, in place
    ends = np.flatnonzero(desc[1:] != desc[:-1])
    ends = np.append(ends, n - 1)
    run_keys = desc[ends]  # ascending negated distinct scores
    del desc
    n_ge = ends + 1
    n_pos = int(np.count_nonzero(labels))
    pos_is_smaller = n_pos <= n - n_pos
    smaller = values[labels] if pos_is_smaller else values[~labels]
    np.negative(smaller, out=smaller)
    smaller_ge = np.bincount(np.searchsorted(run_keys, smaller), minlength=run_keys.size)
    np.cumsum(smaller_ge, out=smaller_ge)
    tps = smaller_ge if pos_is_smaller else n_ge - smaller_ge
    fps = n_ge - tps
    thresholds = np.negative(run_keys, out=run_keys)
    return _Curve(torch.from_numpy(thresholds).to(s.dtype), torch.from_numpy(tps), torch.from_numpy(fps))


def _auroc(c: _Curve, name: str) -> float:
    p, n = c.n_pos, c.n_neg
    if p == 0 or n == 0:
        return _undefined(name, f"{p} positive and {n} negative samples; both classes are needed")
    # trapezoids between consecutive ROC points: sum dFP * (TP + TP_prev) / (2 P N), one dot product
    return float(torch.dot(torch.diff(c.fps0), c.tps0[1:] + c.tps0[:-1])) / (2.0 * p * n)


def _ap(c: _Curve, name: str) -> float:
    p = c.n_pos
    if p == 0:
        return _undefined(name, "no positive sample")
    # sum_k (R_k - R_{k-1}) P_k = sum_k dTP_k * TP_k / (TP_k + FP_k) / P
    return float(torch.dot(torch.diff(c.tps0), c.tps0[1:] / c.n_ge)) / p


def _fpr_at_tpr(c: _Curve, tpr_level: float, name: str) -> float:
    p, n = c.n_pos, c.n_neg
    if p == 0 or n == 0:
        return _undefined(name, f"{p} positive and {n} negative samples; both classes are needed")
    tpr = c.tps0 / p
    fpr = c.fps0 / n
    first = int(torch.nonzero(tpr >= tpr_level)[0, 0])
    return float(fpr[first])


def _f1_max(c: _Curve, name: str) -> tuple[float, float]:
    p = c.n_pos
    if p == 0:
        return _undefined(name, "no positive sample"), math.nan
    half_f1 = c.tps0[1:] / (c.n_ge + p)  # F1 / 2 = TP / (2TP + FP + FN); counts are exact in float64 below 2**53
    best = int(torch.argmax(half_f1))
    return 2.0 * float(half_f1[best]), float(c.thresholds[best])


def _confusion(s: torch.Tensor, y: torch.Tensor, threshold: float) -> tuple[int, int, int, int]:
    pred = s > threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    return tp, fp, fn, int(y.numel()) - tp - fp - fn


def _threshold_metrics(tp: int, fp: int, fn: int, tn: int, prefix: str, dice_name: str = "f1") -> dict[str, float]:
    out: dict[str, float] = {}
    p, n = tp + fn, fp + tn
    name = f"{prefix}_{dice_name}_at_threshold"
    out[name] = _ratio(2 * tp, 2 * tp + fp + fn, name, "no positive and none predicted")
    name = f"{prefix}_tpr_at_threshold"
    out[name] = _ratio(tp, p, name, "no positive sample")
    name = f"{prefix}_fpr_at_threshold"
    out[name] = _ratio(fp, n, name, "no negative sample")
    if prefix == "image":
        name = f"{prefix}_precision_at_threshold"
        out[name] = _ratio(tp, tp + fp, name, "nothing predicted anomalous")
        name = f"{prefix}_accuracy_at_threshold"
        out[name] = _ratio(tp + tn, p + n, name, "no sample")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# public single-metric functions


def image_auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of image scores (= ``sklearn.metrics.roc_auc_score``).

    Example::

        >>> image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    return _auroc(_curve(*_pair(scores, labels, "image")), "image_auroc")


def bootstrap_indices(n: int, seed: int) -> torch.Tensor:
    """The resample of ``n`` test images with seed ``seed`` (with replacement, size ``n``):
    ``numpy.random.RandomState(seed).randint(0, n, n)``. Every bootstrap of the package draws its resamples here, so
    that two methods scored on the same images are resampled alike (paired differences)."""
    import numpy as np

    return torch.as_tensor(np.random.RandomState(int(seed)).randint(0, n, n), dtype=torch.long)


def bootstrap_metric(
    scores: Any, labels: Any, metric=None, seeds: tuple[int, ...] = MORPHAEUS_BOOTSTRAP_SEEDS
) -> dict[str, Any]:
    """Bootstrap of an image metric as the original MorphAEus evaluation reports it: the metric on resamples of the
    test images (with replacement, size ``n``, one per seed), summarised as mean ± std.

    The original (``dl_utils/boost_test.py``) draws 5 resamples with the seeds :data:`MORPHAEUS_BOOTSTRAP_SEEDS`;
    here resample ``i`` is ``numpy.random.RandomState(seeds[i]).randint(0, n, n)`` and ``std`` is the population
    standard deviation (``ddof=0``), our reading of that protocol (the exact indices of the original are not
    reproduced). A resample with one class only gives NaN and is left out of mean and std.

    Args:
        scores, labels: image scores and 0/1 labels.
        metric: ``f(scores, labels) -> float``; default :func:`image_auroc`.
        seeds: one resample per seed.

    Returns:
        ``{"mean", "std", "values", "n_resamples", "seeds"}``.
    """
    metric = image_auroc if metric is None else metric
    s, y = _pair(scores, labels, "image")
    n = int(s.numel())
    values = []
    for seed in seeds:
        idx = bootstrap_indices(n, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricUndefinedWarning)
            values.append(float(metric(s[idx], y[idx])))
    finite = [v for v in values if not math.isnan(v)]
    mean = sum(finite) / len(finite) if finite else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite)) if finite else math.nan
    return {"mean": mean, "std": std, "values": values, "n_resamples": len(finite), "seeds": list(seeds)}


def image_ap(scores: Any, labels: Any) -> float:
    """Average precision (step-wise, no interpolation; = ``sklearn.metrics.average_precision_score``)."""
    return _ap(_curve(*_pair(scores, labels, "image")), "image_ap")


def image_fpr_at_tpr(scores: Any, labels: Any, tpr: float = 0.95) -> float:
    """FPR of the first ROC point with TPR >= ``tpr`` (Bercea et al.'s FPR@TPR; see the module docstring)."""
    if not 0.0 <= tpr <= 1.0:
        raise ValueError(f"medad_monai.evaluation.metrics: tpr must be in [0, 1], got {tpr}.")
    return _fpr_at_tpr(_curve(*_pair(scores, labels, "image")), tpr, f"image_fpr_at_{tpr:g}tpr")


def image_fpr_at_95tpr(scores: Any, labels: Any) -> float:
    """FPR at 95 % TPR (MorphAEus' FPR95)."""
    return image_fpr_at_tpr(scores, labels, 0.95)


def image_fpr_at_99tpr(scores: Any, labels: Any) -> float:
    """FPR at 99 % TPR (MorphAEus' FPR99)."""
    return image_fpr_at_tpr(scores, labels, 0.99)


def image_f1_max(scores: Any, labels: Any, return_threshold: bool = False) -> float | tuple[float, float]:
    """Largest F1 over all thresholds (``score >= t``); with ``return_threshold`` also that ``t``.

    Chosen on the test labels, so it is an oracle like ``pixel_best_dice``.
    """
    f1, thr = _f1_max(_curve(*_pair(scores, labels, "image")), "image_f1_max")
    return (f1, thr) if return_threshold else f1


def image_f1_at_threshold(scores: Any, labels: Any, threshold: float) -> float:
    """F1 of the decision ``score > threshold`` (e.g. the calibrated image threshold)."""
    tp, fp, fn, _ = _confusion(*_pair(scores, labels, "image"), float(threshold))
    return _ratio(2 * tp, 2 * tp + fp + fn, "image_f1_at_threshold", "no positive and none predicted")


def image_accuracy_at_threshold(scores: Any, labels: Any, threshold: float) -> float:
    """Accuracy of the decision ``score > threshold``."""
    tp, fp, fn, tn = _confusion(*_pair(scores, labels, "image"), float(threshold))
    return _ratio(tp + tn, tp + fp + fn + tn, "image_accuracy_at_threshold", "no sample")


def image_tpr_at_threshold(scores: Any, labels: Any, threshold: float) -> float:
    """Sensitivity (TPR) of the decision ``score > threshold``."""
    tp, _, fn, _ = _confusion(*_pair(scores, labels, "image"), float(threshold))
    return _ratio(tp, tp + fn, "image_tpr_at_threshold", "no positive sample")


def image_fpr_at_threshold(scores: Any, labels: Any, threshold: float) -> float:
    """False-positive rate (1 - specificity) of the decision ``score > threshold``."""
    _, fp, _, tn = _confusion(*_pair(scores, labels, "image"), float(threshold))
    return _ratio(fp, fp + tn, "image_fpr_at_threshold", "no negative sample")


def _pixel_curve_metrics(c: _Curve) -> dict[str, float]:
    out = {"pixel_auroc": _auroc(c, "pixel_auroc"), "pixel_ap": _ap(c, "pixel_ap")}
    out["pixel_best_dice"], out["pixel_best_dice_threshold"] = _f1_max(c, "pixel_best_dice")
    return out


def pixel_metrics(maps: Any, masks: Any) -> dict[str, float]:
    """Pixel AUROC, AP and the oracle best Dice (with its threshold) from **one** sort of the pooled pixels.

    Equal to :func:`pixel_auroc`, :func:`pixel_ap` and :func:`pixel_best_dice` (each of which sorts the pixels again):
    use this when more than one is needed.

    Returns:
        ``{"pixel_auroc", "pixel_ap", "pixel_best_dice", "pixel_best_dice_threshold"}``.

    Example::

        >>> maps = torch.tensor([0.1, 0.2, 0.8, 0.9]).view(1, 1, 2, 2)
        >>> pixel_metrics(maps, torch.tensor([0, 0, 1, 1]).view(1, 1, 2, 2))["pixel_auroc"]
        1.0
    """
    return _pixel_curve_metrics(_curve(*_pixel_pair(maps, masks)))


def pixel_auroc(maps: Any, masks: Any) -> float:
    """ROC AUC of all pixels pooled over the images (maps ``(B, 1, H, W)``, masks of the same shape).

    Sorts the pixels; :func:`pixel_metrics` gives it together with AP and best Dice from one sort."""
    return _auroc(_curve(*_pixel_pair(maps, masks)), "pixel_auroc")


def pixel_ap(maps: Any, masks: Any) -> float:
    """Average precision of all pixels pooled over the images (see :func:`pixel_metrics` for several at once)."""
    return _ap(_curve(*_pixel_pair(maps, masks)), "pixel_ap")


def pixel_best_dice(maps: Any, masks: Any, return_threshold: bool = False) -> float | tuple[float, float]:
    """**Oracle** best pooled Dice over all thresholds chosen on these (test) labels (MedIAnomaly's Best-Dice).

    Dice at threshold ``t`` (``map >= t``) is ``2TP / (2TP + FP + FN)`` pooled over every pixel of every image; all
    distinct thresholds are evaluated at once from the sorted pixels. Not deployable: use
    :func:`pixel_dice_at_threshold` with a calibrated threshold for that.

    Example::

        >>> maps = torch.tensor([0.1, 0.2, 0.8, 0.9]).view(1, 1, 2, 2)
        >>> pixel_best_dice(maps, torch.tensor([0, 0, 1, 1]).view(1, 1, 2, 2))
        1.0
    """
    dice, thr = _f1_max(_curve(*_pixel_pair(maps, masks)), "pixel_best_dice")
    return (dice, thr) if return_threshold else dice


def pixel_dice_at_threshold(maps: Any, masks: Any, threshold: float) -> float:
    """Pooled Dice of ``map > threshold`` (the deployable number at the calibrated pixel threshold)."""
    tp, fp, fn, _ = _confusion(*_pixel_pair(maps, masks), float(threshold))
    return _ratio(2 * tp, 2 * tp + fp + fn, "pixel_dice_at_threshold", "empty masks and predictions")


# ---------------------------------------------------------------------------------------------------------------------
# all metrics of a run


def _get_threshold(calibration: Any, name: str) -> float:
    value = calibration.get(name) if isinstance(calibration, Mapping) else getattr(calibration, name, None)
    if value is None:
        raise ValueError(f"medad_monai.evaluation.metrics: the calibration has no {name!r}.")
    return float(value)


class AnomalyMetricAccumulator:
    """Streaming version of :func:`compute_anomaly_metrics`: ``update`` per batch, ``compute`` at the end.

    Image scores and labels are all kept. Pixel metrics use the images that have a mask **and** the normal images
    (label 0) without one, whose mask is taken as all zero (a normal image has no anomalous pixel); abnormal images
    without a mask are left out of the pixel metrics. Pixel metrics are reported only when at least one abnormal image
    has a mask.

    Memory: pixel values (float32) and labels (bool) are kept exactly up to ``max_pixels`` (default 50M) and beyond
    that as a deterministic uniform reservoir sample of ``max_pixels`` pixels, so pixel AUROC/AP/best Dice become
    estimates whose standard error shrinks like ``1/sqrt(max_pixels)`` (``pixel_sampled`` is then 1 in the output).
    The ``*_at_threshold`` pixel counts are always exact (counted in ``update``).

    Args:
        calibration: a :class:`~medad_monai.evaluation.calibration.Calibration` (or a mapping with ``image_threshold``
            and ``pixel_threshold``) for the deployable ``*_at_threshold`` metrics; ``None`` skips them.
        max_pixels: pixels kept exactly.
        seed: seed of the reservoir sample.

    Example::

        >>> acc = AnomalyMetricAccumulator()
        >>> acc.update(scores=torch.tensor([0.1, 0.9]), labels=torch.tensor([0, 1]))
        >>> acc.compute()["image_auroc"]
        1.0
    """

    def __init__(self, calibration: Any | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0) -> None:
        self.calibration = calibration
        self.max_pixels = int(max_pixels)
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._pixels = Reservoir(self.max_pixels, self.seed)
        self._pixel_counts = [0, 0, 0, 0]  # tp, fp, fn, tn at the calibrated pixel threshold
        self._n_abnormal_with_mask = 0
        self._n_pixel_images = 0

    def update(
        self,
        scores: Any,
        labels: Any,
        maps: Any | None = None,
        masks: Any | None = None,
        has_mask: Any | None = None,
    ) -> None:
        """Add one batch.

        Args:
            scores: ``(B,)`` image scores.
            labels: ``(B,)`` 0 normal / 1 anomalous.
            maps: optional ``(B, 1, H, W)`` anomaly maps.
            masks: optional ``(B, 1, H, W)`` ground truth (``> 0.5`` is anomalous); ``None`` means no image of the
                batch has a mask.
            has_mask: optional ``(B,)`` bool, which images have a real mask (default: all, when ``masks`` is given).
        """
        s, y = _pair(scores, labels, "image")
        self._scores.append(s.cpu())
        self._labels.append(y.cpu())
        if maps is None:
            return
        m = to_tensor(maps, "maps").detach()
        if m.shape[0] != s.numel():
            raise ValueError(f"medad_monai.evaluation.metrics: {m.shape[0]} maps for {s.numel()} scores.")
        b = m.shape[0]
        if masks is None:
            g = torch.zeros(m.shape, dtype=torch.bool, device=m.device)
            hm = torch.zeros(b, dtype=torch.bool, device=m.device)
        else:
            g = _mask_bool(masks).to(m.device)
            if g.shape != m.shape:
                try:
                    g = torch.broadcast_to(g, m.shape)
                except RuntimeError as e:
                    raise ValueError(
                        f"medad_monai.evaluation.metrics: masks {tuple(g.shape)} do not match maps {tuple(m.shape)}."
                    ) from e
            hm = (
                torch.ones(b, dtype=torch.bool, device=m.device)
                if has_mask is None
                else to_tensor(has_mask, "has_mask").reshape(-1).bool().to(m.device)
            )
            if hm.numel() != b:
                raise ValueError(f"medad_monai.evaluation.metrics: {hm.numel()} has_mask flags for {b} maps.")
        yd = y.to(m.device)
        eligible = hm | ~yd
        self._n_abnormal_with_mask += int((hm & yd).sum())
        if not bool(eligible.any()):
            return
        self._n_pixel_images += int(eligible.sum())
        values = _scores_1d(m[eligible], "map values").float().cpu()
        gt = (g[eligible] & hm[eligible].view(-1, *([1] * (g.ndim - 1)))).reshape(-1).cpu()
        if self.calibration is not None:
            counts = _confusion(values, gt, _get_threshold(self.calibration, "pixel_threshold"))
            self._pixel_counts = [a + c for a, c in zip(self._pixel_counts, counts)]
        self._pixels.add(values, gt)

    def compute(self) -> dict[str, float]:
        """All applicable metrics (see :func:`compute_anomaly_metrics` for the keys)."""
        if not self._scores or sum(t.numel() for t in self._scores) == 0:
            raise ValueError("medad_monai.evaluation.metrics: no test image was added; nothing to evaluate.")
        s = torch.cat(self._scores)
        y = torch.cat(self._labels)
        out: dict[str, float] = {}
        c = _curve(s, y)
        out["image_auroc"] = _auroc(c, "image_auroc")
        out["image_ap"] = _ap(c, "image_ap")
        out["image_fpr_at_95tpr"] = _fpr_at_tpr(c, 0.95, "image_fpr_at_95tpr")
        out["image_fpr_at_99tpr"] = _fpr_at_tpr(c, 0.99, "image_fpr_at_99tpr")
        out["image_f1_max"], out["image_f1_max_threshold"] = _f1_max(c, "image_f1_max")
        out["image_score_mean_normal"] = float(s[~y].double().mean()) if bool((~y).any()) else math.nan
        out["image_score_mean_abnormal"] = float(s[y].double().mean()) if bool(y.any()) else math.nan
        out["n_normal"] = int((~y).sum())
        out["n_abnormal"] = int(y.sum())
        if self.calibration is not None:
            counts = _confusion(s, y, _get_threshold(self.calibration, "image_threshold"))
            out.update(_threshold_metrics(*counts, "image"))
        if self._n_abnormal_with_mask > 0 and self._pixels.seen > 0:
            values, gt = self._pixels.columns()
            out.update(_pixel_curve_metrics(_curve(values, gt)))
            if self.calibration is not None:
                out.update(_threshold_metrics(*self._pixel_counts, "pixel", dice_name="dice"))
            out["n_pixel_images"] = self._n_pixel_images
            out["n_pixels"] = self._pixels.seen
            out["pixel_sampled"] = int(not self._pixels.exact)
        return out


def compute_anomaly_metrics(
    scores: Any,
    labels: Any,
    maps: Any | None = None,
    masks: Any | None = None,
    calibration: Any | None = None,
    has_mask: Any | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, float]:
    """Every applicable metric of a labelled test set in one dict.

    Keys, always: ``image_auroc, image_ap, image_fpr_at_95tpr, image_fpr_at_99tpr, image_f1_max,
    image_f1_max_threshold, image_score_mean_normal, image_score_mean_abnormal, n_normal, n_abnormal``.
    With a calibration: ``image_f1_at_threshold, image_tpr_at_threshold, image_fpr_at_threshold,
    image_precision_at_threshold, image_accuracy_at_threshold``. With maps and at least one abnormal image with a mask:
    ``pixel_auroc, pixel_ap, pixel_best_dice`` (oracle), ``pixel_best_dice_threshold, n_pixel_images, n_pixels,
    pixel_sampled`` and, with a calibration, ``pixel_dice_at_threshold, pixel_tpr_at_threshold,
    pixel_fpr_at_threshold`` (deployable). Which images enter the pixel metrics is described in
    :class:`AnomalyMetricAccumulator`.

    Args:
        scores: ``(N,)`` image scores.
        labels: ``(N,)`` 0 normal / 1 anomalous.
        maps: optional ``(N, 1, H, W)`` anomaly maps.
        masks: optional ``(N, 1, H, W)`` ground-truth masks.
        calibration: optional calibration giving ``image_threshold`` and ``pixel_threshold``.
        has_mask: optional ``(N,)`` flags of the images with a real mask (default: all when ``masks`` is given).
        max_pixels: see :class:`AnomalyMetricAccumulator`.

    Example::

        >>> m = compute_anomaly_metrics(torch.tensor([0.1, 0.2, 0.7, 0.9]), torch.tensor([0, 0, 1, 1]))
        >>> m["image_auroc"], m["image_fpr_at_95tpr"]
        (1.0, 0.0)
    """
    acc = AnomalyMetricAccumulator(calibration=calibration, max_pixels=max_pixels)
    acc.update(scores, labels, maps=maps, masks=masks, has_mask=has_mask)
    return acc.compute()
