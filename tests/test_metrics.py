"""Tests of medad_monai.evaluation.metrics against scikit-learn and brute force, incl. ties and one-class edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from medad_monai.evaluation.calibration import fit_calibration
from medad_monai.evaluation.metrics import (
    AnomalyMetricAccumulator,
    MetricUndefinedWarning,
    compute_anomaly_metrics,
    image_accuracy_at_threshold,
    image_ap,
    image_auroc,
    image_f1_at_threshold,
    image_f1_max,
    image_fpr_at_95tpr,
    image_fpr_at_99tpr,
    image_fpr_at_threshold,
    image_fpr_at_tpr,
    image_tpr_at_threshold,
    pixel_ap,
    pixel_auroc,
    pixel_best_dice,
    pixel_dice_at_threshold,
    pixel_metrics,
)

TOL = 1e-6


def _data(seed: int, n: int = 300, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    s = rng.normal(size=n) + 1.2 * y
    if ties:
        s = np.round(s, 0)  # a handful of levels shared by both classes
    return s, y


def _sk_fpr_at(y, s, x, drop_intermediate):
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=drop_intermediate)
    return fpr[np.argwhere(tpr >= x)[0, 0]]


def _sk_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return f1.max()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_match_sklearn(seed, ties):
    s, y = _data(seed, ties=ties)
    assert image_auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert image_ap(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert image_f1_max(s, y) == pytest.approx(_sk_f1_max(y, s), abs=TOL)
    for x, fn in ((0.95, image_fpr_at_95tpr), (0.99, image_fpr_at_99tpr)):
        ours = fn(s, y)
        assert ours == pytest.approx(_sk_fpr_at(y, s, x, drop_intermediate=False), abs=TOL)
        if not ties:  # Bercea et al.'s exact code (roc_curve defaults) agrees whenever scores are tie-free
            assert ours == pytest.approx(_sk_fpr_at(y, s, x, drop_intermediate=True), abs=TOL)
    for x in (0.0, 0.5, 0.8, 1.0):
        assert image_fpr_at_tpr(s, y, x) == pytest.approx(_sk_fpr_at(y, s, x, False), abs=TOL)


def test_fpr_at_tpr_on_collinear_ties_uses_every_roc_point():
    # (0,0) -> (1/3,1/3) -> (2/3,2/3) -> (1,1): sklearn's default drops the middle points
    s = np.array([3, 3, 2, 2, 1, 1], dtype=float)
    y = np.array([1, 0, 1, 0, 1, 0])
    ours = image_fpr_at_tpr(s, y, 0.5)
    assert ours == pytest.approx(2 / 3) == pytest.approx(_sk_fpr_at(y, s, 0.5, drop_intermediate=False))
    assert ours <= _sk_fpr_at(y, s, 0.5, drop_intermediate=True)


def test_all_equal_scores_and_float32():
    y = np.array([0, 1, 0, 1, 1])
    s = np.full(5, 0.3, dtype=np.float32)
    assert image_auroc(s, y) == pytest.approx(0.5)
    assert image_ap(s, y) == pytest.approx(average_precision_score(y, s))
    s32 = np.random.default_rng(0).random(1000).astype(np.float32)
    y32 = (np.random.default_rng(1).random(1000) < 0.5).astype(int)
    assert image_auroc(s32, y32) == pytest.approx(roc_auc_score(y32, s32), abs=TOL)


@pytest.mark.parametrize("labels", [np.zeros(10, dtype=int), np.ones(10, dtype=int)])
def test_one_class_returns_nan_with_warning(labels):
    s = np.linspace(0, 1, 10)
    with pytest.warns(MetricUndefinedWarning):
        assert math.isnan(image_auroc(s, labels))
    with pytest.warns(MetricUndefinedWarning):
        assert math.isnan(image_fpr_at_95tpr(s, labels))
    if labels.sum() == 0:
        with pytest.warns(MetricUndefinedWarning):
            assert math.isnan(image_ap(s, labels))
        with pytest.warns(MetricUndefinedWarning):
            assert math.isnan(image_f1_max(s, labels))
    else:  # defined with positives only, as in scikit-learn
        assert image_ap(s, labels) == pytest.approx(average_precision_score(labels, s))
    with pytest.warns(MetricUndefinedWarning):
        m = compute_anomaly_metrics(s, labels)
    assert math.isnan(m["image_auroc"])


def test_threshold_metrics():
    s = np.array([0.1, 0.4, 0.5, 0.6, 0.9])
    y = np.array([0, 0, 1, 1, 1])
    t = 0.4  # strictly above -> predicted: 0.5, 0.6, 0.9
    assert image_tpr_at_threshold(s, y, t) == 1.0
    assert image_fpr_at_threshold(s, y, t) == 0.0
    assert image_f1_at_threshold(s, y, t) == 1.0
    assert image_accuracy_at_threshold(s, y, t) == 1.0
    t = 0.55
    assert image_tpr_at_threshold(s, y, t) == pytest.approx(2 / 3)
    assert image_f1_at_threshold(s, y, t) == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert image_accuracy_at_threshold(s, y, t) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        image_auroc(s, np.array([0, 1, -1, 1, 0]))
    with pytest.raises(ValueError, match="NaN"):
        image_auroc(np.array([0.1, np.nan]), np.array([0, 1]))


def _pixel_data(seed, ties=False):
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 1, 16, 16), dtype=np.float32)
    masks[3:, :, 4:9, 5:11] = 1.0
    maps = (rng.random(masks.shape) + 0.6 * masks).astype(np.float32)
    if ties:
        maps = np.round(maps * 8) / 8
    return maps, masks


def _brute_best_dice(maps, masks):
    v, g = maps.ravel().astype(np.float64), masks.ravel() > 0.5
    best = 0.0
    for t in np.unique(v):
        p = v >= t
        tp, fp, fn = np.sum(p & g), np.sum(p & ~g), np.sum(~p & g)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_pixel_metrics_match_sklearn_and_brute_force(seed, ties):
    maps, masks = _pixel_data(seed, ties)
    v, g = maps.ravel(), masks.ravel().astype(int)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(g, v), abs=TOL)
    ap = pixel_ap(torch.from_numpy(maps), torch.from_numpy(masks))
    assert ap == pytest.approx(average_precision_score(g, v), abs=TOL)
    dice, thr = pixel_best_dice(maps, masks, return_threshold=True)
    assert dice == pytest.approx(_brute_best_dice(maps, masks), abs=TOL)
    # the returned threshold reproduces the best Dice with the ">=" rule
    p = v >= thr
    assert 2 * np.sum(p & (g == 1)) / (np.sum(p) + np.sum(g)) == pytest.approx(dice, abs=TOL)
    t = 0.8
    pred = v > t
    expected = 2 * np.sum(pred & (g == 1)) / (np.sum(pred) + np.sum(g))
    assert pixel_dice_at_threshold(maps, masks, t) == pytest.approx(expected, abs=TOL)


def test_compute_anomaly_metrics_keys_and_mask_rules():
    maps, masks = _pixel_data(0)
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = maps.reshape(6, -1).mean(1)
    base = compute_anomaly_metrics(scores, labels)
    assert {"image_auroc", "image_ap", "image_fpr_at_95tpr", "image_fpr_at_99tpr", "image_f1_max"} <= set(base)
    assert not any(k.startswith("pixel_") for k in base) and "image_f1_at_threshold" not in base
    assert base["n_normal"] == 3 and base["n_abnormal"] == 3

    # abnormal image 5 has no mask: left out of the pixel metrics; normal images without mask count as all-zero
    has_mask = np.array([False, False, False, True, True, False])
    given = masks.copy()
    given[:3] = 7.0  # garbage in the placeholder masks of normal images must be ignored
    cal = fit_calibration(scores[:3], maps[:3], pixel_fpr=0.05)
    m = compute_anomaly_metrics(scores, labels, maps, given, calibration=cal, has_mask=has_mask)
    keep = [0, 1, 2, 3, 4]
    v = maps[keep].ravel()
    g = np.concatenate([np.zeros(3 * 256), masks[3:5].ravel()]).astype(int)
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(g, v), abs=TOL)
    assert m["pixel_ap"] == pytest.approx(average_precision_score(g, v), abs=TOL)
    pred = v > cal.pixel_threshold
    assert m["pixel_dice_at_threshold"] == pytest.approx(2 * np.sum(pred & (g == 1)) / (pred.sum() + g.sum()))
    assert m["pixel_fpr_at_threshold"] == pytest.approx(np.sum(pred & (g == 0)) / np.sum(g == 0))
    assert m["image_tpr_at_threshold"] == pytest.approx(image_tpr_at_threshold(scores, labels, cal.image_threshold))
    assert m["n_pixel_images"] == 5 and m["n_pixels"] == 5 * 256 and m["pixel_sampled"] == 0
    assert m["pixel_best_dice"] <= 1.0 and m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))

    # no abnormal image with a mask -> no pixel keys (not NaN)
    m2 = compute_anomaly_metrics(scores, labels, maps, None)
    assert not any(k.startswith("pixel_") for k in m2)


def test_accumulator_streaming_equals_one_shot_and_subsampling_is_close():
    rng = np.random.default_rng(5)
    n = 40
    masks = np.zeros((n, 1, 32, 32), dtype=np.float32)
    labels = (np.arange(n) % 2).astype(int)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, 24, size=2)
        masks[i, 0, r : r + 8, c : c + 8] = 1
    maps = (rng.gamma(2.0, 0.1, size=masks.shape) + 0.3 * masks).astype(np.float32)
    scores = maps.reshape(n, -1).mean(1)
    cal = {"image_threshold": float(np.median(scores)), "pixel_threshold": 0.4}
    ref = compute_anomaly_metrics(scores, labels, maps, masks, calibration=cal)

    acc = AnomalyMetricAccumulator(calibration=cal)
    for s in range(0, n, 7):
        acc.update(torch.from_numpy(scores[s : s + 7]), labels[s : s + 7], maps[s : s + 7], masks[s : s + 7])
    out = acc.compute()
    assert out.keys() == ref.keys()
    for k in ref:
        assert out[k] == pytest.approx(ref[k], abs=1e-9, nan_ok=True), k

    # a deterministic sample of 16,000 of the 40,960 pixels; the tolerances are several standard errors wide
    small = AnomalyMetricAccumulator(calibration=cal, max_pixels=16_000, seed=1)
    for s in range(0, n, 7):
        small.update(scores[s : s + 7], labels[s : s + 7], maps[s : s + 7], masks[s : s + 7])
    approx = small.compute()
    assert approx["pixel_sampled"] == 1 and approx["n_pixels"] == n * 1024
    assert approx["pixel_auroc"] == pytest.approx(ref["pixel_auroc"], abs=0.01)
    assert approx["pixel_ap"] == pytest.approx(ref["pixel_ap"], abs=0.05)
    assert approx["pixel_best_dice"] == pytest.approx(ref["pixel_best_dice"], abs=0.05)
    assert approx["pixel_dice_at_threshold"] == ref["pixel_dice_at_threshold"]  # counted exactly, not sampled
    assert approx["image_auroc"] == ref["image_auroc"]


def test_accumulator_errors_and_no_warnings_on_good_data():
    with pytest.raises(ValueError, match="no test image"):
        AnomalyMetricAccumulator().compute()
    acc = AnomalyMetricAccumulator()
    with pytest.raises(ValueError, match="maps for"):
        acc.update(np.array([0.1, 0.2]), np.array([0, 1]), maps=np.zeros((3, 1, 4, 4)))
    s, y = _data(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetricUndefinedWarning)
        compute_anomaly_metrics(s, y)


def test_bootstrap_metric_follows_the_original_protocol():
    from medad_monai.evaluation.metrics import MORPHAEUS_BOOTSTRAP_SEEDS, bootstrap_metric, image_auroc

    rng = np.random.RandomState(0)
    labels = [0] * 40 + [1] * 40
    scores = list(rng.normal(0, 1, 40)) + list(rng.normal(1, 1, 40))
    b = bootstrap_metric(scores, labels)
    assert b["seeds"] == list(MORPHAEUS_BOOTSTRAP_SEEDS) and b["n_resamples"] == 5 and len(b["values"]) == 5
    expected = []
    for seed in MORPHAEUS_BOOTSTRAP_SEEDS:
        idx = np.random.RandomState(seed).randint(0, 80, 80)
        expected.append(roc_auc_score(np.asarray(labels)[idx], np.asarray(scores)[idx]))
    np.testing.assert_allclose(b["values"], expected, rtol=1e-6)
    assert b["mean"] == pytest.approx(np.mean(expected)) and b["std"] == pytest.approx(np.std(expected))
    assert abs(b["mean"] - image_auroc(scores, labels)) < 0.1


@pytest.mark.parametrize("positive_share", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_one_sort_curve_equals_counting_and_pixel_metrics_equal_single_functions(positive_share, dtype):
    """The curve from one value sort (binary search of the smaller class) gives scikit-learn's values (stable sort of
    (score, label) pairs) and the brute-force best Dice and threshold, with ties and -0.0/+0.0, whichever class is
    smaller; ``pixel_metrics`` returns exactly what the three single-metric functions return."""
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < positive_share).astype(np.int64)
    s = np.round(rng.normal(size=4000) + y, 1)  # ~60 levels shared by both classes
    s[:5] = -0.0
    s[5:10] = 0.0
    maps = torch.from_numpy(s).to(dtype).view(4, 1, 25, 40)
    masks = torch.from_numpy(y).view(4, 1, 25, 40)
    exact = maps.double().numpy().ravel()
    together = pixel_metrics(maps, masks)
    assert together["pixel_auroc"] == pixel_auroc(maps, masks)
    assert together["pixel_ap"] == pixel_ap(maps, masks)
    assert (together["pixel_best_dice"], together["pixel_best_dice_threshold"]) == pixel_best_dice(
        maps, masks, return_threshold=True
    )
    assert together["pixel_auroc"] == pytest.approx(roc_auc_score(y, exact), abs=1e-12)
    assert together["pixel_ap"] == pytest.approx(average_precision_score(y, exact), abs=1e-12)
    assert together["pixel_best_dice"] == pytest.approx(_sk_f1_max(y, exact), abs=1e-12)
    best, best_t = 0.0, None
    for t in np.unique(exact):
        p = exact >= t
        dice = 2 * np.sum(p & (y == 1)) / (np.sum(p) + np.sum(y))
        if dice > best:
            best, best_t = dice, t
    assert together["pixel_best_dice"] == pytest.approx(best, abs=1e-12)
    assert together["pixel_best_dice_threshold"] == best_t
    everything = compute_anomaly_metrics(maps.double().flatten(1).mean(1), [0, 1, 1, 1], maps, masks)
    for k in ("pixel_auroc", "pixel_ap", "pixel_best_dice"):
        assert everything[k] == together[k], k
    # an evaluation keeps pixel values in float32
    assert everything["pixel_best_dice_threshold"] == pytest.approx(together["pixel_best_dice_threshold"], rel=1e-7)
