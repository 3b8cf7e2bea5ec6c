"""Integration: the MorphAEus bundle's train / evaluate / inference configs through the real bundle CLI.

Each command runs ``python -m monai.bundle run`` in a subprocess, from a folder outside the bundle, on a tiny
generated phantom dataset; the test checks the files each step writes and their contents.
"""

from __future__ import annotations

import csv
import json
import os

import _bundle_cli
from _bundle_cli import tiny
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medad_monai.data.phantoms import generate_demo_dataset

BUNDLE = os.path.join(_bundle_cli.ROOT, "bundles", "morphaeus")
CONFIGS = _bundle_cli.configs_dir("morphaeus")

# 32x32 with 5 levels keeps one epoch at a few seconds on 2 CPU cores.
TINY = tiny("morphaeus", batch_size=8, num_workers=0, warmup_epochs=0, progress_bar=False)


def bundle_run(cwd, configs, run_id=None, **overrides):
    return _bundle_cli.bundle_run("morphaeus", cwd, configs, run_id=run_id, **overrides)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("phantoms")
    generate_demo_dataset(str(d), n_train=24, n_val=8, n_test_normal=6, n_test_abnormal=6, size=64, seed=3)
    return str(d)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    ckpt = work / "models"
    out = work / "eval"
    bundle_run(
        str(work),
        ["train.json"],
        dataset_dir=dataset,
        ckpt_dir=ckpt,
        output_dir=out,
        max_epochs=2,
        perceptual_weight=0.05,
        allow_random_vgg=True,
        **TINY,
    )
    return {"work": work, "ckpt": ckpt, "out": out, "dataset": dataset}


@pytest.mark.slow
def test_train_writes_model_checkpoint_calibration_and_logs(trained):
    ckpt, out = trained["ckpt"], trained["out"]
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert any(k.startswith("encoder") for k in state), list(state)[:5]
    assert any(k.startswith("deformer") for k in state)
    resumable = list(ckpt.glob("checkpoint*.pt"))
    assert resumable, os.listdir(ckpt)
    full = torch.load(resumable[0], weights_only=True)
    assert {"model", "optimizer", "trainer"} <= set(full)
    assert resumable[0].name == "checkpoint_epoch=2.pt"
    assert full["trainer"]["iteration"] == 2 * full["trainer"]["epoch_length"]
    cal = json.loads((ckpt / "calibration.json").read_text())
    assert cal["image_threshold"] > 0 and cal["pixel_threshold"] > 0
    assert cal["score_method"] == "mean" and cal["n_images"] == 8
    assert list((out / "runs").glob("events.out.tfevents*")), "TensorBoard log missing"


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(trained):
    bundle_run(
        str(trained["work"]),
        ["train.json"],
        dataset_dir=trained["dataset"],
        ckpt_dir=trained["ckpt"],
        output_dir=trained["out"],
        max_epochs=3,
        resume=True,
        perceptual_weight=0.0,
        **TINY,
    )
    files = sorted(trained["ckpt"].glob("checkpoint*.pt"))
    assert [f.name for f in files] == ["checkpoint_epoch=3.pt"]
    full = torch.load(files[-1], weights_only=True)  # plain state only: resume loads it the same way
    assert full["trainer"]["iteration"] == 3 * full["trainer"]["epoch_length"]


@pytest.mark.slow
def test_evaluate_writes_metrics(trained):
    out = trained["work"] / "evaluation"
    bundle_run(
        str(trained["work"]),
        ["train.json", "evaluate.json"],
        dataset_dir=trained["dataset"],
        ckpt_dir=trained["ckpt"],
        output_dir=out,
        **TINY,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "image_auroc",
        "image_ap",
        "image_fpr_at_95tpr",
        "image_fpr_at_99tpr",
        "image_f1_max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_best_dice",
        "pixel_dice_at_threshold",
    ):
        assert key in metrics, key
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["n_images"] == 12


@pytest.mark.slow
def test_inference_on_folder_writes_maps_overlays_and_scores(trained, tmp_path):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    test_items = json.loads(open(os.path.join(trained["dataset"], "datalist.json")).read())["test"][:3]
    for it in test_items:
        src = os.path.join(trained["dataset"], it["image"])
        Image.open(src).save(in_dir / os.path.basename(src))
    (in_dir / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "pred"
    bundle_run(
        str(tmp_path),
        ["inference.json"],
        ckpt_dir=trained["ckpt"],
        input_dir=in_dir,
        output_dir=out,
        spatial_size="[32,32]",
        network_channels="[8,16,32,64,64]",
        num_workers=0,
        progress_bar=False,
    )
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3, rows
    assert all(r["pred_label"] in ("0", "1") for r in rows)
    maps = sorted((out / "maps").glob("*.nii.gz"))
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(maps) == 3 and len(overlays) == 3
    m = np.asarray(nib.load(str(maps[0])).dataobj)
    assert m.shape[:2] == (32, 32) and np.isfinite(m).all() and m.min() >= 0
    assert Image.open(overlays[0]).size[0] > Image.open(overlays[0]).size[1]


@pytest.mark.slow
def test_ablation_config_trains_a_plain_autoencoder(dataset, tmp_path):
    bundle_run(
        str(tmp_path),
        ["train.json", "ablation_ae.json"],
        dataset_dir=dataset,
        ckpt_dir=tmp_path / "m",
        output_dir=tmp_path / "e",
        max_epochs=1,
        perceptual_weight=0.0,
        **TINY,
    )
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert not any(k.startswith("deformer") for k in state)


@pytest.mark.slow
def test_paper_tasks_bootstrap_and_average(trained, tmp_path):
    """The MorphAEus paper protocol: one evaluation per task (datalist section), bootstrap AUROC, their average."""
    from medad_monai.apps.paper_tasks import evaluate_tasks

    with open(os.path.join(trained["dataset"], "datalist.json")) as f:
        datalist = json.load(f)
    normal = [it for it in datalist["test"] if it["label"] == 0]
    abnormal = [it for it in datalist["test"] if it["label"] == 1]
    datalist["test_pneumonia"] = normal + abnormal[::2]
    datalist["test_covid"] = normal + abnormal[1::2]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    out = tmp_path / "tasks"
    summary = evaluate_tasks(
        BUNDLE,
        str(path),
        output_dir=str(out),
        configs="",
        dataset_dir=trained["dataset"],
        ckpt_dir=str(trained["ckpt"]),
        write_results=True,
        **{k: v for k, v in TINY.items() if k != "progress_bar"},
    )
    tasks = summary["tasks"]
    assert sorted(tasks) == ["test_covid", "test_pneumonia"]
    for name, r in tasks.items():
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert r["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-9)  # same scores as the evaluation
        assert r["n_normal"] == len(normal) and r["n_abnormal"] == len(datalist[name]) - len(normal)
        b = r["image_auroc_bootstrap"]
        assert len(b["values"]) == 5 and b["std"] >= 0
    assert summary["average"]["image_auroc"] == pytest.approx(
        (tasks["test_covid"]["image_auroc"] + tasks["test_pneumonia"]["image_auroc"]) / 2
    )
    assert json.loads((out / "tasks.json").read_text())["average"] == summary["average"]
