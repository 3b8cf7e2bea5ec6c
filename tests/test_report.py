"""The evaluation report (``python -m medad_monai report``) on folders written by the real bundle CLI and by the
demo's baseline: files exist, figures decode and are not blank, numbers equal ``metrics.json`` and the metrics
module, and a folder that does not match its datalist is refused or flagged."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import _bundle_cli
import numpy as np
import pytest
from _bundle_cli import tiny
from PIL import Image

from medad_monai.data.phantoms import generate_demo_dataset
from medad_monai.apps.demo import auroc_by_lesion, run_baseline
from medad_monai.evaluation.metrics import bootstrap_metric, image_ap, image_auroc
from medad_monai.io.report import bootstrap_interval, evaluation_report, pr_points, roc_points

REPO = Path(__file__).resolve().parents[1]
TINY = tiny("morphaeus", batch_size=8, num_workers=0, warmup_epochs=0, progress_bar=False)


def _report_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "medad_monai", "report", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _decodes_and_not_blank(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()
        arr = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert img.format == "PNG" and arr.size > 0 and arr.std() > 5, f"{path} is empty or blank"
    return img.size


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("phantoms")
    generate_demo_dataset(str(d), n_train=24, n_val=8, n_test_normal=8, n_test_abnormal=12, size=64, seed=5)
    return d


@pytest.fixture(scope="module")
def evaluation(data, tmp_path_factory) -> Path:
    """A real evaluation folder: the MorphAEus bundle trained for 2 tiny epochs, then its evaluate.json."""
    work = tmp_path_factory.mktemp("run")
    common = dict(dataset_dir=data, ckpt_dir=work / "models", **TINY)
    _bundle_cli.bundle_run("morphaeus", work, ["train.json"], output_dir=work / "train", max_epochs=2,
                           perceptual_weight=0.0, **common)
    _bundle_cli.bundle_run("morphaeus", work, ["train.json", "evaluate.json"], output_dir=work / "eval", **common)
    return work / "eval"


# ------------------------------------------------------------------------------------------------ fast checks


def test_curve_points_integrate_to_the_metrics():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding makes ties across both classes
    fpr, tpr = roc_points(scores, labels)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(image_auroc(scores, labels), abs=1e-12)
    recall, precision = pr_points(scores, labels)
    assert np.sum(np.diff(np.r_[0.0, recall]) * precision) == pytest.approx(image_ap(scores, labels), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_points([0.1, 0.2], [1, 1])


def test_bootstrap_interval_is_the_percentile_of_bootstrap_metric():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    scores = rng.normal(labels * 1.0, 1.0)
    ci = bootstrap_interval(scores, labels, image_auroc, n_resamples=300)
    values = bootstrap_metric(scores, labels, image_auroc, seeds=tuple(range(300)))["values"]
    assert ci["low"] == pytest.approx(np.quantile(values, 0.025)) and ci["high"] == pytest.approx(
        np.quantile(values, 0.975))
    assert ci["low"] < image_auroc(scores, labels) < ci["high"] and ci["high"] - ci["low"] < 0.35
    wide = bootstrap_interval(scores[::4], labels[::4], image_auroc, n_resamples=300)
    assert wide["high"] - wide["low"] > ci["high"] - ci["low"]  # fewer images, a wider interval
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(scores, labels, level=1.5)


# ------------------------------------------------------------------------------------------------ real runs


def _cells(text: str) -> dict[str, tuple[str, str]]:
    """``data-key -> (data-value, shown text)`` of the report's summary cells."""
    return {k: (v, shown) for k, v, shown in
            re.findall(r'data-key="([^"]+)" data-value="([^"]+)">([^<]*)<', text)}


