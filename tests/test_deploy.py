"""The MONAI Deploy app on synthetic DICOM: real app in a subprocess, outputs read back with pydicom.

The bundle-level tests (loading, scores equal to the bundle's own eager inference, the MONOCHROME1 twin) run in any
environment. The app tests need ``monai-deploy-app-sdk`` and ``highdicom`` (the ``[deploy]`` extra, kept in its own
venv; see docs/deploy.md) and are skipped elsewhere with that reason. The DICOM conformance test also needs
``dciodvfy`` (dicom3tools); ``MEDAD_REQUIRE=deploy,dicom3tools`` turns these skips into failures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _component import required, skip_unless_present
from _bundle_cli import tiny
import torch
from monai.bundle import ConfigParser
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medad_monai.evaluation.calibration import Calibration, fit_calibration
from medad_monai.data import anomaly_transforms, load_image
from medad_monai.data.phantoms import synthesize_cxr
from medad_monai.apps.deploy import AnomalyBundle, BundleLoadError, resolve_bundle
from medad_monai.evaluation.model_record import network_record
from medad_monai.networks import AnomalyMapNet, MapNormalizer, fit_map_normalization
from medad_monai.evaluation.scoring import aggregate_score

ROOT = Path(__file__).resolve().parents[1]

try:
    import highdicom  # noqa: F401
    import monai.deploy.operators  # noqa: F401

    DEPLOY_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure means "not the deploy environment"
    DEPLOY_ERROR = f"{type(e).__name__}: {e}"
    if required("deploy"):
        raise RuntimeError(f"MEDAD_REQUIRE=deploy but the [deploy] extra does not import: {DEPLOY_ERROR}") from e

needs_deploy = pytest.mark.skipif(
    DEPLOY_ERROR is not None,
    reason=f"MONAI Deploy app tests need monai-deploy-app-sdk + highdicom (the [deploy] extra, run them in the deploy "
    f"venv: see docs/deploy.md); import failed with {DEPLOY_ERROR}",
)

# tiny architectures: the same overrides the bundle CLI tests use
TINY = {"memmc_mae": tiny("memmc_mae"), "morphaeus": tiny("morphaeus", perceptual_weight=0.0)}
# training-only keys that inference.json does not have
TRAIN_ONLY = {"perceptual_weight"}

DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"

# 12-bit stored values, rescale and a LINEAR window (in rescaled units) that clips both ends
BITS_STORED, SLOPE, INTERCEPT, CENTER, WIDTH = 12, 0.5, -100.0, 900.0, 1200.0
K = 2**BITS_STORED - 1
# MONOCHROME1 twin: stored K - v, so rescaled values become M - y; its window centre M - c + 1 mirrors the
# DICOM LINEAR window exactly (centre - 0.5, width - 1), so LUT output + inversion must give the same image.
M = SLOPE * K + 2 * INTERCEPT
TWIN_CENTER = M - CENTER + 1


# ----------------------------------------------------------------------------------------------------------------
# fixtures: tiny trained bundle, synthetic DICOM study


def _phantom(seed: int, lesion: str | None = None) -> np.ndarray:
    # 64 x 56: not square, so a swapped axis or a map left at the model size would show in the outputs
    return synthesize_cxr(seed, size=64, lesion=lesion).image[:, 4:60]


def make_bundle(name: str, dst: Path) -> Path:
    """Copies a bundle's configs with tiny overrides, trains its network 3 steps, saves weights and calibration."""
    shutil.copytree(ROOT / "bundles" / name / "configs", dst / "configs")
    tiny = TINY[name]
    parser = ConfigParser()
    parser.read_config(str(dst / "configs" / "train.json"))
    parser["bundle_root"] = str(dst)
    for k, v in tiny.items():
        parser[k] = v
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    loss_fn = parser.get_parsed_content("loss")
    x = torch.stack([torch.from_numpy(synthesize_cxr(s, size=64).image) for s in range(8)])[:, None]
    x = torch.nn.functional.interpolate(x, size=tiny["spatial_size"], mode="bilinear", align_corners=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(net(x), x)
        loss.backward()
        opt.step()
    (dst / "models").mkdir()
    torch.save(net.state_dict(), dst / "models" / "model.pt")  # the training network's plain keys

    # inference.json gets the same architecture, then calibration on healthy images through the inference wrapper
    inf_path = dst / "configs" / "inference.json"
    inf = json.loads(inf_path.read_text())
    inf.update({k: v for k, v in tiny.items() if k not in TRAIN_ONLY})
    inf_path.write_text(json.dumps(inf, indent=4) + "\n")
    wrapper = _inference_net(dst)
    wrapper.load_state_dict(torch.load(dst / "models" / "model.pt", weights_only=True))
    assert isinstance(wrapper, AnomalyMapNet)
    wrapper.eval()
    healthy = torch.stack(
        [anomaly_transforms(tiny["spatial_size"])({"image": _phantom(s)[None]})["image"] for s in range(20, 28)]
    )
    with torch.no_grad():
        maps = wrapper.predict(healthy)[1]
    cal = fit_calibration(aggregate_score(maps, "mean"), maps, image_fpr=0.25, pixel_fpr=0.05, score_method="mean")
    cal.model = network_record(wrapper, healthy.shape[1:])  # as the bundle's calibration step records it
    cal.save(dst / "models" / "calibration.json")
    return dst


def _inference_net(bundle: Path) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    return parser.get_parsed_content("network_def")


def write_xray(path: Path, image: np.ndarray, *, modality: str, monochrome1: bool, study: dict, series_uid: str,
               instance: int, extra: dict | None = None) -> Path:
    """A 16-bit (12 stored) CR/DX file with rescale and window; MONOCHROME1 stores the mirrored twin.

    ``extra`` sets further attributes (keyword -> value) before the file is written."""
    y = CENTER - WIDTH / 2 + image.astype(np.float64) * WIDTH * 1.2 - 0.1 * WIDTH  # ~10 % clipped at each end
    stored = np.clip(np.rint((y - INTERCEPT) / SLOPE), 0, K).astype(np.uint16)
    center = CENTER
    if monochrome1:
        stored, center = (K - stored).astype(np.uint16), TWIN_CENTER
    ds = _base(study, series_uid, DX_CLASS if modality == "DX" else CR_CLASS, modality, instance)
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = SLOPE, INTERCEPT, "US"
    ds.WindowCenter, ds.WindowWidth = center, WIDTH
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelData = stored.tobytes()
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def _base(study: dict, series_uid: str, sop_class: str, modality: str, instance: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in study.items():
        setattr(ds, k, v)
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesNumber = instance
    ds.InstanceNumber = instance
    ds.SeriesDescription = f"{modality} test series"
    return ds


def new_study() -> dict:
    """Patient and study attributes of a new synthetic study."""
    return {
        "PatientName": "Phantom^Deploy",
        "PatientID": "PAT-0042",
        "PatientBirthDate": "19700101",
        "PatientSex": "O",
        "StudyInstanceUID": generate_uid(),
        "StudyID": "S42",
        "AccessionNumber": "ACC42",
        "StudyDate": "20250102",
        "StudyTime": "101010",
        "StudyDescription": "Chest radiograph",
        "ReferringPhysicianName": "",
    }


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """One study: DX series (2 MONOCHROME2 images, one with a lesion), CR series (MONOCHROME1 twin of the first),
    CT series (must not be selected)."""
    d = tmp_path_factory.mktemp("dicom_in")
    study = new_study()
    dx, cr = generate_uid(), generate_uid()
    normal, lesion = _phantom(3), _phantom(3, lesion="nodule")
    write_xray(d / "dx_normal.dcm", normal, modality="DX", monochrome1=False, study=study, series_uid=dx, instance=1)
    write_xray(d / "dx_lesion.dcm", lesion, modality="DX", monochrome1=False, study=study, series_uid=dx, instance=2)
    write_xray(d / "cr_normal_m1.dcm", normal, modality="CR", monochrome1=True, study=study, series_uid=cr, instance=1)
    ct = _base(study, generate_uid(), CT_CLASS, "CT", 1)
    ct.Rows = ct.Columns = 16
    ct.SamplesPerPixel, ct.PhotometricInterpretation = 1, "MONOCHROME2"
    ct.BitsAllocated, ct.BitsStored, ct.HighBit, ct.PixelRepresentation = 16, 16, 15, 1
    ct.PixelData = np.zeros((16, 16), np.int16).tobytes()
    ct.save_as(d / "ct.dcm", enforce_file_format=True)
    return d


@pytest.fixture(scope="module", params=["memmc_mae", "morphaeus"])
def bundle(request, tmp_path_factory) -> Path:
    return make_bundle(request.param, tmp_path_factory.mktemp(f"bundle_{request.param}"))


def eager(bundle: Path, image_chw: np.ndarray) -> float:
    """The bundle inference workflow's score, computed here without the deploy package."""
    net = _inference_net(bundle)
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    cal = Calibration.load(bundle / "models" / "calibration.json")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    x = anomaly_transforms(parser["spatial_size"], parser["channels"])({"image": image_chw})["image"][None]
    with torch.no_grad():
        amap = net.predict(x)[1]
    return float(aggregate_score(amap, cal.score_method, cal.percentile)[0])


# ----------------------------------------------------------------------------------------------------------------
# bundle level (any environment)


def test_monochrome1_twin_reads_identically(study_dir):
    m2, meta2 = load_image(study_dir / "dx_normal.dcm")
    m1, meta1 = load_image(study_dir / "cr_normal_m1.dcm")
    assert meta1["inverted"] and not meta2["inverted"]
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    assert (m2 == 0).any() and (m2 == 1).any() and float(((m2 > 0) & (m2 < 1)).mean()) > 0.5, "window clips both ends"


def test_bundle_scores_equal_eager_inference(bundle, study_dir):
    b = AnomalyBundle(bundle)
    assert b.name and b.version == json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    for name in ("dx_normal.dcm", "dx_lesion.dcm", "cr_normal_m1.dcm"):
        r = b.infer_file(study_dir / name)
        img, _ = load_image(study_dir / name)
        assert r.score == pytest.approx(eager(bundle, img), rel=1e-6, abs=1e-9)
        assert r.label == int(r.score > b.calibration.image_threshold)
        assert r.anomaly_map.shape == (1, 32, 32) and r.map_at_source_size().shape == (1, 64, 56)
        assert r.image.shape == (1, 64, 56)


def test_bundle_follows_the_calibrations_map_smoothing(bundle, study_dir, tmp_path):
    """A calibration fitted on smoothed maps (``--map_sigma``) is honoured even if inference.json says 0."""
    smoothed = tmp_path / "smoothed"
    shutil.copytree(bundle, smoothed)
    cal = Calibration.load(bundle / "models" / "calibration.json")
    cal.map_sigma = 1.5
    cal.save(smoothed / "models" / "calibration.json")
    b = AnomalyBundle(smoothed)
    assert b.network.smooth_sigma == 1.5
    img, _ = load_image(study_dir / "dx_lesion.dcm")
    net = _inference_net(smoothed)
    net.load_state_dict(torch.load(smoothed / "models" / "model.pt", weights_only=True))
    net.set_smooth_sigma(1.5)
    parser = ConfigParser()
    parser.read_config(str(smoothed / "configs" / "inference.json"))
    x = anomaly_transforms(parser["spatial_size"], parser["channels"])({"image": img})["image"][None]
    with torch.no_grad():
        expected = float(aggregate_score(net.eval().predict(x)[1], cal.score_method, cal.percentile)[0])
    r = b.infer_file(study_dir / "dx_lesion.dcm")
    assert r.score == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert r.score != pytest.approx(eager(bundle, img), rel=1e-4)  # the unsmoothed score differs


@pytest.mark.parametrize("kind", ["healthy", "healthy_lungs"])
def test_bundle_follows_the_calibrations_healthy_map_normalisation(bundle, study_dir, tmp_path, kind):
    """A calibration fitted on signed-residual maps normalised against healthy ones (the demo's recipe) is served with
    its statistics and recipe, although inference.json asks for the papers' raw maps (one policy:
    :func:`medad_monai.networks.follow_calibration`)."""
    normed = tmp_path / "normalised"
    shutil.copytree(bundle, normed)
    net = _inference_net(normed)
    net.load_state_dict(torch.load(normed / "models" / "model.pt", weights_only=True))
    net.eval().set_smooth_sigma(1.0)
    net.set_map_residual("signed")
    net.normalizer = MapNormalizer(kind)
    parser = ConfigParser()
    parser.read_config(str(normed / "configs" / "inference.json"))
    shape = (parser["channels"], *parser["spatial_size"])
    healthy = torch.rand((6, *shape), generator=torch.Generator().manual_seed(0))
    assert fit_map_normalization(net, [healthy], leave_one_out=False) == 6
    cal = Calibration.load(normed / "models" / "calibration.json")
    cal.map_sigma, cal.map_residual, cal.map_normalization = 1.0, "signed", net.normalizer.state()
    cal.save(normed / "models" / "calibration.json")

    b = AnomalyBundle(normed)
    assert b.network.map_residual == "signed" and b.network.map_normalization == kind
    img, _ = load_image(study_dir / "dx_lesion.dcm")
    x = anomaly_transforms(parser["spatial_size"], parser["channels"])({"image": img})["image"][None]
    with torch.no_grad():
        expected = float(aggregate_score(net.predict(x)[1], cal.score_method, cal.percentile)[0])
    assert b.infer_file(study_dir / "dx_lesion.dcm").score == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_bundle_served_with_the_settings_it_was_trained_with(bundle, study_dir, tmp_path, monkeypatch):
    """A model trained with an override file (as ``demo.json``) is served with it; other settings are refused."""
    trained = tmp_path / "trained_with_overrides"
    shutil.copytree(bundle, trained)
    name = "memmc_mae" if (bundle / "configs" / "ablation_mae.json").exists() else "morphaeus"
    shutil.copy(ROOT / "bundles" / name / "configs" / "inference.json", trained / "configs" / "inference.json")
    settings = {k: v for k, v in TINY[name].items() if k not in TRAIN_ONLY}
    (trained / "configs" / "tiny.json").write_text(json.dumps(settings))
    with pytest.raises(BundleLoadError):  # the shipped settings do not fit the tiny model
        AnomalyBundle(trained)
    expected = AnomalyBundle(bundle).infer_file(study_dir / "dx_lesion.dcm").score
    assert AnomalyBundle(trained, config_files=["configs/tiny.json"]).infer_file(
        study_dir / "dx_lesion.dcm").score == pytest.approx(expected, rel=1e-6)
    monkeypatch.setenv("MEDAD_BUNDLE_CONFIGS", "configs/tiny.json")
    assert AnomalyBundle(trained).infer_file(study_dir / "dx_lesion.dcm").score == pytest.approx(expected, rel=1e-6)
    monkeypatch.delenv("MEDAD_BUNDLE_CONFIGS")
    # the same weights at another input size load (fully convolutional) but do not fit the calibration: refused
    (trained / "configs" / "bigger.json").write_text(json.dumps({**settings, "spatial_size": [64, 64]}))
    with pytest.raises(BundleLoadError, match=r"was fitted for .*32×32.* uses .*64×64|cannot load the weights"):
        AnomalyBundle(trained, config_files=["configs/bigger.json"])
    if name == "morphaeus":
        with pytest.raises(BundleLoadError, match=r"was fitted for MorphAEus on 1×32×32 .* uses MorphAEus on 1×64×64"):
            AnomalyBundle(trained, config_files=["configs/bigger.json"])
    (tmp_path / "evil.json").write_text("{}")
    with pytest.raises(BundleLoadError, match="outside the bundle"):
        AnomalyBundle(trained, config_files=["../evil.json"])


def test_instance_without_file_reads_like_the_file(study_dir):
    from medad_monai.apps.deploy.dicom import instance_to_image

    ds = pydicom.dcmread(study_dir / "cr_normal_m1.dcm")
    ds.filename = None  # e.g. received over the network: goes through a temporary file
    img, meta = instance_to_image(ds)
    assert meta["inverted"]
    np.testing.assert_array_equal(img, load_image(study_dir / "cr_normal_m1.dcm")[0])


def test_resolve_bundle_paths_and_errors(bundle, tmp_path):
    assert resolve_bundle(bundle) == (bundle, bundle / "models" / "model.pt")
    assert resolve_bundle(bundle / "models" / "model.pt")[0] == bundle
    assert resolve_bundle(bundle / "models")[0] == bundle
    holder = tmp_path / "models_of_a_map"
    holder.mkdir()
    (holder / "my_bundle").symlink_to(bundle, target_is_directory=True)
    assert resolve_bundle(holder)[0] == holder / "my_bundle"  # the only bundle in the folder
    (holder / "other").symlink_to(bundle, target_is_directory=True)
    with pytest.raises(BundleLoadError, match="no bundle found"):
        resolve_bundle(holder)  # two bundles: ambiguous
    with pytest.raises(BundleLoadError, match="no bundle found"):
        resolve_bundle(tmp_path)
    with pytest.raises(BundleLoadError, match="does not exist"):
        resolve_bundle(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "models" / "calibration.json").unlink()
    with pytest.raises(BundleLoadError, match="calibration"):
        AnomalyBundle(broken)


# ----------------------------------------------------------------------------------------------------------------
# the real app (deploy environment)


def run_app(study_dir: Path, bundle: Path, out: Path, as_folder: bool, expect_rc: int = 0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs the app in a subprocess and checks its exit status (``env`` is added to the environment)."""
    entry = [str(ROOT / "medad_monai" / "deploy")] if as_folder else ["-m", "medad_monai.apps.deploy"]
    cmd = [sys.executable, *entry, "-i", str(study_dir), "-o", str(out), "-m", str(bundle)]
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=str(out.parent), capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == expect_rc, (
        f"exit status {proc.returncode}, expected {expect_rc}: {' '.join(cmd)}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
        f"STDERR:\n{proc.stderr[-6000:]}"
    )
    return proc


@needs_deploy
def test_app_writes_sc_sr_and_json(bundle, study_dir, tmp_path):
    out = tmp_path / "out"
    run_app(study_dir, bundle, out, as_folder=bundle.name.endswith("morphaeus"))
    report = json.loads((out / "results.json").read_text())
    sources = {p.name: pydicom.dcmread(p) for p in study_dir.glob("*.dcm")}
    by_sop = {ds.SOPInstanceUID: (name, ds) for name, ds in sources.items()}
    results = {by_sop[r["sop_instance_uid"]][0]: r for r in report["results"]}
    assert sorted(results) == ["cr_normal_m1.dcm", "dx_lesion.dcm", "dx_normal.dcm"], "CT must not be selected"
    assert report["n_failed"] == 0 and report["model"]["version"] == "0.1.0"
    cal = Calibration.load(bundle / "models" / "calibration.json")

    for name, r in results.items():
        img, _ = load_image(study_dir / name)
        assert r["score"] == pytest.approx(eager(bundle, img), rel=1e-6, abs=1e-9), name
        assert r["label"] == ("anomalous" if r["score"] > cal.image_threshold else "normal")
        assert r["image_threshold"] == cal.image_threshold and r["pixel_threshold"] == cal.pixel_threshold
    # MONOCHROME1 handled: the inverted twin scores like the original, and not like its uninverted pixels
    twin, orig = results["cr_normal_m1.dcm"]["score"], results["dx_normal.dcm"]["score"]
    assert twin == pytest.approx(orig, rel=1e-5, abs=1e-9)
    img, _ = load_image(study_dir / "dx_normal.dcm")
    assert abs(eager(bundle, 1.0 - img) - orig) > 1e-3 * max(abs(orig), 1e-6)

    scs = [pydicom.dcmread(p) for p in sorted((out / "sc").glob("*.dcm"))]
    srs = [pydicom.dcmread(p) for p in sorted((out / "sr").glob("*.dcm"))]
    assert len(scs) == 3 and len(srs) == 3
    new_uids = set()
    for sc in scs:
        src = by_sop[sc.SourceImageSequence[0].ReferencedSOPInstanceUID][1]
        assert sc.SOPClassUID == SC_CLASS and sc.Modality == "OT"
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert sc.pixel_array.shape == (64, 56, 3) and sc.pixel_array.dtype == np.uint8
        for key in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "StudyID"):
            assert sc[key].value == src[key].value, key
        assert list(sc.PatientOrientation) == ["L", "F"]
        assert sc.SeriesInstanceUID != src.SeriesInstanceUID and sc.SOPInstanceUID != src.SOPInstanceUID
        new_uids |= {sc.SeriesInstanceUID, sc.SOPInstanceUID}
        r = results[by_sop[src.SOPInstanceUID][0]]
        cyan = np.all(sc.pixel_array == [0, 255, 255], axis=-1)
        assert cyan.any() == (r["anomalous_pixel_fraction"] > 0), "contour iff some pixel is above the threshold"
    assert len({sc.SeriesInstanceUID for sc in scs}) == 2, "one SC series per source series"

    for sr in srs:
        assert sr.SOPClassUID == BASIC_TEXT_SR_CLASS and sr.Modality == "SR"
        item = sr.ContentSequence[0]
        src_uid = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        name, src = by_sop[src_uid]
        assert sr.PatientID == src.PatientID and sr.StudyInstanceUID == src.StudyInstanceUID
        assert sr.SeriesInstanceUID not in new_uids and sr.SeriesInstanceUID != src.SeriesInstanceUID
        r = results[name]
        assert f"Anomaly score: {r['score']:.6g}" in item.TextValue
        assert f"Result: {r['label'].upper()}" in item.TextValue
        evidence = {
            s.ReferencedSOPInstanceUID
            for ser in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for s in ser.ReferencedSOPSequence
        }
        assert evidence == {src_uid, r["outputs"]["secondary_capture"]["sop_instance_uid"]}
        assert sr.ContributingEquipmentSequence[0].SoftwareVersions == "0.1.0"
    assert len(list((out / "overlays").glob("*.png"))) == 3


@needs_deploy
def test_uids_from_the_input_cannot_name_files_outside_the_output(bundle, study_dir, tmp_path):
    """A SOP Instance UID is text from the input file; the overlay named after it stays in ``overlays/``."""
    hostile = tmp_path / "hostile_in"
    hostile.mkdir()
    ds = pydicom.dcmread(study_dir / "dx_lesion.dcm")
    ds.SOPInstanceUID = "../../../escaped"  # not a valid UI value; a hostile or broken sender can still send it
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds.save_as(hostile / "hostile.dcm", enforce_file_format=True)
    finally:
        pydicom.config.settings.writing_validation_mode = mode
    out = tmp_path / "a" / "b" / "out"
    out.parent.mkdir(parents=True)
    run_app(hostile, bundle, out, as_folder=False)
    escaped = [p for p in tmp_path.rglob("escaped*") if out not in p.parents]
    assert escaped == [], escaped
    assert [p.name for p in (out / "overlays").glob("*.png")] == ["escaped.png"]


# ----------------------------------------------------------------------------------------------------------------
# conformance of the DICOM outputs: attribute rules (any environment), dciodvfy on the app's files (deploy)


@pytest.mark.parametrize(
    "attrs, expected",
    [
        ({"BodyPartExamined": "CHEST", "Laterality": "L"}, None),  # unpaired: Laterality must be absent
        ({"BodyPartExamined": "CHEST", "ImageLaterality": "R"}, None),
        ({"BodyPartExamined": "chest ", "Laterality": "R"}, None),  # the CS value is trimmed and upper-cased
        ({"BodyPartExamined": "HAND", "ImageLaterality": "R"}, "R"),  # paired: the source's laterality
        ({"BodyPartExamined": "KNEE", "Laterality": "L", "ImageLaterality": "R"}, "L"),  # series value first
        ({"BodyPartExamined": "KNEE", "ImageLaterality": "B"}, ""),  # no series-level "both": unknown
        ({"ImageLaterality": "L"}, "L"),  # body part unknown: written
        ({}, ""),  # body part and laterality unknown: present and empty (Type 2)
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_series_laterality_follows_the_type_2c_condition(attrs, expected):
    from medad_monai.apps.deploy.dicom import series_laterality

    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    assert series_laterality(ds) == expected


def test_only_valid_pixel_spacing_is_copied():
    from medad_monai.apps.deploy.dicom import valid_pixel_spacing

    ds = Dataset()
    ds.PixelSpacing = ["0.143", "0.143"]
    assert valid_pixel_spacing(ds.PixelSpacing) == [0.143, 0.143]
    ds.PixelSpacing = [0, 0]  # what RG1 (pydicom's test chest CR) holds
    assert valid_pixel_spacing(ds.PixelSpacing) is None
    for bad in (None, [0.5, 0.0], [0.5], [-0.5, 0.5], [float("nan"), 0.5], "0.5", ["a", "b"]):
        assert valid_pixel_spacing(bad) is None, bad


#: dciodvfy warnings the app's outputs may keep (docs/deploy.md explains each); an Error line always fails.
DCIODVFY_KNOWN_WARNINGS = {
    "sc": [
        # a source with neither a body part nor a laterality: Laterality (Type 2C) present and empty = unknown
        r"Warning - is only permitted to be empty when actually unknown; .* attribute <Laterality>",
    ],
    "sr": [
        # the model's Device UID in the Contributing Equipment item (IHE AI Results asks for it; Type 3 there in the
        # current standard, unknown to dicom3tools 2022), hence also "Standard Extended SOP Class"
        r"Warning - Attribute is not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID",
        r"Warning - Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard "
        r"Extended SOP Class",
    ],
}

#: source file -> (modality, attributes); chest CR/DX with left and right laterality in both places, plus a paired
#: body part and a source without either.
CONFORMANCE_SOURCES = {
    "cr_chest_l.dcm": ("CR", {"BodyPartExamined": "CHEST", "Laterality": "L", "ViewPosition": "PA",
                              "PixelSpacing": [0, 0]}),
    "cr_chest_r.dcm": ("CR", {"BodyPartExamined": "CHEST", "Laterality": "R", "ViewPosition": "AP",
                              "PixelSpacing": [0.5, 0.5]}),
    "dx_chest_l.dcm": ("DX", {"BodyPartExamined": "CHEST", "ImageLaterality": "L", "ViewPosition": "PA"}),
    "dx_chest_r.dcm": ("DX", {"BodyPartExamined": "CHEST", "ImageLaterality": "R", "ViewPosition": "LL",
                              "PixelSpacing": [0.0, 0.5]}),
    "dx_hand_l.dcm": ("DX", {"BodyPartExamined": "HAND", "ImageLaterality": "L", "ViewPosition": "PA"}),
    "cr_unknown.dcm": ("CR", {}),
}


@pytest.fixture(scope="module")
def conformance_run(bundle, tmp_path_factory) -> tuple[Path, dict[str, Path], dict[str, Path], dict[str, Dataset]]:
    """The app run on :data:`CONFORMANCE_SOURCES`: ``(input, {source: SC file}, {source: SR file}, sources)``."""
    d = tmp_path_factory.mktemp("conformance_in")
    study = new_study()
    for i, (name, (modality, extra)) in enumerate(CONFORMANCE_SOURCES.items()):
        write_xray(d / name, _phantom(30 + i), modality=modality, monochrome1=modality == "CR", study=study,
                   series_uid=generate_uid(), instance=i + 1, extra=extra)
    out = tmp_path_factory.mktemp("conformance_out") / "out"
    run_app(d, bundle, out, as_folder=False)
    sources = {p.name: pydicom.dcmread(p) for p in d.glob("*.dcm")}
    name_of = {ds.SOPInstanceUID: name for name, ds in sources.items()}
    report = json.loads((out / "results.json").read_text())
    assert report["n_failed"] == 0 and report["n_instances"] == len(CONFORMANCE_SOURCES)
    sc = {name_of[r["sop_instance_uid"]]: Path(r["outputs"]["secondary_capture"]["file"]) for r in report["results"]}
    sr = {name_of[r["sop_instance_uid"]]: Path(r["outputs"]["structured_report"]["file"]) for r in report["results"]}
    return d, sc, sr, sources


@needs_deploy
@pytest.mark.parametrize("bundle", ["memmc_mae"], indirect=True)
def test_sc_and_sr_copy_only_what_their_iods_allow(bundle, conformance_run):
    _, scs, srs, sources = conformance_run
    for name, path in scs.items():
        sc, src = pydicom.dcmread(path), sources[name]
        for key in ("ViewPosition", "ImageLaterality"):  # not in the Secondary Capture Image IOD
            assert key not in sc, (name, key)
        body = src.get("BodyPartExamined")
        assert sc.get("BodyPartExamined") == body, name
        if body == "CHEST":
            assert "Laterality" not in sc, f"{name}: CHEST is unpaired, Laterality must be absent"
        elif body == "HAND":
            assert sc.Laterality == "L", name
        else:
            assert "Laterality" in sc and sc.Laterality in ("", None), f"{name}: unknown laterality stays empty"
        if name == "cr_chest_r.dcm":
            assert [float(v) for v in sc.PixelSpacing] == [0.5, 0.5]
        else:
            assert "PixelSpacing" not in sc, f"{name}: zero or missing spacing must not be copied"
        assert list(sc.PatientOrientation) == ["L", "F"]
    for name, path in srs.items():
        sr = pydicom.dcmread(path)
        for key in ("AcquisitionDateTime", "BodyPartExamined", "RequestedProcedureID", "Laterality", "ViewPosition"):
            assert key not in sr, (name, key)  # not in the Basic Text SR IOD
        assert sr.ContributingEquipmentSequence[0].DeviceUID  # the model's identity (IHE AIR)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """``(errors, warnings)``: the lines of ``dciodvfy <path>`` that start with "Error" / "Warning"."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()]
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


@pytest.fixture(scope="module")
def dciodvfy_present() -> None:
    """Skips (fails under ``MEDAD_REQUIRE=dicom3tools``) when ``dciodvfy`` is not on the PATH; before the app runs."""
    if shutil.which("dciodvfy") is None:
        skip_unless_present("dicom3tools", "dciodvfy not found: the DICOM conformance test needs dicom3tools "
                                           "(apt-get install dicom3tools)")


@needs_deploy
@pytest.mark.parametrize("bundle", ["memmc_mae"], indirect=True)
def test_dciodvfy_reports_no_error_on_sc_and_sr(dciodvfy_present, bundle, conformance_run):
    _, scs, srs, _ = conformance_run
    seen: dict[str, set[str]] = {"sc": set(), "sr": set()}
    for kind, files in (("sc", scs), ("sr", srs)):
        for name, path in sorted(files.items()):
            errors, warnings = dciodvfy(path)
            assert errors == [], f"dciodvfy on the {kind.upper()} of {name} ({path}):\n" + "\n".join(errors + warnings)
            unknown = [w for w in warnings if not any(re.match(p, w) for p in DCIODVFY_KNOWN_WARNINGS[kind])]
            assert unknown == [], (
                f"new dciodvfy warnings on the {kind.upper()} of {name}: {unknown}; fix them, or list them with the "
                f"reason in DCIODVFY_KNOWN_WARNINGS and docs/deploy.md"
            )
            seen[kind].update(warnings)
    # the only SC warning is the empty Laterality of the source without body part or laterality
    assert all("Laterality" in w for w in seen["sc"]), seen


# ----------------------------------------------------------------------------------------------------------------
# compressed transfer syntaxes: decoded by what the [deploy] extra installs


def write_cr15(path: Path, image: np.ndarray, study: dict, series_uid: str, instance: int) -> Path:
    """An uncompressed 15-bit MONOCHROME1 CR with a window (like RG1, pydicom's chest test radiograph)."""
    stored = np.clip(np.rint((1.0 - image.astype(np.float64)) * (2**15 - 1)), 0, 2**15 - 1).astype(np.uint16)
    ds = _base(study, series_uid, CR_CLASS, "CR", instance)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 15, 14, 0
    ds.WindowCenter, ds.WindowWidth = 15000, 28000
    ds.BodyPartExamined, ds.PatientOrientation = "CHEST", ["L", "F"]
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _gdcm_jpeg_lossless_sv1(src: Path, dst: Path) -> None:
    """JPEG Lossless process 14 selection value 1 with GDCM (pydicom 3 has no encoder for it)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read(), src
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change(), "GDCM cannot encode JPEG Lossless SV1"
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(dst))
    assert writer.Write(), dst


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One 15-bit MONOCHROME1 CR, uncompressed and in 5 compressed transfer syntaxes: ``(folder, {file: UID})``."""
    from pydicom.pixels import get_decoder, get_encoder
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

    syntaxes = (JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, JPEG2000, RLELossless)
    missing = [ts.name for ts in syntaxes if not get_decoder(ts).is_available]
    if missing:
        skip_unless_present("deploy", f"no pydicom decoder for {missing}: install the [deploy] extra (python-gdcm, "
                                      f"pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls)")
    missing = [ts.name for ts in syntaxes if ts != JPEGLosslessSV1 and not get_encoder(ts).is_available]
    try:
        import gdcm  # noqa: F401
    except ImportError:
        missing.append("JPEG Lossless SV1 (python-gdcm)")
    if missing:
        skip_unless_present("deploy", f"no encoder for {missing}: install the [deploy] extra")

    d = tmp_path_factory.mktemp("codec_in")
    study, series = new_study(), generate_uid()
    ref = write_cr15(d / "uncompressed.dcm", _phantom(7, lesion="nodule"), study, series, 1)
    files = {"uncompressed.dcm": str(pydicom.dcmread(ref).file_meta.TransferSyntaxUID)}
    for i, ts in enumerate(syntaxes, start=2):
        dst = d / f"{ts.keyword}.dcm"
        if ts == JPEGLosslessSV1:
            _gdcm_jpeg_lossless_sv1(ref, dst)
            ds = pydicom.dcmread(dst)
        else:
            ds = pydicom.dcmread(ref)
            ds.compress(ts, **({"j2k_cr": [8]} if ts == JPEG2000 else {}))
            if ts == JPEG2000:
                ds.LossyImageCompression = "01"
        ds.SOPInstanceUID = generate_uid()  # each file is its own instance (outputs are named by SOP Instance UID)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i
        ds.save_as(dst, enforce_file_format=True)
        files[dst.name] = str(ts)
    return d, files


@needs_deploy
def test_jpeg_lossless_sv1_test_file_is_process_14_sv1(codec_dir):
    """The GDCM-encoded file really is what it claims: SOF3 (lossless, Huffman) and predictor 1 in the SOS."""
    d, _ = codec_dir
    ds = pydicom.dcmread(d / "JPEGLosslessSV1.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    assert frame.find(b"\xff\xc3") >= 0, "no SOF3 marker"
    sos = frame.find(b"\xff\xda")
    n_components = frame[sos + 4]
    assert frame[sos + 5 + 2 * n_components] == 1, "predictor (Ss) is not selection value 1"


@needs_deploy
@pytest.mark.parametrize("bundle", ["memmc_mae"], indirect=True)
def test_app_decodes_compressed_radiographs(bundle, codec_dir, tmp_path):
    """JPEG Lossless SV1, JPEG-LS, JPEG 2000 (lossless and lossy) and RLE: scores equal those of the pixels."""
    from pydicom.uid import JPEG2000

    d, files = codec_dir
    out = tmp_path / "out"
    run_app(d, bundle, out, as_folder=False)
    report = json.loads((out / "results.json").read_text())
    assert report["n_failed"] == 0, [r.get("error") for r in report["results"]]
    by_file = {Path(r["source_file"]).name: r for r in report["results"]}
    assert sorted(by_file) == sorted(files)
    ref_img, _ = load_image(d / "uncompressed.dcm")
    ref_score = by_file["uncompressed.dcm"]["score"]
    assert ref_score == pytest.approx(eager(bundle, ref_img), rel=1e-6, abs=1e-9)
    stored = pydicom.dcmread(d / "uncompressed.dcm").pixel_array
    for name, ts in files.items():
        ds = pydicom.dcmread(d / name)
        assert ds.file_meta.TransferSyntaxUID == ts, name
        img, _ = load_image(d / name)
        if ts == JPEG2000:  # lossy: the score of the decoded pixels, which differ from the original
            assert not np.array_equal(ds.pixel_array, stored)
            assert by_file[name]["score"] == pytest.approx(eager(bundle, img), rel=1e-6, abs=1e-9), name
        else:
            np.testing.assert_array_equal(ds.pixel_array, stored, err_msg=name)
            assert by_file[name]["score"] == pytest.approx(ref_score, rel=1e-6, abs=1e-9), name
        assert Path(by_file[name]["outputs"]["secondary_capture"]["file"]).is_file()


# ----------------------------------------------------------------------------------------------------------------
# exit status and input errors (the real app in a subprocess)


def _error_lines(proc: subprocess.CompletedProcess, kind: str = "error") -> list[str]:
    return [x for x in proc.stderr.splitlines() if x.startswith(f"medad_monai.apps.deploy: {kind}:")]


@needs_deploy
@pytest.mark.parametrize("bundle", ["memmc_mae"], indirect=True)
def test_app_exit_status_when_an_instance_fails(bundle, study_dir, tmp_path):
    """A failed instance: exit 3 with results.json complete; MEDAD_ALLOW_FAILED_INSTANCES=1 makes it 0."""
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(study_dir / "dx_normal.dcm", d / "good.dcm")
    ds = pydicom.dcmread(study_dir / "dx_lesion.dcm")
    ds.PixelData = ds.PixelData[:-256]  # pixel data that cannot be decoded, like compressed data without a decoder
    ds.save_as(d / "broken.dcm", enforce_file_format=True)

    proc = run_app(d, bundle, tmp_path / "out", as_folder=False, expect_rc=3)
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (report["n_instances"], report["n_failed"]) == (2, 1)
    failed = [r for r in report["results"] if "error" in r]
    assert Path(failed[0]["source_file"]).name == "broken.dcm" and "pixel data" in failed[0]["error"]
    assert len(list((tmp_path / "out" / "sc").glob("*.dcm"))) == 1, "the good instance is still written"
    lines = _error_lines(proc)
    assert len(lines) == 1 and "1 of 2 instance(s) could not be processed" in lines[0], proc.stderr[-3000:]
    assert "broken.dcm" in lines[0] and "MEDAD_ALLOW_FAILED_INSTANCES=1" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr

    proc = run_app(d, bundle, tmp_path / "out_allowed", as_folder=False, expect_rc=0,
                   env={"MEDAD_ALLOW_FAILED_INSTANCES": "1"})
    assert json.loads((tmp_path / "out_allowed" / "results.json").read_text())["n_failed"] == 1
    assert len(_error_lines(proc, "warning")) == 1 and _error_lines(proc) == []


@needs_deploy
@pytest.mark.parametrize("bundle", ["memmc_mae"], indirect=True)
@pytest.mark.parametrize("case", ["empty", "not_dicom", "other_modalities"])
def test_app_input_errors_are_one_line(bundle, study_dir, case, tmp_path):
    """Nothing to process: exit 2 and one line that says what was found and what the app accepts."""
    from PIL import Image

    d = tmp_path / "in"
    d.mkdir()
    if case == "not_dicom":
        (d / "notes.txt").write_text("not an image\n")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "radiograph.png")
        (d / "sub").mkdir()
        (d / "sub" / "empty.dcm").write_bytes(b"")
    elif case == "other_modalities":
        shutil.copy(study_dir / "ct.dcm", d / "ct.dcm")
        mr = pydicom.dcmread(study_dir / "ct.dcm")
        mr.Modality, mr.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
        mr.file_meta.MediaStorageSOPClassUID = mr.SOPClassUID
        mr.SeriesInstanceUID = mr.SOPInstanceUID = generate_uid()
        mr.file_meta.MediaStorageSOPInstanceUID = mr.SOPInstanceUID
        mr.save_as(d / "mr.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    proc = run_app(d, bundle, out, as_folder=False, expect_rc=2)
    lines = _error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    line = lines[0]
    assert str(d) in line
    if case == "empty":
        assert "is empty" in line
    elif case == "not_dicom":
        assert "no DICOM file" in line and "3 file(s)" in line and "notes.txt" in line
    else:
        assert "found CT (1 series), MR (1 series)" in line and "Modality CR or DX" in line
        report = json.loads((out / "results.json").read_text())
        assert report["n_instances"] == 0 and report["input"]["series_by_modality"] == {"CT": 1, "MR": 1}
        assert not (out / "sc").exists()
