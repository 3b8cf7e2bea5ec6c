"""A real ``monailabel start_server`` on 127.0.0.1 serving tiny copies of both bundles, for the MONAI Label tests.

Tiny bundles: copies of ``bundles/memmc_mae`` and ``bundles/morphaeus`` whose configs get the small sizes below,
seeded random weights (``models/model.pt``) and a calibration fitted with ``fit_calibration`` on healthy phantoms.
References are the bundle's own inference in the test process: ``network_def`` and ``preprocessing`` of
``configs/inference.json`` on the same file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from _bundle_cli import tiny
from monai.bundle import ConfigParser
from PIL import Image
from requests_toolbelt.multipart.decoder import MultipartDecoder

from medad_monai.evaluation.calibration import Calibration, fit_calibration
from medad_monai.data import synthesize_cxr
from medad_monai.evaluation.model_record import network_record
from medad_monai.evaluation.scoring import aggregate_score

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phantom(seed: int, lesion: str | None, shape: tuple[int, int]) -> np.ndarray:
    """uint8 (rows, cols) phantom: a 64x64 radiograph cropped to ``shape``."""
    img, _ = synthesize_cxr(seed, size=64, lesion=lesion).to_uint8()
    return np.ascontiguousarray(img[: shape[0], : shape[1]])


def bundle_parser(bundle_dir: str, config: str = "inference.json") -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", config))
    parser["bundle_root"] = bundle_dir  # what MONAI Label does with our find_bundle_root() default
    return parser


def reference(bundle_dir: str, image_path: str) -> tuple[torch.Tensor, float, Calibration]:
    """The bundle's own inference on one file: ``((1, 1, h, w) map, score, calibration)``."""
    parser = bundle_parser(bundle_dir)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(os.path.join(bundle_dir, "models", "model.pt"), weights_only=True))
    item = parser.get_parsed_content("preprocessing")({"image": image_path})
    cal = Calibration.load(os.path.join(bundle_dir, "models", "calibration.json"))
    net.set_smooth_sigma(cal.map_sigma)  # the thresholds belong to maps smoothed like this
    with torch.no_grad():
        amap = net.eval()(item["image"][None])
    return amap, float(aggregate_score(amap, cal.score_method, cal.percentile)[0]), cal


def calibrate(bundle_dir: str, map_sigma: float = 0.0) -> None:
    parser = bundle_parser(bundle_dir)
    net = parser.get_parsed_content("network_def")
    net.set_smooth_sigma(map_sigma)
    net.load_state_dict(torch.load(os.path.join(bundle_dir, "models", "model.pt"), weights_only=True))
    pre = parser.get_parsed_content("preprocessing")
    images = torch.stack([pre({"image": phantom(500 + i, None, (64, 64))[None] / 255.0})["image"] for i in range(8)])
    with torch.no_grad():
        maps = net.eval()(images.float())
    cal = fit_calibration(
        aggregate_score(maps, "mean"), maps, score_method="mean", extra={"source": "test"}, map_sigma=map_sigma
    )
    cal.model = network_record(net, images.shape[1:])  # as the bundle's calibration step records it
    cal.save(os.path.join(bundle_dir, "models", "calibration.json"))


def make_tiny_bundle(name: str, dst: str) -> None:
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
    train_net = bundle_parser(dst, "train.json").get_parsed_content("network_def")
    torch.save(train_net.state_dict(), os.path.join(dst, "models", "model.pt"))
    # MemMC-MAE's calibration is fitted on smoothed maps (--map_sigma 1) while its inference.json keeps 0: the server
    # must follow the calibration, or its scores differ from reference()'s
    calibrate(dst, map_sigma=1.0 if name == "memmc_mae" else 0.0)


def write_png(path: str, arr: np.ndarray) -> None:
    Image.fromarray(arr, mode="L").save(path)


def start_server(
    app_dir: str,
    studies: str,
    workdir: str,
    models: list[str],
    env_extra: dict | None = None,
    conf: dict[str, str] | None = None,
    ready_status: int = 200,
):
    """Starts ``python -m monailabel.main start_server`` on a free port of 127.0.0.1; ``(process, url, log file)``.

    The server is up once ``GET /info/`` answers ``ready_status`` (401 with authentication on)."""
    port = free_port()
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
    for key, value in (conf or {}).items():
        cmd += ["--conf", key, str(value)]
    log = open(log_path, "w")
    # own session: the server and anything it spawns are stopped together
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == ready_status:
                return proc, url, log_path
        except requests.RequestException:
            pass
        time.sleep(1.0)
    stop(proc)
    with open(log_path) as f:
        tail = f.read()[-6000:]
    pytest.fail(f"monailabel start_server did not answer /info/ within {SERVER_START_TIMEOUT}s:\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def log_tail(log_path: str) -> str:
    with open(log_path) as f:
        return f.read()[-4000:]


def log_has(log_path: str, text: str, timeout: float = 15.0) -> bool:
    """Whether the server log shows ``text`` (uvicorn logs a request's traceback after it has answered)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path) as f:
            if text in f.read():
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def infer(url: str, model: str, image: str, output: str, params: dict | None = None) -> requests.Response:
    r = requests.post(
        f"{url}/infer/{model}",
        params={"image": image, "output": output},
        files={"params": (None, json.dumps(params or {}))},
        timeout=120,
    )
    return r


def multipart(r: requests.Response) -> dict[str, bytes]:
    parts = {}
    for part in MultipartDecoder(r.content, r.headers["content-type"]).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        name = disposition.split('name="', 1)[1].split('"', 1)[0]
        parts[name] = part.content
    return parts


def read_nifti(data: bytes, path: str) -> tuple[np.ndarray, np.dtype]:
    """Heatmap as (rows, cols) and its stored dtype: ITK writes x (columns) as the first NIfTI axis."""
    with open(path, "wb") as f:
        f.write(data)
    img = nib.load(path)
    arr = np.asarray(img.dataobj)
    return np.squeeze(arr).T, img.get_data_dtype()


