"""Export with the calibration inside (``medad_monai.apps.export``): eager vs TorchScript vs ONNX (onnxruntime).

For each bundle a tiny training network is built from ``train.json``, its state dict saved as ``model.pt`` (what
training writes) and a calibration fitted on healthy-like random inputs. Both formats are exported with
:func:`export_bundle`; the tests compare maps and decisions with the eager inference network of ``inference.json``
on other random inputs, and read the calibration, metadata and config back from the files. A last group trains
each bundle for one tiny epoch through its own configs and checks that the exported files reproduce the scores and
labels of the bundle's inference run (``scores.csv``).

TorchScript files are made by scripting (``use_trace=False``, no fallback to tracing), as the model zoo's CI exports;
MorphAEus is also exported by tracing once, which must keep working.

Tolerance: ``atol=1e-5, rtol=1e-4`` for both formats. Measured (2 CPU cores, torch 2.13.0+cpu, onnxruntime 1.32):
max |exported - eager| is 0 for TorchScript (both bundles, scripted; MorphAEus traced too), 6e-8 for MorphAEus ONNX
and 2.4e-6 for MemMC-MAE ONNX.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from _bundle_cli import tiny
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from medad_monai.evaluation.calibration import Calibration, fit_calibration
from medad_monai.data import generate_demo_dataset
from medad_monai.apps.export import export_bundle, load_exported
from medad_monai.evaluation.model_record import network_record
from medad_monai.evaluation.scoring import aggregate_score, apply_thresholds

# TorchScript and the TorchScript-based ONNX exporter are deprecated in torch 2.13 but are what MONAI's tools use.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*torch.jit.*deprecated:DeprecationWarning",
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    "ignore:The feature will be removed:DeprecationWarning",
)
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
NEEDS_ONNX = pytest.mark.skipif(not HAS_ONNX, reason="needs onnx and onnxruntime")
FORMATS = ["torchscript", pytest.param("onnx", marks=NEEDS_ONNX)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL, RTOL = 1e-5, 1e-4
SIZE = tiny("morphaeus")["spatial_size"][0]  # the tiny networks' input size
# Tiny networks: the same keys sized in train.json and inference.json, so model.pt fits both.
TINY = {b: tiny(b) for b in ("morphaeus", "memmc_mae")}
# Both bundles must script: the model zoo's CI exports with ckpt_export without --use_trace.
USE_TRACE = {"morphaeus": False, "memmc_mae": False}


def _bundle(name: str) -> str:
    return os.path.join(ROOT, "bundles", name)


def _build(bundle: str, config: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(os.path.join(_bundle(bundle), "configs", config))
    parser.update(TINY[bundle])
    return parser.get_parsed_content("network_def")


def _midpoint_threshold(values: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    """A threshold in the widest gap between neighbouring sorted values with rank in ``[lo, hi]`` (fractions), and
    its margin (half that gap).

    Thresholds between data values make the decisions non-trivial and keep every value a known distance away from
    the threshold, so "identical decisions" rests on that margin rather than on luck.
    """
    v = torch.sort(values.reshape(-1).double()).values
    n = v.numel()
    first, last = max(int(lo * n), 1), min(int(hi * n), n - 1)
    gaps = v[first : last + 1] - v[first - 1 : last]
    k = first + int(torch.argmax(gaps))
    return float((v[k - 1] + v[k]) / 2), float((v[k] - v[k - 1]) / 2)


@pytest.fixture(scope="module", params=sorted(TINY))
def exported(request, tmp_path_factory):
    bundle = request.param
    ckpt = tmp_path_factory.mktemp(f"export_{bundle}")
    torch.manual_seed(0)
    train_net = _build(bundle, "train.json")
    torch.save(train_net.state_dict(), ckpt / "model.pt")
    eager = _build(bundle, "inference.json")
    eager.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))  # plain training keys -> wrapper
    eager.eval()

    gen = torch.Generator().manual_seed(1)
    healthy = torch.rand(6, 1, SIZE, SIZE, generator=gen)
    x = torch.rand(3, 1, SIZE, SIZE, generator=gen)  # batch 3: the export example has batch 1
    with torch.no_grad():
        healthy_maps, maps = eager(healthy), eager(x)
    cal = fit_calibration(aggregate_score(healthy_maps), healthy_maps, extra={"bundle": bundle, "test": True})
    image_thr, image_margin = _midpoint_threshold(aggregate_score(maps), 0.0, 1.0)
    pixel_thr, pixel_margin = _midpoint_threshold(maps, 0.85, 0.95)
    cal = dataclasses.replace(cal, image_threshold=image_thr, pixel_threshold=pixel_thr)
    cal.save(ckpt / "calibration.json")

    return {
        "bundle": bundle,
        "ckpt": ckpt,
        "eager": eager,
        "x": x,
        "maps": maps,
        "cal": cal,
        "margin": min(image_margin, pixel_margin),
        "paths": {},
    }


def _path(exported: dict, fmt: str) -> str:
    """The file of ``fmt``, exported on first use, so that one format failing does not hide the other's results
    (a failure is kept and re-raised rather than retried)."""
    if fmt not in exported["paths"]:
        bundle = exported["bundle"]
        kwargs = {"use_trace": USE_TRACE[bundle]} if fmt == "torchscript" else {}
        try:
            exported["paths"][fmt] = export_bundle(
                _bundle(bundle), ckpt_dir=str(exported["ckpt"]), fmt=fmt, **kwargs, **TINY[bundle]
            )
        except Exception as e:
            exported["paths"][fmt] = e
    if isinstance(exported["paths"][fmt], Exception):
        raise exported["paths"][fmt]
    return exported["paths"][fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_maps_match_eager(exported, fmt):
    model, _ = load_exported(_path(exported, fmt))
    got = model(exported["x"])
    assert got.shape == (3, 1, SIZE, SIZE) and got.dtype == torch.float32
    err = float((got - exported["maps"]).abs().max())
    torch.testing.assert_close(got, exported["maps"], atol=ATOL, rtol=RTOL, msg=f"{fmt}: max abs error {err:.3g}")
    if fmt == "onnx":  # numpy in, same result
        np.testing.assert_allclose(model(exported["x"].numpy()).numpy(), got.numpy(), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_decisions_match_eager(exported, fmt):
    model, cal = load_exported(_path(exported, fmt))
    eager = apply_thresholds(exported["maps"], calibration=exported["cal"])
    deployed = model.predict(exported["x"])
    err = float((model(exported["x"]) - exported["maps"]).abs().max())
    assert err < exported["margin"], f"the errors ({err:.3g}) could cross a threshold (margin {exported['margin']:.3g})"
    assert torch.equal(deployed.pred_label, eager.pred_label)
    assert torch.equal(deployed.pred_mask, eager.pred_mask)
    torch.testing.assert_close(deployed.pred_score, eager.pred_score, atol=ATOL, rtol=RTOL)
    # the thresholds split these inputs, so the comparison above is not vacuous
    assert 0 < int(eager.pred_label.sum()) < 3
    assert 0 < int(eager.pred_mask.sum()) < eager.pred_mask.numel()


@pytest.mark.parametrize("fmt", FORMATS)
def test_calibration_and_metadata_travel_with_the_file(exported, fmt):
    bundle = exported["bundle"]
    model, cal = load_exported(_path(exported, fmt))
    assert isinstance(cal, Calibration) and cal == exported["cal"] and model.calibration == cal
    assert cal == Calibration.load(exported["ckpt"] / "calibration.json")
    with open(os.path.join(_bundle(bundle), "configs", "metadata.json")) as f:
        assert model.metadata == json.load(f)
    # the stored config is inference.json with the export overrides, so it rebuilds the exported network
    assert model.config["spatial_size"] == [SIZE, SIZE]
    assert model.config["network_def"]["_target_"] == "medad_monai.networks.AnomalyMapNet"
    assert model.export_info["input_shape"] == [1, 1, SIZE, SIZE]
    if fmt == "torchscript":
        assert model.export_info["method"] == ("trace" if USE_TRACE[bundle] else "script")
    else:
        assert model.export_info["method"].startswith("onnx") and model.export_info["opset_version"] >= 16


def test_torchscript_carries_threshold_buffers(exported):
    module = torch.jit.load(_path(exported, "torchscript"))
    buffers = dict(module.named_buffers())
    got = torch.stack([buffers[f"calibration_{k}"] for k in Calibration.TENSOR_FIELDS])
    torch.testing.assert_close(got, exported["cal"].as_tensor(), rtol=0, atol=0)


@NEEDS_ONNX
def test_onnx_graph_and_metadata_props(exported):
    import onnx

    model = onnx.load(_path(exported, "onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["pred"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # any batch size
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 16  # GridSample
    props = {p.key: p.value for p in model.metadata_props}
    assert {"calibration.json", "metadata.json", "inference.json", "export.json"} <= set(props)
    assert Calibration.from_dict(json.loads(props["calibration.json"])) == exported["cal"]


def test_morphaeus_traced_export_matches_eager(tmp_path):
    """Tracing (``use_trace=True``) still exports MorphAEus, valid for another batch size than the example's."""
    torch.manual_seed(0)
    torch.save(_build("morphaeus", "train.json").state_dict(), tmp_path / "model.pt")
    eager = _build("morphaeus", "inference.json")
    eager.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    eager.eval()
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = eager(x)
    fit_calibration(aggregate_score(maps), maps).save(tmp_path / "calibration.json")
    path = export_bundle(_bundle("morphaeus"), ckpt_dir=str(tmp_path), use_trace=True, **TINY["morphaeus"])
    model, _ = load_exported(path)
    assert model.export_info["method"] == "trace"
    torch.testing.assert_close(model(x), maps, atol=ATOL, rtol=RTOL)


