"""Integration: the MemMC-MAE bundle (and its ablation configs) through the real bundle CLI on tiny phantom data."""

from __future__ import annotations

import csv
import json
import os

import _bundle_cli
from _bundle_cli import tiny
import pytest
import torch

from medad_monai.data.phantoms import generate_demo_dataset

BUNDLE = os.path.join(_bundle_cli.ROOT, "bundles", "memmc_mae")
CONFIGS = _bundle_cli.configs_dir("memmc_mae")

TINY = tiny("memmc_mae", num_workers=0, progress_bar=False)


def bundle_run(cwd, configs, **overrides):
    return _bundle_cli.bundle_run("memmc_mae", cwd, configs, **overrides)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("phantoms")
    generate_demo_dataset(str(d), n_train=16, n_val=6, n_test_normal=4, n_test_abnormal=4, size=64, seed=5)
    return str(d)


@pytest.mark.slow
def test_train_evaluate_infer(dataset, tmp_path):
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    common = dict(dataset_dir=dataset, ckpt_dir=ckpt, **TINY)
    bundle_run(tmp_path, ["train.json"], output_dir=out, max_epochs=2, warmup_epochs=1, batch_size=4, **common)
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert any("memory_k" in k for k in state), "memory slots missing from the trained model"
    cal = json.loads((ckpt / "calibration.json").read_text())
    assert cal["score_method"] == "mean" and cal["n_images"] == 6

    bundle_run(tmp_path, ["train.json", "evaluate.json"], output_dir=out, **common)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 8 and 0 <= metrics["image_auroc"] <= 1 and "pixel_best_dice" in metrics
    assert len(list((out / "test_results" / "overlays").glob("*.png"))) == 8

    pred = tmp_path / "pred"
    bundle_run(tmp_path, ["inference.json"], output_dir=pred, **common)
    with open(pred / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    # inference is deterministic (fixed complementary masks): the same image scores the same in evaluate's writer
    with open(out / "test_results" / "scores.csv") as f:
        eval_rows = {r["image"]: float(r["pred_score"]) for r in csv.DictReader(f)}
    for r in rows:
        assert abs(float(r["pred_score"]) - eval_rows[r["image"]]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "ablation, has_memory",
    [("ablation_mae.json", False), ("ablation_memory_only.json", True), ("ablation_multilevel_only.json", False)],
)
def test_ablation_configs(dataset, tmp_path, ablation, has_memory):
    bundle_run(
        tmp_path,
        ["train.json", ablation],
        dataset_dir=dataset,
        ckpt_dir=tmp_path / "m",
        output_dir=tmp_path / "e",
        max_epochs=1,
        batch_size=4,
        **TINY,
    )
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert any("memory_k" in k for k in state) == has_memory
    n_levels = len({k.split(".")[1] for k in state if k.startswith("level_embed.")})
    assert (n_levels > 1) == ("multilevel" in ablation), n_levels


@pytest.mark.slow
def test_smoothed_maps_and_max_score_from_the_cli(dataset, tmp_path):
    """``--map_sigma``/``--score_method`` reach calibration, evaluation and inference; a mismatch is refused."""
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    common = dict(dataset_dir=dataset, ckpt_dir=ckpt, score_method="max", map_sigma=1.5, **TINY)
    bundle_run(tmp_path, ["train.json"], output_dir=out, max_epochs=1, batch_size=4, **common)
    cal = json.loads((ckpt / "calibration.json").read_text())
    assert cal["score_method"] == "max" and cal["map_sigma"] == 1.5

    pred = tmp_path / "pred"
    bundle_run(tmp_path, ["inference.json"], output_dir=pred, **common)
    with open(pred / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(float(r["pred_score"]) > 0 for r in rows)

    with pytest.raises(AssertionError, match=r"map_sigma=0\.0 \(calibration: 1\.5\).*--map_sigma 1\.5"):
        bundle_run(tmp_path, ["train.json", "evaluate.json"], output_dir=out, **{**common, "map_sigma": 0})
