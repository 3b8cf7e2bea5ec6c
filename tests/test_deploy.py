"""The MONAI Deploy app on synthetic DICOM: real app in a subprocess, outputs read back with pydicom.

The bundle-level tests (loading, scores equal to the bundle's own eager inference, the MONOCHROME1 twin) run in any
environment. The app tests need ``monai-deploy-app-sdk`` and ``highdicom`` (the ``[deploy]`` extra, kept in its own
venv; see docs/deploy.md) and are skipped elsewhere with that reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _component import required
from _bundle_cli import tiny
import torch
from monai.bundle import ConfigParser
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medad_monai.calibration import Calibration, fit_calibration
from medad_monai.data import anomaly_transforms, load_image
from medad_monai.data.phantoms import synthesize_cxr
from medad_monai.deploy import AnomalyBundle, BundleLoadError, resolve_bundle
from medad_monai.networks import AnomalyMapNet
from medad_monai.scoring import aggregate_score

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
    cal.save(dst / "models" / "calibration.json")
    return dst


def _inference_net(bundle: Path) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    return parser.get_parsed_content("network_def")


def write_xray(path: Path, image: np.ndarray, *, modality: str, monochrome1: bool, study: dict, series_uid: str,
               instance: int) -> Path:
    """A 16-bit (12 stored) CR/DX file with rescale and window; MONOCHROME1 stores the mirrored twin."""
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


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """One study: DX series (2 MONOCHROME2 images, one with a lesion), CR series (MONOCHROME1 twin of the first),
    CT series (must not be selected)."""
    d = tmp_path_factory.mktemp("dicom_in")
    study = {
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


def test_instance_without_file_reads_like_the_file(study_dir):
    from medad_monai.deploy.dicom import instance_to_image

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


def run_app(study_dir: Path, bundle: Path, out: Path, as_folder: bool) -> subprocess.CompletedProcess:
    entry = [str(ROOT / "medad_monai" / "deploy")] if as_folder else ["-m", "medad_monai.deploy"]
    cmd = [sys.executable, *entry, "-i", str(study_dir), "-o", str(out), "-m", str(bundle)]
    proc = subprocess.run(cmd, cwd=str(out.parent), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
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