def test_export_needs_the_calibration(tmp_path):
    torch.save(_build("memmc_mae", "train.json").state_dict(), tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="calibration"):
        export_bundle(_bundle("memmc_mae"), ckpt_dir=str(tmp_path), **TINY["memmc_mae"])


def test_export_rejects_weights_of_another_size(exported, tmp_path):
    bundle = exported["bundle"]
    bigger = {**TINY[bundle], "spatial_size": [2 * SIZE, 2 * SIZE]}
    if bundle == "morphaeus":
        bigger["network_channels"] = [8, 16, 32, 64, 128]
    else:
        bigger["hidden_size"] = 64
    with pytest.raises(ValueError, match="cannot load the weights .* other size or architecture settings"):
        export_bundle(_bundle(bundle), ckpt_dir=str(exported["ckpt"]), output_dir=str(tmp_path), **bigger)
    assert not os.listdir(tmp_path)


def test_export_refuses_a_calibration_of_another_input_size(exported, tmp_path):
    """A calibration recorded at another input size (copied from another run) is not exported with this model."""
    ckpt = tmp_path / "models"
    shutil.copytree(exported["ckpt"], ckpt)
    cal = dataclasses.replace(exported["cal"], model=network_record(exported["eager"], (1, 2 * SIZE, 2 * SIZE)))
    cal.save(ckpt / "calibration.json")
    name = type(exported["eager"].model).__name__
    with pytest.raises(ValueError, match=rf"fitted for {name} on 1×{2 * SIZE}×{2 * SIZE} .* uses {name} on 1×{SIZE}"):
        export_bundle(_bundle(exported["bundle"]), ckpt_dir=str(ckpt), output_dir=str(tmp_path / "out"),
                      **TINY[exported["bundle"]])
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="fmt"):
        export_bundle(_bundle("morphaeus"), fmt="tensorrt")


