"""Security of the MONAI Label app against a real ``monailabel start_server`` on 127.0.0.1 (issue 13).

Each request a security review sent to the server is sent again and must be refused, with nothing run, written, read
or removed outside the studies folder:

- code in a training request (``$`` expressions in ``bundle_overrides`` and top-level values, config references,
  paths in ``model_filename``, unknown keys), with ``run_sync`` true and false;
- datastore writes named by absolute paths or ``..``, non-image, empty and oversized uploads, overwriting, deleting
  outside the studies folder, label tags with ``..``;
- inference on files outside the datastore (absolute paths, ``..``, ``/etc/passwd``);
- client mistakes (unknown model or image, malformed or unknown parameters) answered with 4xx, and no server path in
  ``/info/``.

Two servers: the default profile (``inference``: read-only, no trainers) and ``--conf profile train`` without
``publish_trained_model`` (a training run is kept as a candidate; the served model stays).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import threading
import time

import pytest
from _component import import_or_skip

import_or_skip(
    "monailabel", "label", "monailabel is not installed; these tests run in the label environment (docs/monailabel.md)"
)

import requests  # noqa: E402
from _label_server import (  # noqa: E402
    BUNDLES,
    STUDIES,
    infer,
    log_tail,
    make_tiny_bundle,
    phantom,
    reference,
    start_server,
    stop,
    write_png,
)
from PIL import Image  # noqa: E402

from medad_monai.apps.label import init_app  # noqa: E402

MODEL = "memmc_mae"


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tree(folder: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = _sha(p)
    return out


def _png_bytes(seed: int = 7) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(phantom(seed, None, (64, 64)), mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Bundles, app, studies and an ``outside`` folder (a secret image, a victim file) next to them."""
    work = str(tmp_path_factory.mktemp("label_security"))
    bundles = os.path.join(work, "bundles")
    for name in BUNDLES:
        make_tiny_bundle(name, os.path.join(bundles, name))
    app = os.path.join(work, "app")
    init_app(app, [os.path.join(bundles, n) for n in BUNDLES])
    studies = os.path.join(work, "studies")
    os.makedirs(studies)
    for seed, (sid, lesion, shape) in enumerate(STUDIES):
        write_png(os.path.join(studies, f"{sid}.png"), phantom(seed, lesion, shape))
    outside = os.path.join(work, "outside")
    os.makedirs(outside)
    write_png(os.path.join(outside, "secret.png"), phantom(99, "nodule", (64, 64)))
    write_png(os.path.join(outside, "victim.png"), phantom(98, None, (64, 64)))
    return {"work": work, "app": app, "studies": studies, "outside": outside, "bundles": bundles}


@pytest.fixture(scope="module")
def default_server(env):
    proc, url, log_path = start_server(env["app"], env["studies"], env["work"], BUNDLES)
    try:
        yield url, log_path
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def train_server(env):
    conf = {"profile": "train", "min_calibration_images": "2", "max_upload_mb": "1"}
    proc, url, log_path = start_server(env["app"], env["studies"], env["work"], BUNDLES, conf=conf)
    try:
        yield url, log_path
    finally:
        stop(proc)


def _assert_refused(r: requests.Response, status: int, text: str, log_path: str) -> None:
    assert r.status_code == status, f"{r.status_code} {r.text}\n{log_tail(log_path)}"
    detail = r.json()["detail"]
    assert text in detail, detail


def _put_image(url: str, image: str | None, name: str, data: bytes) -> requests.Response:
    params = {"image": image} if image is not None else {}
    return requests.put(f"{url}/datastore/image", params=params, files={"file": (name, data)}, timeout=30)


# ---------------------------------------------------------------------------------------------------------------------
# default profile: inference only


