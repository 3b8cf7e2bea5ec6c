"""Integration: the MONAI Label app (:mod:`medad_monai.label`) behind a real ``monailabel start_server``.

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
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from _bundle_cli import tiny

pytest.importorskip(
    "monailabel", reason="monailabel is not installed; these tests run in the label environment (docs/monailabel.md)"
)

import nibabel as nib  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from PIL import Image  # noqa: E402
from requests_toolbelt.multipart.decoder import MultipartDecoder  # noqa: E402

from medad_monai.calibration import Calibration, fit_calibration  # noqa: E402
from medad_monai.data import synthesize_cxr  # noqa: E402
from medad_monai.label import init_app  # noqa: E402
from medad_monai.scoring import aggregate_score  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {b: tiny(b, num_workers=0, batch_size=4, warmup_epochs=0) for b in ("memmc_mae", "morphaeus")}
BUNDLES = [b for b in TINY if os.path.isfile(os.path.join(ROOT, "bundles", b, "configs", "inference.json"))]
# studies: (id, lesion or None, (rows, cols)); the 64x48 image catches a transposed heatmap
STUDIES = [
    ("cxr_healthy_a", None, (64, 64)),
    ("cxr_healthy_b", None, (64, 48)),
    ("cxr_healthy_c", None, (64, 64)),
    ("cxr_healthy_d", None, (64, 64)),
    ("cxr_nodule", "nodule", (64, 64)),
    ("cxr_effusion", "effusion", (64, 56)),
]
SERVER_START_TIMEOUT = 120
UNTRAINED = "untrained_memmc_mae"  # a bundle served before it has weights


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _phantom(seed: int, lesion: str | None, shape: tuple[int, int]) -> np.ndarray:
    """uint8 (rows, cols) phantom: a 64x64 radiograph cropped to ``shape``."""
    img, _ = synthesize_cxr(seed, size=64, lesion=lesion).to_uint8()
    return np.ascontiguousarray(img[: shape[0], : shape[1]])


def _parser(bundle_dir: str, config: str = "inference.json") -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", config))
    parser["bundle_root"] = bundle_dir  # what MONAI Label does with our find_bundle_root() default
    return parser


def _reference(bundle_dir: str, image_path: str) -> tuple[torch.Tensor, float, Calibration]:
    """The bundle's own inference on one file: ``((1, 1, h, w) map, score, calibration)``."""
    parser = _parser(bundle_dir)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(os.path.join(bundle_dir, "models", "model.pt"), weights_only=True))
    item = parser.get_parsed_content("preprocessing")({"image": image_path})
    cal = Calibration.load(os.path.join(bundle_dir, "models", "calibration.json"))
    net.set_smooth_sigma(cal.map_sigma)  # the thresholds belong to maps smoothed like this
    with torch.no_grad():
        amap = net.eval()(item["image"][None])
    return amap, float(aggregate_score(amap, cal.score_method, cal.percentile)[0]), cal


def _calibrate(bundle_dir: str, map_sigma: float = 0.0) -> None:
    parser = _parser(bundle_dir)
    net = parser.get_parsed_content("network_def")
    net.set_smooth_sigma(map_sigma)
    net.load_state_dict(torch.load(os.path.join(bundle_dir, "models", "model.pt"), weights_only=True))
    pre = parser.get_parsed_content("preprocessing")
    images = torch.stack([pre({"image": _phantom(500 + i, None, (64, 64))[None] / 255.0})["image"] for i in range(8)])
    with torch.no_grad():
        maps = net.eval()(images.float())
    cal = fit_calibration(
        aggregate_score(maps, "mean"), maps, score_method="mean", extra={"source": "test"}, map_sigma=map_sigma
    )
    cal.save(os.path.join(bundle_dir, "models", "calibration.json"))


def _make_tiny_bundle(name: str, dst: str) -> None:
    """Copy of the bundle's configs with the tiny sizes, seeded random weights and a calibration."""
    src = os.path.join(ROOT, "bundles", name)
    shutil.copytree(os.path.join(src, "configs"), os.path.join(dst, "configs"))
    for cfg in ("inference.json", "train.json"):
        path = os.path.join(dst, "configs", cfg)
        with open(path) as f:
            config = json.load(f)
        config.update({k: v for k, v in TINY[name].items() if k in config})
        with open(path, "w") as f:
            json.dump(config, f, indent=4)
    os.makedirs(os.path.join(dst, "models"))
    torch.manual_seed(0)
    train_net = _parser(dst, "train.json").get_parsed_content("network_def")
    torch.save(train_net.state_dict(), os.path.join(dst, "models", "model.pt"))
    # MemMC-MAE's calibration is fitted on smoothed maps (--map_sigma 1) while its inference.json keeps 0: the server
    # must follow the calibration, or its scores differ from _reference's
    _calibrate(dst, map_sigma=1.0 if name == "memmc_mae" else 0.0)


def _write_png(path: str, arr: np.ndarray) -> None:
    Image.fromarray(arr, mode="L").save(path)


