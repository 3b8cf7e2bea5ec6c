"""The request checks of the MONAI Label app (:mod:`medad_monai.apps.label.security`), without a server.

The same checks run inside the real server in ``tests/test_monailabel_security.py`` (label environment); here each
rule is pinned down case by case in the core environment.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import pytest

from medad_monai.apps.label.security import (
    DEFAULT_MIN_CALIBRATION_IMAGES,
    TRAIN_OVERRIDES,
    ClientError,
    check_infer_request,
    check_lookup_id,
    check_new_id,
    check_result_extension,
    check_train_request,
    check_upload_name,
    is_config_syntax,
    is_fresh_upload,
    is_inside,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _settings(bundle: str) -> dict:
    with open(os.path.join(ROOT, "bundles", bundle, "configs", "train.json")) as f:
        return json.load(f)


def _refused(status: int, text: str, fn, *args, **kwargs) -> ClientError:
    with pytest.raises(ClientError) as e:
        fn(*args, **kwargs)
    assert e.value.status_code == status and text in e.value.detail, e.value.detail
    return e.value


@pytest.mark.parametrize(
    "value", ["$__import__('os').system('id')", "@network_def", "%configs/x.json#net", "a#b", "x@y", "$1"]
)
def test_config_syntax_is_recognised(value):
    assert is_config_syntax(value)


@pytest.mark.parametrize("value", ["cpu", "cuda:0", "model.pt", "/abs/path/x.png", "mean", ""])
def test_plain_text_is_not_config_syntax(value):
    assert not is_config_syntax(value)


def test_train_request_accepts_a_normal_request_and_types_it():
    checked = check_train_request(
        {
            "model": "memmc_mae",
            "bundle_path": "/srv/app/model/memmc_mae",
            "max_epochs": "3",
            "val_split": 0.25,
            "device": ["cpu"],
            "pretrained": "false",
            "tracking": ["None", "mlflow"],
            "gpus": "all",
            "bundle_overrides": {"batch_size": 8, "warmup_epochs": "0", "score_method": "max", "map_sigma": 1},
        },
        _settings("memmc_mae"),
        bundle_path="/srv/app/model/memmc_mae",
    )
    assert checked["max_epochs"] == 3 and checked["val_split"] == 0.25 and checked["device"] == "cpu"
    assert checked["pretrained"] is False and checked["model_filename"] == "model.pt"
    assert checked["overrides"] == {"batch_size": 8, "warmup_epochs": 0, "score_method": "max", "map_sigma": 1.0}
    assert type(checked["overrides"]["batch_size"]) is int


def test_train_request_falls_back_to_cpu_without_cuda():
    assert check_train_request({"device": "cuda"}, _settings("morphaeus"))["device"] == "cpu"
    assert check_train_request({"device": "cuda:1"}, _settings("morphaeus"), cuda_available=True)["device"] == "cuda:1"


@pytest.mark.parametrize(
    "request_, text",
    [
        ({"bundle_overrides": {"batch_size": "$__import__('os').popen('id').read() and 4"}}, "expression"),
        ({"max_epochs": "$1"}, "expression"),
        ({"device": "$torch.device('cpu')"}, "expression"),
        ({"bundle_overrides": {"batch_size": "@batch_size"}}, "expression"),
        ({"bundle_overrides": {"network_def#_target_": "x"}}, "expression"),
        ({"bundle_overrides": {"ckpt_dir": "/tmp"}}, "may not be changed"),
        ({"bundle_overrides": {"vgg_weights": "/etc/passwd"}}, "may not be changed"),
        ({"bundle_overrides": {"base_learning_rate": 1e-4}}, "has no setting"),  # MorphAEus has learning_rate only
        ({"bundle_overrides": {"batch_size": 2.5}}, "whole number"),
        ({"bundle_overrides": {"batch_size": True}}, "number"),
        ({"bundle_overrides": {"learning_rate": 0}}, "> 0"),
        ({"bundle_overrides": {"cache_rate": float("nan")}}, "finite"),
        ({"bundle_overrides": {"score_method": "median"}}, "one of"),
        ({"bundle_overrides": ["batch_size", 4]}, "JSON object"),
        ({"max_epochs": 0}, ">= 1"),
        ({"val_split": 0}, "> 0"),
        ({"val_split": -1}, "> 0"),
        ({"device": "tpu"}, "device"),
        ({"pretrained": "maybe"}, "true or false"),
        ({"multi_gpu": True}, "torchrun"),
        ({"gpus": "0;rm -rf /"}, "gpus"),
        ({"tracking": "mlflow"}, "tracking"),
        ({"run_id": "initialize"}, "run_id"),
        ({"model_filename": "../../x.pt"}, "model_filename"),
        ({"model_filename": "checkpoint_epoch=3.pt"}, "model_filename"),
        ({"model_filename": "other.pt"}, "not in the bundle"),
        ({"dataset": {}}, "unknown training parameter"),
    ],
)
def test_train_request_refusals(request_, text):
    _refused(400, text, check_train_request, {"model": "morphaeus", **request_}, _settings("morphaeus"))


def test_train_request_bundle_path_only_from_the_server(tmp_path):
    settings = _settings("morphaeus")
    assert check_train_request({"bundle_path": str(tmp_path)}, settings, bundle_path=str(tmp_path))["max_epochs"] == 50
    _refused(400, "set by the server", check_train_request, {"bundle_path": "/tmp/evil"}, settings, bundle_path=str(tmp_path))
    _refused(400, "set by the server", check_train_request, {"bundle_path": str(tmp_path)}, settings)


def test_train_request_takes_an_existing_model_file():
    checked = check_train_request({"model_filename": ["best.pt"]}, _settings("morphaeus"), model_files=["best.pt"])
    assert checked["model_filename"] == "best.pt"


def test_every_allowed_override_exists_in_a_bundle():
    settings = {**_settings("morphaeus"), **_settings("memmc_mae")}
    assert sorted(k for k in TRAIN_OVERRIDES if k not in settings) == []
    assert DEFAULT_MIN_CALIBRATION_IMAGES == 20  # documented in docs/monailabel.md


@pytest.mark.parametrize("value", ["cxr_0001", "a.b-c_d", "A" * 128, "1"])
def test_new_ids(value):
    assert check_new_id(value) == value


@pytest.mark.parametrize(
    "value", ["/etc/passwd", "../escape", "a/b", "a\\b", ".hidden", "a..b", "", "A" * 129, None, 3, "name with space"]
)
def test_new_id_refusals(value):
    _refused(400, "not allowed", check_new_id, value)


def test_lookup_ids():
    assert check_lookup_id("patient 01 (AP)") == "patient 01 (AP)"
    for value in ("/etc/passwd", "../../x", ".x", "a/b", "a\0b"):
        _refused(404, "not an id", check_lookup_id, value)
    _refused(400, "datastore id", check_lookup_id, "")


def test_upload_names():
    assert check_upload_name("/tmp/tmpab12cd34.nii.gz") == ".nii.gz"
    assert check_upload_name("x.DCM") == ".dcm"
    for name in ("payload.py", "x.png.py", "x", "x.gz", "x.nrrd"):
        _refused(415, "images only", check_upload_name, name)


def test_result_extensions():
    assert check_result_extension(None) == ".nii.gz" and check_result_extension("png") == ".png"
    assert check_result_extension([".nrrd"]) == ".nrrd"
    for value in ("/../../x", ".py", ".nii.gz/../x", ".jpg"):
        _refused(400, "result_extension", check_result_extension, value)


def test_infer_request():
    out = check_infer_request({"model": "m", "image": "/x", "heatmap": "raw", "device": "cuda", "save_label": True})
    assert out["device"] == "cpu" and out["save_label"] is False and out["result_extension"] == ".nii.gz"
    _refused(400, "unknown inference", check_infer_request, {"model": "m", "roi_size": [1, 2]})
    _refused(400, "expression", check_infer_request, {"heatmap": "$x"})
    _refused(400, "logging", check_infer_request, {"logging": 3})
    _refused(400, "model_filename", check_infer_request, {"model_filename": "../../x.pt"})
    _refused(400, "timeout", check_infer_request, {"timeout": -1})


def test_fresh_upload_and_containment(tmp_path):
    with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
        f.write(b"x")
    try:
        assert is_fresh_upload(f.name)
        old = time.time() - 3600
        os.utime(f.name, (old, old))
        assert not is_fresh_upload(f.name)
    finally:
        os.unlink(f.name)
    named = tmp_path / "secret.png"
    named.write_bytes(b"x")
    assert not is_fresh_upload(named)  # not a temp-file name in the temp folder
    link = os.path.join(tempfile.gettempdir(), "tmpzz99zz99.png")
    os.symlink(named, link)
    try:
        assert not is_fresh_upload(link)  # a link is never an upload
    finally:
        os.unlink(link)
    assert is_inside(tmp_path / "a" / "b.png", tmp_path) and not is_inside(tmp_path / ".." / "x", tmp_path)
    assert not is_inside(str(tmp_path) + "_sibling/x", tmp_path)