def test_default_profile_is_read_only_without_trainers(default_server, env):
    url, log_path = default_server
    watched = ("studies", "outside", "bundles")
    before = {k: _tree(env[k]) for k in watched}
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert info["profile"] == "inference" and info["trainers"] == {}
    _assert_refused(_put_image(url, "new_image", "new.png", _png_bytes()), 403, "read-only", log_path)
    r = requests.delete(f"{url}/datastore/image", params={"id": "cxr_healthy_a"}, timeout=30)
    _assert_refused(r, 403, "read-only", log_path)
    r = requests.put(
        f"{url}/datastore/label",
        params={"image": "cxr_healthy_a", "tag": "final"},
        files={"label": ("l.png", _png_bytes())},
        timeout=30,
    )
    _assert_refused(r, 403, "read-only", log_path)
    marker = os.path.join(env["work"], "pwned_default")
    payload = {"max_epochs": 1, "bundle_overrides": {"batch_size": f"$open({marker!r}, 'w').write('x') and 4"}}
    r = requests.post(f"{url}/train/{MODEL}", params={"run_sync": "true"}, json=payload, timeout=60)
    _assert_refused(r, 403, "--conf profile train", log_path)
    assert not os.path.exists(marker)
    assert {k: _tree(env[k]) for k in watched} == before


def test_answers_show_no_server_paths(default_server, env):
    url, _ = default_server
    info = requests.get(f"{url}/info/", timeout=30)
    sample = requests.post(f"{url}/activelearning/random", json={}, timeout=30)
    image_info = requests.get(f"{url}/datastore/image/info", params={"image": "cxr_healthy_a"}, timeout=30)
    for r in (info, sample, image_info):
        assert r.status_code == 200, r.text
        for path in (env["work"], os.path.realpath(env["work"])):
            assert path not in r.text
    assert sorted(info.json()["bundles"]) == sorted(BUNDLES) and sample.json()["id"]


def test_weights_and_logs_cannot_be_changed_or_read_anonymously(default_server, env):
    url, log_path = default_server
    weights = os.path.join(env["app"], "model", MODEL, "models", "model.pt")
    digest = _sha(weights)
    r = requests.put(f"{url}/model/{MODEL}", files={"file": ("model.pt", b"not weights")}, timeout=30)
    _assert_refused(r, 403, "turned off", log_path)
    _assert_refused(requests.delete(f"{url}/model/{MODEL}", timeout=30), 403, "turned off", log_path)
    _assert_refused(requests.get(f"{url}/model/{MODEL}", timeout=30), 403, "turned off", log_path)
    _assert_refused(requests.get(f"{url}/logs/", timeout=30), 403, "turned off", log_path)
    assert _sha(weights) == digest
    assert infer(url, MODEL, "cxr_healthy_a", "json").status_code == 200


@pytest.mark.parametrize(
    "image",
    ["ABS_SECRET", "../outside/secret.png", "../../outside/secret", "../../../../../../etc/passwd", "/etc/passwd"],
)
def test_infer_refuses_files_outside_the_datastore(default_server, env, image):
    url, log_path = default_server
    image = os.path.join(env["outside"], "secret.png") if image == "ABS_SECRET" else image
    r = infer(url, MODEL, image, "json")
    _assert_refused(r, 404, "", log_path)
    assert env["work"] not in r.text
    # the same path smuggled in through the params JSON
    r = requests.post(
        f"{url}/infer/{MODEL}",
        params={"image": "cxr_healthy_a", "output": "json"},
        files={"params": (None, json.dumps({"image": image}))},
        timeout=60,
    )
    _assert_refused(r, 404, "", log_path)
    with open(log_path) as f:
        assert "Cannot read image" not in f.read()  # the reader never opened it


def test_client_mistakes_are_4xx(default_server, env):
    url, log_path = default_server
    _assert_refused(infer(url, "no_such_model", "cxr_healthy_a", "json"), 404, "unknown model", log_path)
    _assert_refused(infer(url, MODEL, "no_such_image", "json"), 404, "not in the datastore", log_path)
    _assert_refused(infer(url, MODEL, "cxr_healthy_a", "json", {"heatmap": "nope"}), 400, "heatmap", log_path)
    _assert_refused(infer(url, MODEL, "cxr_healthy_a", "json", {"colour": "red"}), 400, "unknown inference", log_path)
    _assert_refused(
        infer(url, MODEL, "cxr_healthy_a", "json", {"result_extension": "/../../x"}), 400, "result_extension", log_path
    )
    _assert_refused(
        infer(url, MODEL, "cxr_healthy_a", "json", {"heatmap": "$__import__('os').getcwd()"}), 400, "expression",
        log_path,
    )
    r = requests.post(
        f"{url}/infer/{MODEL}",
        params={"image": "cxr_healthy_a", "output": "json"},
        files={"params": (None, "{not json")},
        timeout=60,
    )
    _assert_refused(r, 400, "not valid JSON", log_path)
    # the normal request still works
    assert infer(url, MODEL, "cxr_healthy_a", "json").status_code == 200


