"""A MorphAEus bundle trained through the real bundle CLI with an override file, as ``configs/demo.json`` is used:
the tiny network and the demo's map and score recipe (signed residual, healthy normalisation restricted to the lung
fields, max score). Shared by the predictor tests of the core environment and the MONAI Label tests of the label
environment."""

from __future__ import annotations

import csv
import json
import os
import shutil

import _bundle_cli
from _bundle_cli import ROOT, tiny

from medad_monai.evaluation.calibration import Calibration
from medad_monai.data.phantoms import generate_demo_dataset

OVERRIDE = "configs/tiny_demo.json"
RECIPE = {"map_residual": "signed", "map_normalization": "healthy_lungs", "map_sigma": 1.5, "score_method": "max"}


def train_with_override(root) -> dict:
    """Trains a copy of the MorphAEus bundle 1 epoch with :data:`OVERRIDE` under ``root`` and runs bundle inference
    (CLI) on 2 normal and 2 abnormal test images. Returns ``bundle``, ``folder`` (the images), ``cli`` (file name ->
    ``(pred_score, pred_label)`` of the CLI's ``scores.csv``) and ``root``."""
    bundle = root / "morphaeus"
    shutil.copytree(os.path.join(ROOT, "bundles", "morphaeus", "configs"), bundle / "configs")
    # the whole configuration lives in the override file, so that every consumer given it (CLI, Label training and
    # inference, Deploy) builds and trains the same thing
    override = tiny("morphaeus", num_workers=0, progress_bar=False, perceptual_weight=0, warmup_epochs=1, **RECIPE)
    (bundle / OVERRIDE).write_text(json.dumps(override))
    data = root / "data"
    generate_demo_dataset(str(data), n_train=12, n_val=6, n_test_normal=3, n_test_abnormal=3, size=64, seed=5)
    _bundle_cli.bundle_run("morphaeus", root, ["train.json", "tiny_demo.json"], bundle_dir=bundle,
                           dataset_dir=data, ckpt_dir=bundle / "models", output_dir=root / "train", max_epochs=1,
                           batch_size=4)
    cal = Calibration.load(bundle / "models" / "calibration.json")
    assert cal.score_method == "max" and cal.map_residual == "signed" and cal.map_normalization
    folder = root / "images"
    folder.mkdir()
    with open(data / "datalist.json") as f:
        test = json.load(f)["test"]
    images = sorted(test, key=lambda it: it["label"])[:2] + sorted(test, key=lambda it: -it["label"])[:2]
    for it in images:
        shutil.copy(data / it["image"] if not os.path.isabs(it["image"]) else it["image"], folder)
    pred = root / "pred"
    _bundle_cli.bundle_run("morphaeus", root, ["inference.json", "tiny_demo.json"], bundle_dir=bundle,
                           input_dir=folder, ckpt_dir=bundle / "models", output_dir=pred)
    with open(pred / "scores.csv") as f:
        cli = {os.path.basename(r["image"]): (float(r["pred_score"]), int(r["pred_label"])) for r in csv.DictReader(f)}
    assert len(cli) == 4
    return {"bundle": bundle, "folder": folder, "cli": cli, "root": root}
