"""Paired comparisons of methods on the same test images (``python -m medad_monai compare``, the demo's table) and the
demo's ``--train False`` re-scoring of trained models."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medad_monai.evaluation.metrics import bootstrap_indices, image_auroc
from medad_monai.io.report import bootstrap_interval, paired_bootstrap_difference

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_paired_difference_resamples_both_methods_alike():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40), np.ones(40)].astype(int)
    a = y + rng.normal(0, 0.8, y.size)  # informative
    b = a + rng.normal(0, 0.05, y.size)  # nearly the same ranking as a
    c = rng.normal(0, 1, y.size)  # chance

    same = paired_bootstrap_difference(a, a, y, n_resamples=200)
    assert same["difference"] == 0.0 and same["low"] == same["high"] == 0.0 and same["beyond"] == ""

    # by hand: the same resampled images for both methods, percentile interval of the differences
    diffs = []
    for seed in range(200):
        idx = bootstrap_indices(y.size, seed).numpy()
        diffs.append(image_auroc(a[idx], y[idx]) - image_auroc(c[idx], y[idx]))
    got = paired_bootstrap_difference(a, c, y, n_resamples=200)
    assert got["difference"] == pytest.approx(image_auroc(a, y) - image_auroc(c, y))
    assert got["low"] == pytest.approx(np.quantile(diffs, 0.025)) and got["high"] == pytest.approx(np.quantile(diffs, 0.975))
    assert got["beyond"] == "a" and paired_bootstrap_difference(c, a, y, n_resamples=200)["beyond"] == "b"

    # pairing: two near-identical methods differ by little, although each one's own interval is wide
    paired = paired_bootstrap_difference(a, b, y, n_resamples=200)
    own = bootstrap_interval(a, y, n_resamples=200)
    assert paired["high"] - paired["low"] < 0.25 * (own["high"] - own["low"])
    with pytest.raises(ValueError, match="one value per image"):
        paired_bootstrap_difference(a, b[:-1], y)


def _evaluation(folder: Path, data: Path, scores: dict[str, float]) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"image_auroc": None}))
    with open(folder / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "pred_score", "pred_label"])
        for name, v in scores.items():
            w.writerow([str(data / "images" / f"{name}.png"), v, 0])


def test_compare_command_reads_evaluation_folders(tmp_path):
    """The registered command on evaluation folders in the layout the demo's baselines write (metrics.json and
    scores.csv), matched to the datalist's labels by image path."""
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    names = [f"n{i}" for i in range(30)] + [f"a{i}" for i in range(30)]
    items = [{"image": f"images/{n}.png", "label": int(n[0] == "a")} for n in names]
    (data / "images").mkdir(parents=True)
    (data / "datalist.json").write_text(json.dumps({"training": [], "validation": [], "test": items}))
    good = {n: float(n[0] == "a") + rng.normal(0, 0.5) for n in names}
    weak = {n: rng.normal(0, 1) for n in names}
    _evaluation(tmp_path / "good", data, good)
    _evaluation(tmp_path / "weak", data, dict(reversed(list(weak.items()))))  # another row order

    proc = subprocess.run(
        [sys.executable, "-m", "medad_monai", "compare", str(tmp_path / "good"), str(tmp_path / "weak"),
         "--datalist", str(data / "datalist.json"), "--n_resamples", "300", "--output", str(tmp_path / "c.json")],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "c.json").read_text())
    y = np.array([int(n[0] == "a") for n in names])
    expected = paired_bootstrap_difference([good[n] for n in names], [weak[n] for n in names], y, n_resamples=300)
    got = result["comparisons"]["weak"]["image_auroc"]
    assert result["candidate"] == "good" and result["comparisons"]["weak"]["n_images"] == 60
    assert got["difference"] == pytest.approx(expected["difference"]) and got["low"] == pytest.approx(expected["low"])
    assert got["beyond"] == "a"
    assert f"| good − weak | {got['a']:.3f} − {got['b']:.3f} = {got['difference']:+.3f}" in proc.stdout
    assert "good better" in proc.stdout

    # labels that disagree with the datalist are refused, naming the images
    bad = tmp_path / "bad"
    _evaluation(bad, data, good)
    rows = list(csv.reader(open(bad / "scores.csv")))
    rows[0].append("label")
    for r in rows[1:]:
        r.append("1" if "/n" in r[0] else "0")
    with open(bad / "scores.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    proc = subprocess.run(
        [sys.executable, "-m", "medad_monai", "compare", str(tmp_path / "good"), str(bad),
         "--datalist", str(data / "datalist.json")],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert proc.returncode != 0 and "disagrees with the datalist" in proc.stderr


@pytest.mark.slow
def test_demo_rescores_trained_models_without_training(tmp_path, capsys):
    """``demo --train False`` re-calibrates the model already trained in the output folder with other settings
    (``run recalibrate``), leaves its weights alone, and the summary holds the paired comparisons."""
    from medad_monai.apps.demo import run_demo
    from medad_monai.data.phantoms import generate_demo_dataset

    data = tmp_path / "data"
    generate_demo_dataset(str(data), n_train=16, n_val=8, n_test_normal=6, n_test_abnormal=6, size=64, seed=3)
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="--train False needs a trained model"):
        run_demo(str(out), methods="morphaeus", dataset_dir=str(data), train=False)
    run_demo(str(out), methods="morphaeus", max_epochs=1, dataset_dir=str(data), n_resamples=50)
    weights = out / "morphaeus" / "models" / "model.pt"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    cal = json.loads((out / "morphaeus" / "models" / "calibration.json").read_text())
    assert cal["score_method"] == "max"  # the demo configs' score

    capsys.readouterr()
    results = run_demo(str(out), methods="morphaeus", dataset_dir=str(data), score_method="mean", train=False,
                       n_resamples=50)
    printed = capsys.readouterr().out
    assert "monai.bundle run recalibrate" in printed and "train + calibrate" not in printed
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    assert json.loads((out / "morphaeus" / "models" / "calibration.json").read_text())["score_method"] == "mean"
    assert "train_s" not in results["morphaeus"] and results["morphaeus"]["evaluate_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["comparisons"]["morphaeus"]) == {"mean_image_baseline", "pca_baseline"}
    assert "| morphaeus − pca_baseline |" in (out / "summary.md").read_text()
