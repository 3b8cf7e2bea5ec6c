"""What a calibration was fitted for, through the real bundle CLI, for both bundles (issue 9, items 1-3):

1. a model run at another input size than it was calibrated at is refused, naming both sizes and the fix;
2. a ``calibration.json`` copied next to the other bundle's ``model.pt`` is refused (another network and bundle);
3. without a ``calibration.json``, evaluation and inference still score, say so in the log, write ``pred_label`` -1
   and ``metrics.json`` ``"calibrated": false``.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest

import _bundle_cli
from _bundle_cli import tiny

from medad_monai.data.phantoms import generate_demo_dataset

BUNDLES = ("morphaeus", "memmc_mae")
RUN = {"num_workers": 0, "progress_bar": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("record_data")
    generate_demo_dataset(str(d), n_train=8, n_val=4, n_test_normal=2, n_test_abnormal=2, size=64, seed=9)
    return d


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Both bundles' tiny networks trained 1 epoch (+ calibration) through the CLI: ``{bundle: models folder}``."""
    out = {}
    for bundle in BUNDLES:
        work = tmp_path_factory.mktemp(f"record_{bundle}")
        extra = {"perceptual_weight": 0} if bundle == "morphaeus" else {}
        _bundle_cli.bundle_run(bundle, work, ["train.json"], dataset_dir=data, ckpt_dir=work / "models",
                               output_dir=work / "eval", max_epochs=1, batch_size=4, warmup_epochs=0,
                               **tiny(bundle, **RUN, **extra))
        out[bundle] = work / "models"
    return out


def _inputs(data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted((data / "images").glob("test_*.png"))[:2]:
        shutil.copy(p, folder / p.name)
    return folder


def _refused(bundle, tmp_path, **overrides) -> str:
    with pytest.raises(AssertionError) as e:
        _bundle_cli.bundle_run(bundle, tmp_path, ["inference.json"], **overrides)
    return str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_another_input_size_is_refused(bundle, data, trained, tmp_path):
    out = _refused(bundle, tmp_path, ckpt_dir=trained[bundle], input_dir=_inputs(data, tmp_path),
                   output_dir=tmp_path / "pred", **tiny(bundle, **RUN, spatial_size="[64,64]"))
    # fully convolutional MorphAEus loads the weights, then the record refuses; MemMC-MAE's position embeddings
    # already do not fit, and the loader says so
    if bundle == "morphaeus":
        assert "was fitted for MorphAEus on 1×32×32 inputs" in out and "uses MorphAEus on 1×64×64" in out, out[-2000:]
    else:
        assert "Cannot load the weights" in out and "size mismatch" in out and "other network settings" in out
        assert "torch.Size([1, 16, 32])" in out and "torch.Size([1, 64, 32])" in out, out[-2000:]
    assert not (tmp_path / "pred" / "scores.csv").exists() or len(
        (tmp_path / "pred" / "scores.csv").read_text().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_other_bundles_calibration_is_refused(bundle, data, trained, tmp_path):
    other = next(b for b in BUNDLES if b != bundle)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(trained[bundle] / "model.pt", models / "model.pt")
    shutil.copy(trained[other] / "calibration.json", models / "calibration.json")
    out = _refused(bundle, tmp_path, ckpt_dir=models, input_dir=_inputs(data, tmp_path),
                   output_dir=tmp_path / "pred", **tiny(bundle, **RUN))
    recorded = json.loads((trained[other] / "calibration.json").read_text())["model"]
    assert "was fitted for" in out and recorded["bundle"]["name"] in out, out[-2000:]
    assert not (tmp_path / "pred" / "scores.csv").exists() or len(
        (tmp_path / "pred" / "scores.csv").read_text().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_without_a_calibration_scores_are_written_and_labelled_uncalibrated(bundle, data, trained, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(trained[bundle] / "model.pt", models / "model.pt")
    proc = _bundle_cli.bundle_run(bundle, tmp_path, ["train.json", "evaluate.json"], dataset_dir=data,
                                  ckpt_dir=models, output_dir=tmp_path / "eval", **tiny(bundle, **RUN))
    assert "No calibration.json next to the model" in proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["calibrated"] is False and "image_auroc" in metrics and "image_threshold" not in metrics
    proc = _bundle_cli.bundle_run(bundle, tmp_path, ["inference.json"], ckpt_dir=models,
                                  input_dir=_inputs(data, tmp_path), output_dir=tmp_path / "pred", **tiny(bundle, **RUN))
    assert "No calibration.json next to the model" in proc.stdout + proc.stderr
    with open(tmp_path / "pred" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["pred_label"] for r in rows} == {"-1"} and all(float(r["pred_score"]) >= 0 for r in rows)
