"""One predictor behind every entry point (issue 9, :mod:`medad_monai.evaluation.predictor`).

A MorphAEus trained through the bundle CLI with an override file, as ``configs/demo.json`` is used (tiny network,
the demo's map and score recipe: signed residual, healthy normalisation, max score), gives the same scores and labels
through bundle inference (the CLI in a subprocess), the Deploy app's bundle loader and the TorchScript export, each
given the same override file; without it, each refuses with both values and the fix. The MONAI Label app is compared
with the same predictor in ``tests/test_monailabel.py`` (its own environment).
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch

import _bundle_cli
from _trained_bundle import OVERRIDE, train_with_override
from medad_monai.data.readers import load_image
from medad_monai.apps.deploy import AnomalyBundle, BundleLoadError
from medad_monai.apps.export import export_bundle, load_exported
from medad_monai.networks import AnomalyMapNet, MorphAEus
from medad_monai.evaluation.predictor import AnomalyPredictor, load_weights
from medad_monai.evaluation.model_record import ModelRecordMismatch

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_with_override(tmp_path_factory.mktemp("predictor"))


@pytest.mark.slow
def test_deploy_and_export_give_the_scores_and_labels_of_bundle_inference(trained):
    bundle, folder, cli = trained["bundle"], trained["folder"], trained["cli"]
    deployed = AnomalyBundle(bundle, config_files=[OVERRIDE])
    assert deployed.network.map_residual == "signed" and deployed.network.map_normalization == "healthy_lungs"
    path = export_bundle(str(bundle), config_files=[OVERRIDE], output_dir=str(trained["root"] / "export"))
    exported, cal = load_exported(path)
    assert cal.to_dict() == deployed.calibration.to_dict()
    labels = set()
    for name, (score, label) in cli.items():
        r = deployed.infer_file(folder / name)
        assert r.score == pytest.approx(score, rel=1e-5, abs=1e-7), name
        assert r.label == label, name
        x = torch.as_tensor(deployed.preprocessing({"image": load_image(folder / name)[0]})["image"])[None]
        out = exported.predict(x)
        assert float(out.pred_score[0]) == pytest.approx(score, rel=1e-5, abs=1e-7), name
        assert int(out.pred_label[0]) == label, name
        labels.add(label)
    assert labels <= {0, 1}


@pytest.mark.slow
def test_without_the_override_file_every_entry_point_refuses(trained):
    bundle = trained["bundle"]
    with pytest.raises(BundleLoadError, match="MEDAD_BUNDLE_CONFIGS=configs/<override>.json"):
        AnomalyBundle(bundle)  # the shipped 128x128 7-level network: other weights and size
    with pytest.raises(ValueError, match="cannot load the weights"):
        export_bundle(str(bundle), output_dir=str(trained["root"] / "refused"))
    # the tiny network at the trained size, but the papers' score: the calibration's threshold is for the max
    with pytest.raises(AssertionError, match=r"score_method='max'.*uses score_method='mean'.*--score_method max"):
        _bundle_cli.bundle_run("morphaeus", trained["root"], ["inference.json", "tiny_demo.json"],
                               bundle_dir=bundle, input_dir=trained["folder"], ckpt_dir=bundle / "models",
                               output_dir=trained["root"] / "refused_cli", score_method="mean")


def test_predictor_refuses_another_score_recipe_and_follows_when_serving(tmp_path, caplog):
    torch.manual_seed(0)
    net = AnomalyMapNet(MorphAEus(spatial_size=(32, 32), channels=(8, 16, 32, 64, 64))).eval()
    maps = net.predict(torch.rand(4, 1, 32, 32))[1]
    from medad_monai.evaluation.calibration import fit_calibration
    from medad_monai.evaluation.model_record import network_record
    from medad_monai.evaluation.scoring import aggregate_score

    cal = fit_calibration(aggregate_score(maps, "max"), maps, image_fpr=0.25, pixel_fpr=0.05, score_method="max")
    cal.model = network_record(net, (1, 32, 32))
    with pytest.raises(ModelRecordMismatch, match=r"score_method='max'.*uses score_method='mean'"):
        AnomalyPredictor(net, cal, "mean", input_shape=(1, 32, 32))
    served = AnomalyPredictor(net, cal, "mean", input_shape=(1, 32, 32), follow=True)
    assert served.score_method == "max" and "using the calibration's" in caplog.text
    with pytest.raises(ModelRecordMismatch, match=r"1×32×32.*1×64×64"):
        served.check_input((1, 64, 64))
    out = served.predict(torch.rand(2, 1, 32, 32))[1]
    assert out.pred_label.tolist() == (out.pred_score > cal.image_threshold).long().tolist()
    assert not AnomalyPredictor(net).calibrated and AnomalyPredictor(net).decide(maps).pred_label.tolist() == [-1] * 4
    # the one weight loader: a truncated file and another architecture are named, a planted pickle is not run
    torch.save(net.state_dict(), tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged"):
        load_weights(net, tmp_path / "cut.pt")
    other = AnomalyMapNet(MorphAEus(spatial_size=(32, 32), channels=(8, 16, 32, 64, 128)))
    with pytest.raises(ValueError, match="cannot load the weights .*other size or architecture"):
        load_weights(other, tmp_path / "model.pt")
    torch.save({"x": object()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot read the weights"):
        load_weights(net, tmp_path / "evil.pt")


@pytest.mark.slow
def test_the_calibration_records_its_bundle_and_list_and_refuses_another_bundle(trained, tmp_path):
    import json

    from medad_monai.evaluation.calibration import Calibration
    from medad_monai.evaluation.model_record import fingerprint_of

    bundle = trained["bundle"]
    cal = Calibration.load(bundle / "models" / "calibration.json")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert cal.model["bundle"] == {"name": meta["name"], "version": meta["version"]}
    with open(trained["root"] / "data" / "datalist.json") as f:
        validation = json.load(f)["validation"]
    assert cal.model["calibration_images"]["n_items"] == len(validation) == 6
    paths = [str(trained["root"] / "data" / it["image"]) if not os.path.isabs(it["image"]) else it["image"]
             for it in validation]
    assert cal.model["calibration_images"] == fingerprint_of(paths)
    with open(trained["root"] / "data" / "datalist.json") as f:
        training = json.load(f)["training"]
    assert cal.model["training_images"] == fingerprint_of(str(trained["root"] / "data" / it["image"]) for it in training)
    assert cal.model["training_images"]["n_items"] == 12
    assert set(cal.model["versions"]) == {"medad_monai", "monai", "torch"}
    # the same network and size, but the calibration says it belongs to another bundle: refused by name
    other = tmp_path / "copied"
    shutil.copytree(bundle, other)
    cal.model["bundle"] = {"name": "MemMC-MAE", "version": "0.9.0"}
    cal.save(other / "models" / "calibration.json")
    with pytest.raises(BundleLoadError, match=r"fitted for the bundle 'MemMC-MAE' \(version 0.9.0\).*is the bundle"):
        AnomalyBundle(other, config_files=[OVERRIDE])


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["mean_image", "pca"])
def test_a_baseline_is_a_bundle_model_served_like_the_networks(baseline, tmp_path):
    """``configs/<baseline>.json`` fits the baseline through the bundle CLI (``run fit``) and calibrates it; bundle inference, the
    Deploy loader and the TorchScript export then give it the same scores and labels, as for the networks."""
    from medad_monai.evaluation.calibration import Calibration
    from medad_monai.data.phantoms import generate_demo_dataset

    bundle = tmp_path / "morphaeus"
    shutil.copytree(os.path.join(_bundle_cli.ROOT, "bundles", "morphaeus", "configs"), bundle / "configs")
    (bundle / "configs" / "small.json").write_text('{"spatial_size": [32, 32], "num_workers": 0, "progress_bar": false}')
    data = tmp_path / "data"
    generate_demo_dataset(str(data), n_train=12, n_val=6, n_test_normal=3, n_test_abnormal=3, size=64, seed=6)
    files = ["small.json", f"{baseline}.json"]
    _bundle_cli.bundle_run("morphaeus", tmp_path, ["train.json", *files], run_id="fit", bundle_dir=bundle, dataset_dir=data)
    models = bundle / "models" / baseline
    cal = Calibration.load(models / "calibration.json")
    assert cal.model["network"] == {"mean_image": "MeanImageBaseline", "pca": "PCABaseline"}[baseline]
    assert not (bundle / "models" / "model.pt").exists()  # the bundle's own model is left alone
    pred = tmp_path / "pred"
    images = sorted((data / "images").glob("test_*.png"))[1:5]  # 2 abnormal, 2 normal
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in images:
        shutil.copy(p, inputs / p.name)
    _bundle_cli.bundle_run("morphaeus", tmp_path, ["inference.json", *files], bundle_dir=bundle, input_dir=inputs,
                           output_dir=pred)
    with open(pred / "scores.csv") as f:
        cli = {os.path.basename(r["image"]): (float(r["pred_score"]), int(r["pred_label"])) for r in csv.DictReader(f)}
    deployed = AnomalyBundle(models / "model.pt", config_files=[f"configs/{f}" for f in files])
    exported, _ = load_exported(export_bundle(str(bundle), ckpt_dir=str(models), output_dir=str(tmp_path / "export"),
                                              config_files=[f"configs/{f}" for f in files]))
    for name, (score, label) in cli.items():
        r = deployed.infer_file(inputs / name)
        assert (r.score, r.label) == (pytest.approx(score, rel=1e-5, abs=1e-7), label), name
        x = torch.as_tensor(deployed.preprocessing({"image": load_image(inputs / name)[0]})["image"])[None]
        out = exported.predict(x)
        assert float(out.pred_score[0]) == pytest.approx(score, rel=1e-5, abs=1e-7), name
        assert int(out.pred_label[0]) == label, name


@pytest.mark.slow
def test_run_recalibrate_refits_the_thresholds_then_evaluates(trained, tmp_path):
    """A bundle evaluation asking for another score is refused; ``run recalibrate`` re-fits the calibration with the
    run's settings on the validation list, then evaluates with it."""
    from medad_monai.evaluation.calibration import Calibration

    bundle = tmp_path / "morphaeus"
    shutil.copytree(trained["bundle"], bundle)
    args = dict(bundle_dir=bundle, dataset_dir=trained["root"] / "data", ckpt_dir=bundle / "models", score_method="mean")
    configs = ["train.json", "tiny_demo.json", "evaluate.json"]
    with pytest.raises(AssertionError, match=r"score_method='max'.*run recalibrate"):
        _bundle_cli.bundle_run("morphaeus", tmp_path, configs, output_dir=tmp_path / "refused", **args)
    before = json.loads((bundle / "models" / "calibration.json").read_text())
    _bundle_cli.bundle_run("morphaeus", tmp_path, configs, run_id="recalibrate", output_dir=tmp_path / "eval", **args)
    cal = Calibration.load(bundle / "models" / "calibration.json")
    assert cal.score_method == "mean" and cal.map_normalization  # the rest of the recipe is the override file's
    # re-fitted on the healthy validation list, as the training-time calibration was; never on the test section
    # that evaluate.json points the evaluation at (session 7 found `run recalibrate` calibrating on the test set)
    after = json.loads((bundle / "models" / "calibration.json").read_text())
    n_val = len(json.loads((trained["root"] / "data" / "datalist.json").read_text())["validation"])
    assert after["n_images"] == before["n_images"] == n_val
    assert after["model"]["calibration_images"] == before["model"]["calibration_images"]
    with open(tmp_path / "eval" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["calibrated"] is True and "image_f1_at_threshold" in metrics


def test_calibration_refuses_images_labelled_abnormal(trained, tmp_path):
    """A calibration list holding abnormal images (a validation section that is really a test set) is refused with
    the image named, and the calibration already next to the model is left as it was."""
    bundle = tmp_path / "morphaeus"
    shutil.copytree(trained["bundle"], bundle)
    data = trained["root"] / "data"
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["validation"] = datalist["test"]
    (data / "datalist_test_as_validation.json").write_text(json.dumps(datalist))
    before = (bundle / "models" / "calibration.json").read_bytes()
    with pytest.raises(AssertionError, match=r"labelled abnormal \(first: .*run calibration"):
        _bundle_cli.bundle_run("morphaeus", tmp_path, ["train.json", "tiny_demo.json"], run_id="calibration",
                               bundle_dir=bundle, dataset_dir=data, ckpt_dir=bundle / "models",
                               datalist=str(data / "datalist_test_as_validation.json"), output_dir=tmp_path / "cal")
    assert (bundle / "models" / "calibration.json").read_bytes() == before