def test_infer_on_an_uploaded_image(default_server, env):
    url, log_path = default_server
    path = os.path.join(env["work"], "upload.png")
    with open(path, "wb") as f:
        f.write(_png_bytes(11))
    with open(path, "rb") as f:
        r = requests.post(
            f"{url}/infer/{MODEL}", params={"output": "json"}, files={"file": ("upload.png", f)}, timeout=60
        )
    assert r.status_code == 200, f"{r.text}\n{log_tail(log_path)}"
    _, score, _ = reference(os.path.join(env["app"], "model", MODEL), path)
    assert r.json()["anomaly_score"] == pytest.approx(score, rel=1e-5, abs=1e-8)
    # an upload that is no image is the client's fault
    r = requests.post(
        f"{url}/infer/{MODEL}", params={"output": "json"}, files={"file": ("x.png", b"not an image")}, timeout=60
    )
    _assert_refused(r, 422, "could not be read", log_path)


# ---------------------------------------------------------------------------------------------------------------------
# train profile


@pytest.mark.parametrize("run_sync", ["true", "false"])
def test_training_requests_carry_no_code(train_server, env, run_sync):
    url, log_path = train_server
    marker = os.path.join(env["work"], f"pwned_{run_sync}")
    code = f"$open({marker!r}, 'w').write('x') and 4"
    bad = [
        ({"bundle_overrides": {"batch_size": code}}, "expression"),
        ({"max_epochs": code}, "expression"),
        ({"device": code}, "expression"),
        ({"val_split": "@validate#dataset"}, "expression"),
        ({"bundle_overrides": {"ckpt_dir": "/tmp/elsewhere"}}, "may not be changed"),
        ({"bundle_overrides": {"network_def#_target_": "os.system"}}, "expression"),
        ({"bundle_overrides": {"batch_size": 0}}, "batch_size"),
        ({"bundle_overrides": "batch_size=4"}, "JSON object"),
        ({"run_id": "initialize"}, "run_id"),
        ({"model_filename": "../../../outside/x.pt"}, "model_filename"),
        ({"tracking": "mlflow", "tracking_uri": "/tmp/mlruns"}, "tracking"),
        ({"dataset": {"image": "/etc/passwd"}}, "unknown training parameter"),
        ({"multi_gpu": True}, "multi_gpu"),
        ({"bundle_path": env["outside"]}, "set by the server"),  # MONAI Label puts it on a queued run's PYTHONPATH
    ]
    before = _tree(env["bundles"])
    for body, text in bad:
        r = requests.post(
            f"{url}/train/{MODEL}", params={"run_sync": run_sync}, json={"max_epochs": 1, **body}, timeout=60
        )
        _assert_refused(r, 400, text, log_path)
    r = requests.post(f"{url}/train/no_such_model", params={"run_sync": run_sync}, json={}, timeout=60)
    _assert_refused(r, 404, "unknown model", log_path)
    assert not os.path.exists(marker)
    assert _tree(env["bundles"]) == before  # no run started, nothing written


def test_training_needs_enough_calibration_images(train_server, env):
    url, log_path = train_server
    # 4 healthy images, val_split 0.25: one validation image, the server asks for 2
    body = {"max_epochs": 1, "val_split": 0.25, "device": "cpu", "bundle_overrides": {"batch_size": 2}}
    r = requests.post(f"{url}/train/{MODEL}", params={"run_sync": "true"}, json=body, timeout=60)
    _assert_refused(r, 400, "min_calibration_images", log_path)