@pytest.mark.slow
def test_report_of_a_bundle_evaluation(evaluation, data, tmp_path):
    out = tmp_path / "report" / "morphaeus.html"
    _report_cli(str(evaluation), "--dataset_dir", str(data), "--output", str(out), "--n_bootstrap", "200",
                "--n_bootstrap_pixel", "20")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    text = out.read_text()

    # every figure the page shows exists next to it and decodes; the three example figures are there
    sources = re.findall(r'<img[^>]* src="([^"]+)"', text)
    names = {Path(s).stem for s in sources}
    assert {"roc", "pr", "histogram", "false_positives", "misses", "best_detections"} <= names, names
    for src in sources:
        assert not os.path.isabs(src)
        width, height = _decodes_and_not_blank(out.parent / src)
        assert width >= 200 and height >= 100

    # the summary shows metrics.json's numbers, in full in data-value and rounded on the page
    cells = _cells(text)
    for key in ("image_auroc", "image_ap", "image_fpr_at_95tpr", "pixel_auroc", "pixel_ap", "pixel_best_dice"):
        value, shown = cells[key]
        assert float(value) == metrics[key], key
        assert shown == f"{metrics[key]:.3f}"
    # numbers recomputed from scores.csv and the maps agree with metrics.json (else the page carries a note)
    assert 'class="note"' not in text

    # per lesion kind: the AUROC of each kind against all normals, as the demo computes it
    by_kind = auroc_by_lesion(str(evaluation / "test_results" / "scores.csv"), str(data / "datalist.json"))
    assert by_kind and set(by_kind) <= {"nodule", "consolidation", "effusion", "pneumothorax", "cardiomegaly"}
    for kind, auroc in by_kind.items():
        shown = re.search(rf'data-key="lesion:{kind}">([^<]+)<', text)
        assert shown and shown.group(1) == f"{auroc:.3f}", kind
    # the intervals: image AUROC's is the percentile interval of metrics.bootstrap_metric's resamples
    shown = {name: re.search(rf"<td>{name}</td><td[^>]*>[^<]*</td><td[^>]*>\[([0-9.]+), ([0-9.]+)\]", text)
             for name in ("image AUROC", "image AP", "pixel AUROC", "pixel AP")}
    assert all(m and float(m.group(1)) <= float(m.group(2)) for m in shown.values()), shown
    with open(evaluation / "test_results" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    label_of = {str(data / i["image"]): i["label"] for i in json.loads((data / "datalist.json").read_text())["test"]}
    scores, labels = [float(r["pred_score"]) for r in rows], [label_of[r["image"]] for r in rows]
    ci = bootstrap_interval(scores, labels, image_auroc, n_resamples=200)
    assert shown["image AUROC"].groups() == (f"{ci['low']:.3f}", f"{ci['high']:.3f}")


@pytest.mark.slow
def test_report_markdown_and_return_values(evaluation, data, tmp_path):
    out = tmp_path / "r.md"
    result = evaluation_report(str(evaluation), output=str(out), dataset_dir=str(data), n_bootstrap=100,
                               n_bootstrap_pixel=0, n_examples=2)
    metrics = json.loads((evaluation / "metrics.json").read_text())
    text = out.read_text()
    assert f"| image AUROC | {metrics['image_auroc']:.3f} |" in text
    assert f"| pixel AP | {metrics['pixel_ap']:.3f} |" in text
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        _decodes_and_not_blank(out.parent / link)
    assert result["all"]["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-12)
    assert result["pixel"]["pixel_ap"] == pytest.approx(metrics["pixel_ap"], rel=1e-6)
    assert result["pixel"]["pixel_ap_ci"] is None  # n_bootstrap_pixel=0
    assert len(result["figures"]) == 6 and not result["notes"]
    with Image.open(Path(out.parent / "r_files" / "misses.png")) as img:  # two overlays side by side
        assert img.width > 2 * img.height


@pytest.mark.slow
def test_report_flags_scores_that_do_not_match_metrics(evaluation, data, tmp_path):
    copy = tmp_path / "eval"
    shutil.copytree(evaluation, copy)
    scores = copy / "test_results" / "scores.csv"
    with open(scores, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = {str(data / it["image"]): it["label"] for it in json.loads((data / "datalist.json").read_text())["test"]}
    # the best-scoring abnormal image moved below every other image: a lower AUROC than the evaluation's
    highest_abnormal = max((r for r in rows if labels[r["image"]] == 1), key=lambda r: float(r["pred_score"]))
    highest_abnormal["pred_score"] = "-1000.0"
    with open(scores, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    result = evaluation_report(str(copy), dataset_dir=str(data), n_bootstrap=50, n_bootstrap_pixel=0)
    assert any("image_auroc from scores.csv" in n for n in result["notes"])
    assert 'class="note"' in (copy / "report.html").read_text()

    # a datalist the evaluation did not run on is refused with the fix in the message
    other = tmp_path / "other"
    generate_demo_dataset(str(other), n_train=4, n_val=2, n_test_normal=2, n_test_abnormal=2, size=64, seed=9)
    with pytest.raises(ValueError, match="--datalist / --dataset_dir / --test_key"):
        evaluation_report(str(copy), dataset_dir=str(other))
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        evaluation_report(str(tmp_path), dataset_dir=str(data))
    with pytest.raises(ValueError, match=".html or .md"):
        evaluation_report(str(copy), output=str(tmp_path / "r.pdf"), dataset_dir=str(data))


def test_report_of_a_baseline_folder(data, tmp_path):
    """The demo's baselines write metrics.json and scores.csv side by side and no maps: curves and tables, no
    examples, and a note that says so."""
    metrics = run_baseline(str(tmp_path), str(data), spatial_size=[32, 32], score_method="max", map_sigma=1.0)
    folder = tmp_path / "mean_image_baseline"
    result = evaluation_report(str(folder), output=str(tmp_path / "b.html"), dataset_dir=str(data), n_bootstrap=100)
    text = (tmp_path / "b.html").read_text()
    assert float(_cells(text)["image_auroc"][0]) == metrics["image_auroc"] == pytest.approx(
        result["all"]["image_auroc"], abs=1e-12)
    assert result["pixel"] is None and any("No anomaly maps" in n for n in result["notes"])
    assert sorted(Path(p).stem for p in result["figures"]) == ["histogram", "pr", "roc"]
    for p in result["figures"]:
        _decodes_and_not_blank(Path(p))
    for kind, auroc in metrics["image_auroc_by_lesion"].items():
        assert result["by_lesion"][kind]["image_auroc"] == pytest.approx(auroc, abs=1e-12)
        ci = result["by_lesion"][kind]["image_auroc_ci"]
        assert math.isnan(ci["low"]) or ci["low"] <= auroc <= ci["high"]
