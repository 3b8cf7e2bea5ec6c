"""Integration: the MONAI Label app (:mod:`medad_monai.apps.label`) behind a real ``monailabel start_server``.

Runs only where ``monailabel`` imports (the separate label environment of ``docs/monailabel.md``); the core
environment skips the whole file. Every check talks HTTP to a server on 127.0.0.1 and compares its answers with the
bundle's own inference in this process: the bundle's ``network_def`` (``AnomalyMapNet``) and ``preprocessing`` from
``configs/inference.json`` on the same file. Heatmaps are compared after resizing the reference map to the input's
size with bilinear interpolation (``align_corners=False``), the resize the app documents.

Tiny bundles: copies of ``bundles/memmc_mae`` and ``bundles/morphaeus`` whose configs get the small sizes below,
seeded random weights (``models/model.pt``) and a calibration fitted with ``fit_calibration`` on healthy phantoms.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
from _component import import_or_skip, skip_unless_present

import_or_skip(
    "monailabel", "label", "monailabel is not installed; these tests run in the label environment (docs/monailabel.md)"
)

import requests  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _label_server import (  # noqa: E402
    BUNDLES,
    STUDIES,
    free_port,
    infer,
    log_tail,
    make_tiny_bundle,
    multipart,
    phantom,
    read_nifti,
    reference,
    start_server,
    stop,
    write_png,
)
from PIL import Image  # noqa: E402

from medad_monai.evaluation.calibration import Calibration  # noqa: E402
from medad_monai.data import synthesize_cxr  # noqa: E402
from medad_monai.apps.label import init_app  # noqa: E402

UNTRAINED = "untrained_memmc_mae"  # a bundle served before it has weights
# the served models may be replaced by training through the server; 2 healthy validation images are enough here
TRAIN_CONF = {"profile": "train", "publish_trained_model": "true", "min_calibration_images": "2"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("monailabel"))


@pytest.fixture(scope="module")
def app_dir(workdir):
    bundle_src = os.path.join(workdir, "bundles")
    for name in BUNDLES:
        make_tiny_bundle(name, os.path.join(bundle_src, name))
    untrained = os.path.join(bundle_src, UNTRAINED)
    shutil.copytree(os.path.join(bundle_src, "memmc_mae", "configs"), os.path.join(untrained, "configs"))
    app = os.path.join(workdir, "app")
    made = init_app(app, [os.path.join(bundle_src, n) for n in BUNDLES] + [untrained])
    assert sorted(made) == sorted(BUNDLES + [UNTRAINED]) and os.path.isfile(os.path.join(app, "main.py"))
    assert os.path.realpath(made["memmc_mae"]) == os.path.realpath(os.path.join(bundle_src, "memmc_mae"))
    return app


@pytest.fixture(scope="module")
def studies(workdir):
    folder = os.path.join(workdir, "studies")
    os.makedirs(folder)
    for seed, (sid, lesion, shape) in enumerate(STUDIES):
        write_png(os.path.join(folder, f"{sid}.png"), phantom(seed, lesion, shape))
    return folder


@pytest.fixture(scope="module")
def server(app_dir, studies, workdir):
    proc, url, log_path = start_server(app_dir, studies, workdir, BUNDLES + [UNTRAINED], conf=TRAIN_CONF)
    try:
        yield url, log_path
    finally:
        stop(proc)


def test_info_lists_both_bundles(server):
    url, log_path = server
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert sorted(info["models"]) == sorted(BUNDLES), log_tail(log_path)  # not the untrained one
    assert sorted(info["trainers"]) == sorted(BUNDLES + [UNTRAINED])
    for name in BUNDLES:
        m = info["models"][name]
        assert m["dimension"] == 2 and m["labels"] == {"anomaly": 1}
        assert m["config"]["heatmap"] == ["raw", "display", "mask"]
    assert info["datastore"]["total"] == len(STUDIES)


@pytest.mark.parametrize("model", BUNDLES)
def test_infer_json_score_and_label_match_bundle(server, app_dir, studies, model):
    url, log_path = server
    bundle = os.path.join(app_dir, "model", model)
    for sid, _, _ in STUDIES:
        r = infer(url, model, sid, "json")
        assert r.status_code == 200, f"{r.text}\n{log_tail(log_path)}"
        res = r.json()
        _, score, cal = reference(bundle, os.path.join(studies, f"{sid}.png"))
        assert res["anomaly_score"] == pytest.approx(score, rel=1e-5, abs=1e-8)
        assert res["anomaly_label"] == int(score > cal.image_threshold)
        assert res["anomaly_class"] == ("anomalous" if score > cal.image_threshold else "normal")
        assert res["normalized_score"] == pytest.approx(cal.normalize_score(score), abs=1e-6)
        assert res["image_threshold"] == pytest.approx(cal.image_threshold)
        assert res["pixel_threshold"] == pytest.approx(cal.pixel_threshold)
        assert res["score_method"] == cal.score_method and res["map_size"] == [32, 32]


@pytest.mark.parametrize("model", BUNDLES)
def test_infer_all_returns_raw_heatmap_at_input_size(server, app_dir, studies, workdir, model):
    url, log_path = server
    bundle = os.path.join(app_dir, "model", model)
    for sid, _, shape in (STUDIES[1], STUDIES[5]):  # the two non-square images
        r = infer(url, model, sid, "all")
        assert r.status_code == 200, f"{r.text}\n{log_tail(log_path)}"
        parts = multipart(r)
        params = json.loads(parts["params"])
        heat, dtype = read_nifti(parts["image"], os.path.join(workdir, f"{model}_{sid}.nii.gz"))
        amap, score, _ = reference(bundle, os.path.join(studies, f"{sid}.png"))
        expected = F.interpolate(amap, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        assert dtype == np.float32 and heat.shape == shape
        np.testing.assert_allclose(heat, expected, rtol=1e-5, atol=1e-6)
        assert params["anomaly_score"] == pytest.approx(score, rel=1e-5, abs=1e-8)
        assert params["image_size"] == list(shape) and params["heatmap"] == "raw"


def test_infer_png_display_and_mask_heatmaps(server, app_dir, studies):
    url, log_path = server
    model, (sid, _, shape) = BUNDLES[0], STUDIES[4]
    amap, _, cal = reference(os.path.join(app_dir, "model", model), os.path.join(studies, f"{sid}.png"))
    full = F.interpolate(amap, size=shape, mode="bilinear", align_corners=False)[0, 0]
    for mode, expected in (
        ("display", torch.round(cal.normalize_map(full) * 255).to(torch.uint8).numpy()),
        ("mask", (full > cal.pixel_threshold).to(torch.uint8).numpy()),
    ):
        r = infer(url, model, sid, "image", {"heatmap": mode, "result_extension": ".png"})
        assert r.status_code == 200, f"{r.text}\n{log_tail(log_path)}"
        got = np.asarray(Image.open(io.BytesIO(r.content)))
        assert got.dtype == np.uint8 and got.shape == shape
        # float32 rounding at .5 boundaries may move a pixel by one grey level / flip a pixel at the threshold
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
        assert (got != expected).mean() < 0.01
    assert expected.max() == 1 or expected.sum() == 0
    # a raw (float) heatmap into PNG is refused, not truncated: a client error with the reason
    r = infer(url, model, sid, "json", {"result_extension": ".png"})
    assert r.status_code == 400 and ".png holds integers only" in r.json()["detail"]


def test_a_calibration_for_another_input_size_is_refused(server, app_dir):
    url, log_path = server
    path = os.path.join(app_dir, "model", "morphaeus", "models", "calibration.json")
    with open(path) as f:
        original = f.read()
    cal = json.loads(original)
    assert cal["model"]["input_shape"] == [1, 32, 32]
    cal["model"]["input_shape"] = [1, 64, 64]  # a calibration fitted at another size, copied in
    try:
        with open(path, "w") as f:
            json.dump(cal, f)
        r = infer(url, "morphaeus", STUDIES[0][0], "json")
        assert r.status_code == 409, f"{r.text}\n{log_tail(log_path)}"
        detail = r.json()["detail"]
        assert "was fitted for MorphAEus on 1×64×64" in detail and "uses MorphAEus on 1×32×32" in detail
        assert app_dir not in detail  # no server path in the answer
    finally:
        with open(path, "w") as f:
            f.write(original)
        os.utime(path, (os.path.getatime(path), os.path.getmtime(path) + 2))  # the server re-reads it
    assert infer(url, "morphaeus", STUDIES[0][0], "json").status_code == 200


def test_train_through_monailabel_excludes_labelled_and_recalibrates(server, app_dir, studies, workdir):
    url, log_path = server
    model = BUNDLES[0]
    bundle = os.path.join(app_dir, "model", model)
    # the two lesion images get a final label (an annotated anomaly): unsupervised training must leave them out
    for sid, lesion, shape in STUDIES:
        if lesion is None:
            continue
        label = os.path.join(workdir, f"{sid}_label.png")
        write_png(label, (synthesize_cxr(0, size=64, lesion=lesion).mask[: shape[0], : shape[1]] * 1).astype(np.uint8))
        with open(label, "rb") as f:
            r = requests.put(
                f"{url}/datastore/label",
                params={"image": sid, "tag": "final"},
                files={"label": (os.path.basename(label), f, "image/png")},
                timeout=30,
            )
        assert r.status_code == 200, r.text
    before = {f: os.stat(os.path.join(bundle, "models", f)).st_mtime_ns for f in ("model.pt", "calibration.json")}
    params = {
        "max_epochs": 1,
        "val_split": 0.5,
        "device": "cpu",
        "multi_gpu": False,
        "bundle_overrides": {"batch_size": 2, "num_workers": 0, "cache_rate": 0.0},
    }
    r = requests.post(f"{url}/train/{model}", params={"run_sync": "true"}, json=params, timeout=300)
    assert r.status_code == 200, f"{r.text}\n{log_tail(log_path)}"
    after = {f: os.stat(os.path.join(bundle, "models", f)).st_mtime_ns for f in before}
    assert all(after[f] > before[f] for f in before), (before, after, log_tail(log_path))
    cal = Calibration.load(os.path.join(bundle, "models", "calibration.json"))
    n_healthy = sum(1 for _, lesion, _ in STUDIES if lesion is None)
    assert cal.n_images == n_healthy // 2  # val_split 0.5 of the healthy images only
    # the server serves the new weights and calibration without a restart
    sid = STUDIES[0][0]
    res = infer(url, model, sid, "json").json()
    _, score, cal = reference(bundle, os.path.join(studies, f"{sid}.png"))
    assert res["anomaly_score"] == pytest.approx(score, rel=1e-5, abs=1e-8)
    assert res["image_threshold"] == pytest.approx(cal.image_threshold)


def test_untrained_bundle_is_served_once_trained(server, app_dir, studies):
    url, log_path = server
    bundle = os.path.join(app_dir, "model", UNTRAINED)
    r = infer(url, UNTRAINED, STUDIES[0][0], "json")
    assert r.status_code == 409 and f"{UNTRAINED} has no trained weights" in r.json()["detail"]
    params = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "bundle_overrides": {"batch_size": 2}}
    r = requests.post(f"{url}/train/{UNTRAINED}", params={"run_sync": "true"}, json=params, timeout=300)
    assert r.status_code == 200, f"{r.text}\n{log_tail(log_path)}"
    assert UNTRAINED in requests.get(f"{url}/info/", timeout=30).json()["models"]
    r = infer(url, UNTRAINED, STUDIES[0][0], "json")
    assert r.status_code == 200, f"{r.text}\n{log_tail(log_path)}"
    _, score, cal = reference(bundle, os.path.join(studies, f"{STUDIES[0][0]}.png"))
    assert r.json()["anomaly_score"] == pytest.approx(score, rel=1e-5, abs=1e-8)
    assert r.json()["anomaly_label"] == int(score > cal.image_threshold)


# ---------------------------------------------------------------------------------------------------------------------
# DICOMweb: a real Orthanc (Debian packages `orthanc` and `orthanc-dicomweb`) as the studies source

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGINS = [p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",) if os.path.isfile(p)]


def _write_dx(path: str, pixels: np.ndarray, photometric: str) -> None:
    """A single-frame 12-bit DX image with a VOI window, as a detector would store it."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "DX", "MEDAD-TEST", "Phantom^Test"
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20240101", "120000", 1, 1
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 3000
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    if int(pydicom.__version__.split(".")[0]) < 3:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    else:
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def orthanc(workdir):
    if not ORTHANC or not DICOMWEB_PLUGINS:
        skip_unless_present(
            "orthanc",
            "Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc orthanc-dicomweb); "
            f"found Orthanc={ORTHANC}, plugin={DICOMWEB_PLUGINS}",
        )
    port = free_port()
    root = os.path.join(workdir, "orthanc")
    os.makedirs(os.path.join(root, "db"))
    config = {
        "Name": "medad-monailabel-test",
        "StorageDirectory": os.path.join(root, "db"),
        "IndexDirectory": os.path.join(root, "db"),
        "HttpPort": port,
        # Orthanc 1.10 has no bind-address option: it listens on every interface and refuses non-loopback clients
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": DICOMWEB_PLUGINS,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    cfg = os.path.join(root, "orthanc.json")
    with open(cfg, "w") as f:
        json.dump(config, f)
    log = open(os.path.join(root, "orthanc.log"), "w")
    proc = subprocess.Popen([ORTHANC, cfg], cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"{url}/dicom-web/studies", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        else:
            with open(os.path.join(root, "orthanc.log")) as f:
                pytest.fail(f"Orthanc did not start on 127.0.0.1:{port}: {f.read()[-2000:]}")
        yield url, root
    finally:
        stop(proc)


def test_dicomweb_studies_from_orthanc(orthanc, app_dir, workdir):
    url, root = orthanc
    # 12-bit DX: a MONOCHROME2 image and a MONOCHROME1 one (inverted by our reader), one of them non-square
    files = {}
    for seed, (photometric, shape) in enumerate((("MONOCHROME2", (64, 48)), ("MONOCHROME1", (64, 64)))):
        stored = phantom(40 + seed, None, shape).astype(np.float64) * 4000.0 / 255.0
        stored = 4000.0 - stored if photometric == "MONOCHROME1" else stored
        path = os.path.join(root, f"dx_{seed}.dcm")
        _write_dx(path, np.round(stored), photometric)
        with open(path, "rb") as f:
            r = requests.post(f"{url}/instances", data=f.read(), timeout=30)
        assert r.status_code == 200, r.text
        import pydicom

        files[str(pydicom.dcmread(path).SeriesInstanceUID)] = (path, shape)
    env = {
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "DX"}),
        "MONAI_LABEL_DATASTORE_CACHE_PATH": os.path.join(workdir, "dicomweb_cache"),
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": os.path.join(workdir, "dicomweb_cache"),
    }
    proc, ml_url, log_path = start_server(app_dir, f"{url}/dicom-web", workdir, BUNDLES, env)
    try:
        info = requests.get(f"{ml_url}/info/", timeout=30).json()
        assert info["datastore"]["total"] == len(files), info["datastore"]
        for series, (path, shape) in files.items():
            for model in BUNDLES:
                r = infer(ml_url, model, series, "all")
                assert r.status_code == 200, f"{r.text}\n{log_tail(log_path)}"
                parts = multipart(r)
                params = json.loads(parts["params"])
                amap, score, _ = reference(os.path.join(app_dir, "model", model), path)
                assert params["anomaly_score"] == pytest.approx(score, rel=1e-5, abs=1e-8)
                heat, _ = read_nifti(parts["image"], os.path.join(workdir, f"dw_{model}_{series}.nii.gz"))
                expected = F.interpolate(amap, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
                np.testing.assert_allclose(heat, expected, rtol=1e-5, atol=1e-6)
    finally:
        stop(proc)


def test_label_task_serves_a_model_trained_with_an_override_file_as_bundle_inference(tmp_path):
    """The Label task is the package's one predictor too: given the override file the model was trained with
    (``--conf bundle_configs``), its scores and labels equal the bundle CLI's inference; without it, the shipped
    network does not take the weights and the request fails with the reason."""
    from _trained_bundle import OVERRIDE, train_with_override
    from monailabel.interfaces.exception import MONAILabelException

    from medad_monai.apps.label.infer import AnomalyBundleInferTask

    trained = train_with_override(tmp_path)
    task = AnomalyBundleInferTask(str(trained["bundle"]), {"bundle_configs": OVERRIDE}, name="morphaeus")
    for name, (score, label) in trained["cli"].items():
        res = task({"image": str(trained["folder"] / name), "device": "cpu"})[1]
        assert res["anomaly_score"] == pytest.approx(score, rel=1e-5, abs=1e-7), name
        assert res["anomaly_label"] == label and res["score_method"] == "max", name
    shipped = AnomalyBundleInferTask(str(trained["bundle"]), {}, name="morphaeus")
    with pytest.raises(MONAILabelException, match="cannot load the weights"):
        shipped({"image": str(trained["folder"] / name), "device": "cpu"})


def test_label_training_trains_the_network_it_serves_with_an_override_file(tmp_path):
    """A server given ``--conf bundle_configs`` trains what it serves: the train task merges the same override files
    over ``train.json`` as the infer task over ``inference.json``, so the published model loads into the served
    network and the served thresholds are the new calibration's. (Before, training read ``train.json`` alone: the
    paper-size network, whose weights the served demo-size network could not take.)"""
    from _trained_bundle import OVERRIDE, train_with_override
    from monailabel.datastore.local import LocalDatastore

    from medad_monai.apps.label.infer import AnomalyBundleInferTask
    from medad_monai.apps.label.train import UnsupervisedBundleTrainTask

    trained = train_with_override(tmp_path)
    bundle = trained["bundle"]
    with open(tmp_path / "data" / "datalist.json") as f:
        healthy = json.load(f)["training"][:8]
    studies = tmp_path / "label_studies"
    studies.mkdir()
    for it in healthy:
        shutil.copy(tmp_path / "data" / it["image"], studies)
    datastore = LocalDatastore(str(studies), extensions=["*.png"])
    conf = {"bundle_configs": OVERRIDE, "publish_trained_model": "true", "min_calibration_images": "2"}
    task = UnsupervisedBundleTrainTask(str(bundle), conf)
    request = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False,
               "bundle_overrides": {"batch_size": 2, "num_workers": 0, "cache_rate": 0.0}}
    result = task(request, datastore)
    assert result["published"] and result["calibration_images"] == 4, result
    served = AnomalyBundleInferTask(str(bundle), {"bundle_configs": OVERRIDE}, name="morphaeus")
    res = served({"image": str(next(iter(trained["folder"].iterdir()))), "device": "cpu"})[1]
    cal = Calibration.load(bundle / "models" / "calibration.json")
    assert cal.n_images == 4 and res["image_threshold"] == pytest.approx(cal.image_threshold)
    assert np.isfinite(res["anomaly_score"])