def test_training_keeps_a_candidate_and_the_served_model(train_server, env):
    url, log_path = train_server
    # the lesion images get a final label, so training sees the 4 healthy images only
    for sid, lesion, _ in STUDIES:
        if lesion:
            r = requests.put(
                f"{url}/datastore/label",
                params={"image": sid, "tag": "final"},
                files={"label": (f"{sid}.png", _png_bytes(3))},
                timeout=30,
            )
            assert r.status_code == 200, r.text
    models = os.path.join(env["app"], "model", MODEL, "models")
    served = {n: _sha(os.path.join(models, n)) for n in ("model.pt", "calibration.json")}
    body = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "bundle_overrides": {"batch_size": 2, "num_workers": 0}}
    r = requests.post(f"{url}/train/{MODEL}", params={"run_sync": "true"}, json=body, timeout=300)
    assert r.status_code == 200, f"{r.text}\n{log_tail(log_path)}"
    res = r.json()
    assert res["published"] is False and res["calibration_images"] == 2
    assert res["candidate"].startswith("models/candidates/")
    candidate = os.path.join(env["app"], "model", MODEL, res["candidate"])
    assert os.path.isfile(os.path.join(candidate, "model.pt")) and os.path.isfile(os.path.join(candidate, "calibration.json"))
    assert {n: _sha(os.path.join(models, n)) for n in served} == served
    text = requests.get(f"{url}/info/", timeout=30).text
    assert env["work"] not in text and os.path.realpath(env["work"]) not in text


def test_uploads_stay_inside_the_studies_folder(train_server, env):
    url, log_path = train_server
    studies, outside = env["studies"], env["outside"]
    png = _png_bytes()
    # ids that are paths
    target = os.path.join(outside, "evil")
    _assert_refused(_put_image(url, target, "payload.py", b"print('x')"), 400, "not allowed", log_path)
    _assert_refused(_put_image(url, target, "payload.png", png), 400, "not allowed", log_path)
    _assert_refused(_put_image(url, "../../escape2", "x.png", png), 400, "not allowed", log_path)
    # without an id MONAI Label takes the upload's base name: "../x.png" lands as studies/x.png
    r = _put_image(url, None, "../x.png", png)
    assert r.status_code == 200 and r.json()["image"] == "x", r.text
    assert os.path.isfile(os.path.join(studies, "x.png")) and not os.path.exists(os.path.join(env["work"], "x.png"))
    assert requests.delete(f"{url}/datastore/image", params={"id": "x"}, timeout=30).status_code == 200
    assert sorted(os.listdir(outside)) == ["secret.png", "victim.png"]
    assert not any(n.startswith("escape2") for n in os.listdir(os.path.dirname(env["work"])))
    # what is uploaded must be a sane image
    _assert_refused(_put_image(url, "ok_name", "payload.py", b"print('x')"), 415, "images only", log_path)
    _assert_refused(_put_image(url, "ok_name", "empty.png", b""), 413, "bytes", log_path)
    _assert_refused(_put_image(url, "ok_name", "big.png", b"\0" * (2 * 2**20)), 413, "max_upload_mb", log_path)
    _assert_refused(_put_image(url, "ok_name", "text.png", b"hello, not a picture"), 422, "not a readable", log_path)
    # no overwriting
    existing = os.path.join(studies, "cxr_healthy_a.png")
    digest = _sha(existing)
    _assert_refused(_put_image(url, "cxr_healthy_a", "a.png", png), 409, "exists", log_path)
    assert _sha(existing) == digest
    # deletes name datastore ids only
    victim = os.path.join(outside, "victim")
    for id_ in (victim, "../outside/victim", "no_such_image"):
        r = requests.delete(f"{url}/datastore/image", params={"id": id_}, timeout=30)
        _assert_refused(r, 404, "", log_path)
    assert os.path.isfile(victim + ".png")
    r = requests.put(
        f"{url}/datastore/label",
        params={"image": "cxr_healthy_b", "tag": "../../../outside"},
        files={"label": ("l.png", png)},
        timeout=30,
    )
    _assert_refused(r, 400, "label tag", log_path)
    assert sorted(os.listdir(outside)) == ["secret.png", "victim.png"]
    # the normal use still works: a checked upload lands in the studies folder and can be removed again
    r = _put_image(url, "new_healthy_01", "new.png", png)
    assert r.status_code == 200, r.text
    assert os.path.isfile(os.path.join(studies, "new_healthy_01.png"))
    r = requests.delete(f"{url}/datastore/image", params={"id": "new_healthy_01"}, timeout=30)
    assert r.status_code == 200, r.text
    assert not os.path.exists(os.path.join(studies, "new_healthy_01.png"))