# ------------------------------------------------------------------ against the bundle's own train + inference ---
@pytest.fixture(scope="module", params=sorted(TINY))
def bundle_run(request, tmp_path_factory):
    """One tiny epoch of ``train.json`` (training + calibration), then ``inference.json`` on the test images."""
    bundle = request.param
    work = tmp_path_factory.mktemp(f"run_{bundle}")
    data = work / "data"
    generate_demo_dataset(str(data), n_train=8, n_val=4, n_test_normal=2, n_test_abnormal=2, size=64)
    common = {"dataset_dir": str(data), "ckpt_dir": str(work / "models"), "num_workers": 0, "progress_bar": False}
    common.update(TINY[bundle])
    train = {"max_epochs": 1}
    if bundle == "morphaeus":
        train.update(allow_random_vgg=True, warmup_epochs=1)  # no ImageNet VGG19 download in tests
    for workflow_type, config, extra in (("train", "train.json", train), ("infer", "inference.json", {})):
        workflow = ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=os.path.join(_bundle(bundle), "configs", config),
            meta_file=os.path.join(_bundle(bundle), "configs", "metadata.json"),
            output_dir=str(work / workflow_type),
            **{**common, **extra},
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    with open(work / "infer" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    parser = ConfigParser()
    parser.read_config(os.path.join(_bundle(bundle), "configs", "inference.json"))
    parser.update(TINY[bundle])
    preprocessing = parser.get_parsed_content("preprocessing")
    x = torch.stack([preprocessing({"image": row["image"]})["image"] for row in rows])
    return {"bundle": bundle, "work": work, "rows": rows, "x": x}


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_model_reproduces_the_bundle_inference(bundle_run, fmt, tmp_path):
    """Scores and labels of the exported file equal those in ``scores.csv`` of the bundle's inference run."""
    bundle, rows = bundle_run["bundle"], bundle_run["rows"]
    kwargs = {"use_trace": USE_TRACE[bundle]} if fmt == "torchscript" else {}
    ckpt_dir = str(bundle_run["work"] / "models")
    out_dir = str(tmp_path)
    path = export_bundle(_bundle(bundle), ckpt_dir=ckpt_dir, output_dir=out_dir, fmt=fmt, **kwargs, **TINY[bundle])
    model, cal = load_exported(path)
    assert cal == Calibration.load(bundle_run["work"] / "models" / "calibration.json")
    out = model.predict(bundle_run["x"])
    expected_scores = torch.tensor([float(r["pred_score"]) for r in rows])
    torch.testing.assert_close(out.pred_score, expected_scores, atol=ATOL, rtol=RTOL)
    assert out.pred_label.tolist() == [int(r["pred_label"]) for r in rows]