def _start_server(app_dir: str, studies: str, workdir: str, models: list[str], env_extra: dict | None = None):
    port = _free_port()
    env = dict(os.environ)
    env.update(
        {
            "MONAI_LABEL_SESSION_PATH": os.path.join(workdir, "sessions"),
            "MONAI_LABEL_TRACKING_ENABLED": "false",
            "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(env_extra or {})
    log_path = os.path.join(workdir, f"server_{port}.log")
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", app_dir, "--studies", studies]
    cmd += ["--conf", "models", ",".join(models), "--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path, "w")
    # own session: the server and anything it spawns are stopped together
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return proc, url, log_path
        except requests.RequestException:
            pass
        time.sleep(1.0)
    _stop(proc)
    with open(log_path) as f:
        tail = f.read()[-6000:]
    pytest.fail(f"monailabel start_server did not answer /info/ within {SERVER_START_TIMEOUT}s:\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _log_tail(log_path: str) -> str:
    with open(log_path) as f:
        return f.read()[-4000:]


def _log_has(log_path: str, text: str, timeout: float = 15.0) -> bool:
    """Whether the server log shows ``text`` (uvicorn logs a request's traceback after it has answered)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path) as f:
            if text in f.read():
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("monailabel"))


@pytest.fixture(scope="module")
def app_dir(workdir):
    bundle_src = os.path.join(workdir, "bundles")
    for name in BUNDLES:
        _make_tiny_bundle(name, os.path.join(bundle_src, name))
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
        _write_png(os.path.join(folder, f"{sid}.png"), _phantom(seed, lesion, shape))
    return folder


@pytest.fixture(scope="module")
def server(app_dir, studies, workdir):
    proc, url, log_path = _start_server(app_dir, studies, workdir, BUNDLES + [UNTRAINED])
    try:
        yield url, log_path
    finally:
        _stop(proc)


def _infer(url: str, model: str, image: str, output: str, params: dict | None = None) -> requests.Response:
    r = requests.post(
        f"{url}/infer/{model}",
        params={"image": image, "output": output},
        files={"params": (None, json.dumps(params or {}))},
        timeout=120,
    )
    return r


def _multipart(r: requests.Response) -> dict[str, bytes]:
    parts = {}
    for part in MultipartDecoder(r.content, r.headers["content-type"]).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        name = disposition.split('name="', 1)[1].split('"', 1)[0]
        parts[name] = part.content
    return parts


def _read_nifti(data: bytes, path: str) -> tuple[np.ndarray, np.dtype]:
    """Heatmap as (rows, cols) and its stored dtype: ITK writes x (columns) as the first NIfTI axis."""
    with open(path, "wb") as f:
        f.write(data)
    img = nib.load(path)
    arr = np.asarray(img.dataobj)
    return np.squeeze(arr).T, img.get_data_dtype()


def test_info_lists_both_bundles(server):
    url, log_path = server
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert sorted(info["models"]) == sorted(BUNDLES), _log_tail(log_path)  # not the untrained one
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
        r = _infer(url, model, sid, "json")
        assert r.status_code == 200, f"{r.text}\n{_log_tail(log_path)}"
        res = r.json()
        _, score, cal = _reference(bundle, os.path.join(studies, f"{sid}.png"))
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
        r = _infer(url, model, sid, "all")
        assert r.status_code == 200, f"{r.text}\n{_log_tail(log_path)}"
        parts = _multipart(r)
        params = json.loads(parts["params"])
        heat, dtype = _read_nifti(parts["image"], os.path.join(workdir, f"{model}_{sid}.nii.gz"))
        amap, score, _ = _reference(bundle, os.path.join(studies, f"{sid}.png"))
        expected = F.interpolate(amap, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        assert dtype == np.float32 and heat.shape == shape
        np.testing.assert_allclose(heat, expected, rtol=1e-5, atol=1e-6)
        assert params["anomaly_score"] == pytest.approx(score, rel=1e-5, abs=1e-8)
        assert params["image_size"] == list(shape) and params["heatmap"] == "raw"


def test_infer_png_display_and_mask_heatmaps(server, app_dir, studies):
    url, log_path = server
    model, (sid, _, shape) = BUNDLES[0], STUDIES[4]
    amap, _, cal = _reference(os.path.join(app_dir, "model", model), os.path.join(studies, f"{sid}.png"))
    full = F.interpolate(amap, size=shape, mode="bilinear", align_corners=False)[0, 0]
    for mode, expected in (
        ("display", torch.round(cal.normalize_map(full) * 255).to(torch.uint8).numpy()),
        ("mask", (full > cal.pixel_threshold).to(torch.uint8).numpy()),
    ):
        r = _infer(url, model, sid, "image", {"heatmap": mode, "result_extension": ".png"})
        assert r.status_code == 200, f"{r.text}\n{_log_tail(log_path)}"
        got = np.asarray(Image.open(io.BytesIO(r.content)))
        assert got.dtype == np.uint8 and got.shape == shape
        # float32 rounding at .5 boundaries may move a pixel by one grey level / flip a pixel at the threshold
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
        assert (got != expected).mean() < 0.01
    assert expected.max() == 1 or expected.sum() == 0
    # a raw (float) heatmap into PNG is refused, not truncated; MONAI Label answers 500 and logs the reason
    r = _infer(url, model, sid, "json", {"result_extension": ".png"})
    assert r.status_code == 500 and _log_has(log_path, ".png holds integers only")


def test_train_through_monailabel_excludes_labelled_and_recalibrates(server, app_dir, studies, workdir):
    url, log_path = server
    model = BUNDLES[0]
    bundle = os.path.join(app_dir, "model", model)
    # the two lesion images get a final label (an annotated anomaly): unsupervised training must leave them out
    for sid, lesion, shape in STUDIES:
        if lesion is None:
            continue
        label = os.path.join(workdir, f"{sid}_label.png")
        _write_png(label, (synthesize_cxr(0, size=64, lesion=lesion).mask[: shape[0], : shape[1]] * 1).astype(np.uint8))
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
    assert r.status_code == 200, f"{r.text}\n{_log_tail(log_path)}"
    after = {f: os.stat(os.path.join(bundle, "models", f)).st_mtime_ns for f in before}
    assert all(after[f] > before[f] for f in before), (before, after, _log_tail(log_path))
    cal = Calibration.load(os.path.join(bundle, "models", "calibration.json"))
    n_healthy = sum(1 for _, lesion, _ in STUDIES if lesion is None)
    assert cal.n_images == n_healthy // 2  # val_split 0.5 of the healthy images only
    # the server serves the new weights and calibration without a restart
    sid = STUDIES[0][0]
    res = _infer(url, model, sid, "json").json()
    _, score, cal = _reference(bundle, os.path.join(studies, f"{sid}.png"))
    assert res["anomaly_score"] == pytest.approx(score, rel=1e-5, abs=1e-8)
    assert res["image_threshold"] == pytest.approx(cal.image_threshold)


def test_untrained_bundle_is_served_once_trained(server, app_dir, studies):
    url, log_path = server
    bundle = os.path.join(app_dir, "model", UNTRAINED)
    r = _infer(url, UNTRAINED, STUDIES[0][0], "json")
    assert r.status_code == 500 and _log_has(log_path, f"{UNTRAINED} has no trained weights")
    params = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "bundle_overrides": {"batch_size": 2}}
    r = requests.post(f"{url}/train/{UNTRAINED}", params={"run_sync": "true"}, json=params, timeout=300)
    assert r.status_code == 200, f"{r.text}\n{_log_tail(log_path)}"
    assert UNTRAINED in requests.get(f"{url}/info/", timeout=30).json()["models"]
    r = _infer(url, UNTRAINED, STUDIES[0][0], "json")
    assert r.status_code == 200, f"{r.text}\n{_log_tail(log_path)}"
    _, score, cal = _reference(bundle, os.path.join(studies, f"{STUDIES[0][0]}.png"))
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
        pytest.skip(
            "Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc orthanc-dicomweb); "
            f"found Orthanc={ORTHANC}, plugin={DICOMWEB_PLUGINS}"
        )
    port = _free_port()
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
                pytest.skip(f"Orthanc did not start on 127.0.0.1:{port}: {f.read()[-2000:]}")
        yield url, root
    finally:
        _stop(proc)


def test_dicomweb_studies_from_orthanc(orthanc, app_dir, workdir):
    url, root = orthanc
    # 12-bit DX: a MONOCHROME2 image and a MONOCHROME1 one (inverted by our reader), one of them non-square
    files = {}
    for seed, (photometric, shape) in enumerate((("MONOCHROME2", (64, 48)), ("MONOCHROME1", (64, 64)))):
        stored = _phantom(40 + seed, None, shape).astype(np.float64) * 4000.0 / 255.0
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
    proc, ml_url, log_path = _start_server(app_dir, f"{url}/dicom-web", workdir, BUNDLES, env)
    try:
        info = requests.get(f"{ml_url}/info/", timeout=30).json()
        assert info["datastore"]["total"] == len(files), info["datastore"]
        for series, (path, shape) in files.items():
            for model in BUNDLES:
                r = _infer(ml_url, model, series, "all")
                assert r.status_code == 200, f"{r.text}\n{_log_tail(log_path)}"
                parts = _multipart(r)
                params = json.loads(parts["params"])
                amap, score, _ = _reference(os.path.join(app_dir, "model", model), path)
                assert params["anomaly_score"] == pytest.approx(score, rel=1e-5, abs=1e-8)
                heat, _ = _read_nifti(parts["image"], os.path.join(workdir, f"dw_{model}_{series}.nii.gz"))
                expected = F.interpolate(amap, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
                np.testing.assert_allclose(heat, expected, rtol=1e-5, atol=1e-6)
    finally:
        _stop(proc)