# ---------------------------------------------------------------------------------------------------------------------
# MONAI Label's own authentication (Keycloak-style bearer tokens) in front of the app


class _RealmHandler(http.server.BaseHTTPRequestHandler):
    """The one realm endpoint MONAI Label reads: ``GET <realm uri>`` -> ``{"public_key": <base64 DER>}``."""

    public_key = ""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"realm": "medad-test", "public_key": self.public_key}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def auth_server(env):
    jwt = pytest.importorskip("jwt")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    handler = type("Realm", (_RealmHandler,), {"public_key": base64.b64encode(der).decode()})
    realm = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=realm.serve_forever, daemon=True)
    thread.start()
    realm_uri = f"http://127.0.0.1:{realm.server_address[1]}/realms/medad-test"

    def token(*roles: str, expires_in: float = 600) -> dict[str, str]:
        claims = {"preferred_username": "tester", "realm_access": {"roles": list(roles)}, "exp": time.time() + expires_in}
        return {"Authorization": f"Bearer {jwt.encode(claims, key, algorithm='RS256')}"}

    env_extra = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm_uri}
    conf = {"profile": "train", "min_calibration_images": "2"}
    proc, url, log_path = start_server(
        env["app"], env["studies"], env["work"], BUNDLES, env_extra=env_extra, conf=conf, ready_status=401
    )
    try:
        yield url, log_path, token
    finally:
        stop(proc)
        realm.shutdown()


def test_authentication_gates_every_action(auth_server, env):
    url, log_path, token = auth_server
    user, annotator, admin = token("monailabel-user"), token("monailabel-annotator"), token("monailabel-admin")
    # anonymous and expired tokens get nothing
    assert requests.get(f"{url}/info/", timeout=30).status_code == 401
    assert infer(url, MODEL, "cxr_healthy_a", "json").status_code == 401
    assert requests.get(f"{url}/info/", headers=token("monailabel-user", expires_in=-60), timeout=30).status_code == 401
    # a user infers, but neither trains, uploads, deletes nor downloads weights
    r = requests.post(
        f"{url}/infer/{MODEL}", params={"image": "cxr_healthy_a", "output": "json"}, headers=user, timeout=60
    )
    assert r.status_code == 200, f"{r.text}\n{log_tail(log_path)}"
    body = {"max_epochs": 1, "val_split": 0.5, "bundle_overrides": {"batch_size": 2}}
    assert requests.post(f"{url}/train/{MODEL}", json=body, headers=user, timeout=60).status_code == 403
    r = requests.put(
        f"{url}/datastore/image", params={"image": "by_user"}, files={"file": ("u.png", _png_bytes())}, headers=user
    )
    assert r.status_code == 403
    r = requests.delete(f"{url}/datastore/image", params={"id": "cxr_healthy_a"}, headers=annotator, timeout=30)
    assert r.status_code == 403 and os.path.isfile(os.path.join(env["studies"], "cxr_healthy_a.png"))
    assert requests.get(f"{url}/model/{MODEL}", headers=user, timeout=30).status_code == 403
    # an admin still cannot send code: authentication does not replace the request checks
    marker = os.path.join(env["work"], "pwned_admin")
    bad = {"max_epochs": 1, "bundle_overrides": {"batch_size": f"$open({marker!r}, 'w').write('x') and 4"}}
    r = requests.post(f"{url}/train/{MODEL}", params={"run_sync": "true"}, json=bad, headers=admin, timeout=60)
    _assert_refused(r, 400, "expression", log_path)
    assert not os.path.exists(marker)
    # an admin may download the weights (MONAI Label's admin role), never replace them
    assert requests.get(f"{url}/model/{MODEL}", headers=admin, timeout=30).status_code == 200
    both = token("monailabel-admin", "monailabel-annotator")  # MONAI Label asks the annotator role for uploads
    r = requests.put(f"{url}/model/{MODEL}", files={"file": ("model.pt", b"x")}, headers=both, timeout=30)
    _assert_refused(r, 403, "turned off", log_path)
