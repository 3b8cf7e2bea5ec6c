"""Mixed precision (``--amp none|bf16|fp16``) and ``--cudnn_benchmark`` of both bundles, checked on CPU.

- unit: :func:`~medad_monai.engine.bundle_utils.amp_settings` gives MONAI's ``amp``/``amp_kwargs``; ``--amp none``
  leaves the configs as they were (``SimpleInferer``, ``amp=False``); the refusals name the value and the fix;
- parity: :class:`~medad_monai.engine.evaluator.AnomalyEvaluator` under bfloat16 autocast on CPU returns float32 maps
  and reconstructions of the same shapes, with maps and scores close to float32's (tolerances below, from measurements);
  :class:`~medad_monai.engine.evaluator.AmpInferer` trains (backward) under bfloat16 and returns float32 outputs;
- CLI: one short ``--amp bf16`` training of each bundle through ``python -m monai.bundle run`` writes a model and a
  calibration; ``--amp bf16`` inference writes scores close to the float32 inference of the same model; ``--amp
  fp16`` on CPU stops with the message that says what to do.

GPU behaviour (MONAI's CUDA autocast and ``GradScaler``) cannot be run here; the configs hand it the same
``amp``/``amp_kwargs`` that are checked below.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import _bundle_cli
import pytest
import torch
from _bundle_cli import TINY_NETWORKS, tiny
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer

from medad_monai.engine.bundle_utils import amp_inferer, amp_settings, set_cudnn_benchmark
from medad_monai.data.phantoms import generate_demo_dataset
from medad_monai.engine.evaluator import AmpInferer, AnomalyEvaluator
from medad_monai.networks import AnomalyMapNet, MemMCMAE, MorphAEus

BUNDLES = ["morphaeus", "memmc_mae"]

# Measured (torch 2.13 CPU, random-init tiny networks, 16 smooth 32x32 images; bf16 vs fp32): MorphAEus max |map
# diff| 1.1e-3 for maps up to 0.30, max relative score diff 0.6 %, Spearman 0.997; MemMC-MAE max |map diff| 0.057 for
# maps up to 7.7 (0.7 % of the range), max relative score diff 0.12 %, Spearman 0.994. Bounds: about 3x those.
MAX_MAP_DIFF_OF_RANGE = 0.02
MAX_REL_SCORE_DIFF = 0.02
MIN_SPEARMAN = 0.95


def _rank(v: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(v)).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _rank(a), _rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _tiny_network(bundle: str) -> torch.nn.Module:
    t = TINY_NETWORKS[bundle]
    if bundle == "morphaeus":
        return MorphAEus(spatial_size=tuple(t["spatial_size"]), channels=tuple(t["network_channels"]))
    keys = ("patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "decoder_hidden_size",
            "decoder_mlp_dim", "decoder_num_layers", "decoder_num_heads", "num_memory_slots")
    return MemMCMAE(in_channels=1, img_size=tuple(t["spatial_size"]), spatial_dims=2, **{k: t[k] for k in keys})


def _images(n: int = 16, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=gen)
    return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1)


# ----------------------------------------------------------------------------------------------------------- unit


def test_amp_settings_values():
    assert amp_settings("none", "cpu") == {"amp": False, "amp_kwargs": {}}
    assert amp_settings(None, "cpu") == {"amp": False, "amp_kwargs": {}}  # the CLI parses `--amp None` to None
    assert amp_settings("bf16", torch.device("cpu")) == {"amp": True, "amp_kwargs": {"dtype": torch.bfloat16}}
    assert amp_settings("BF16", "cpu")["amp_kwargs"]["dtype"] is torch.bfloat16
    # what a GPU run hands MONAI's engines (no GPU needed to build the arguments)
    assert amp_settings("fp16", torch.device("cuda", 0)) == {"amp": True, "amp_kwargs": {"dtype": torch.float16}}
    assert type(amp_inferer("none", "cpu")) is SimpleInferer
    inf = amp_inferer("bf16", "cpu")
    assert isinstance(inf, AmpInferer) and inf.dtype is torch.bfloat16


@pytest.mark.parametrize("bad", ["fp32", "bfloat16", "true", ""])
def test_bad_amp_value_is_refused(bad):
    with pytest.raises(ValueError) as err:
        amp_settings(bad, "cpu")
    msg = str(err.value)
    assert repr(bad) in msg and all(f"'{v}'" in msg for v in ("none", "bf16", "fp16")) and "--amp bf16" in msg, msg


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="use --amp bf16 on CPU or run on a GPU") as err:
        amp_settings("fp16", "cpu")
    assert "fp16" in str(err.value) and "cpu" in str(err.value)
    with pytest.raises(ValueError, match="use --amp bf16 on CPU or run on a GPU"):
        amp_inferer("fp16", torch.device("cpu"))
    # the evaluator refuses it too when built directly (Python API)
    net = AnomalyMapNet(_tiny_network("morphaeus"))
    with pytest.raises(ValueError, match="use --amp bf16 on CPU or run on a GPU"):
        AnomalyEvaluator("cpu", [], net, amp=True, amp_kwargs={"dtype": torch.float16})


def test_cudnn_benchmark_switch():
    before = torch.backends.cudnn.benchmark
    try:
        assert set_cudnn_benchmark(True) is True and torch.backends.cudnn.benchmark is True
        assert set_cudnn_benchmark("false") is False and torch.backends.cudnn.benchmark is False
        with pytest.raises(ValueError, match="--cudnn_benchmark must be true or false"):
            set_cudnn_benchmark("fast")
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_configs_default_to_float32_and_set_cudnn_after_determinism(bundle, config):
    parser = ConfigParser()
    parser.read_config(os.path.join(_bundle_cli.configs_dir(bundle), config))
    assert parser["amp"] == "none" and parser["cudnn_benchmark"] is False
    assert parser.get_parsed_content("amp_args") == {"amp": False, "amp_kwargs": {}}
    init = parser["initialize"]
    cudnn = [i for i, e in enumerate(init) if "set_cudnn_benchmark(@cudnn_benchmark)" in e]
    determinism = [i for i, e in enumerate(init) if "set_determinism" in e]
    assert cudnn and determinism and cudnn[0] > determinism[0], init  # set_determinism turns benchmark off
    if config == "train.json":
        for key in ("train#inferer", "validate#inferer"):
            assert type(parser.get_parsed_content(key)) is SimpleInferer  # --amp none: as before
        for key in ("train#trainer", "validate#evaluator", "calibrate#evaluator"):
            assert parser[key]["amp"] == "$@amp_args['amp']" and parser[key]["amp_kwargs"] == "$@amp_args['amp_kwargs']"
        parser["amp"] = "bf16"
        parser.parse()
        assert isinstance(parser.get_parsed_content("train#inferer"), AmpInferer)
    else:
        assert parser["evaluator"]["amp"] == "$@amp_args['amp']"


# --------------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("bundle", BUNDLES)
def test_anomaly_evaluator_bf16_parity(bundle):
    torch.manual_seed(0)
    net = AnomalyMapNet(_tiny_network(bundle)).eval()
    x = _images()
    out = {}
    for amp in (False, True):
        kwargs = {"amp": True, "amp_kwargs": {"dtype": torch.bfloat16}} if amp else {}
        ev = AnomalyEvaluator("cpu", [{"image": x}], net, **kwargs)
        ev.run()
        out[amp] = ev.state.output
    ref, bf = out[False], out[True]
    for key in ("anomaly_map", "reconstruction", "pred_score"):
        assert bf[key].dtype == ref[key].dtype == torch.float32, key
        assert bf[key].shape == ref[key].shape, key
    assert bf["anomaly_map"].shape == (16, 1, 32, 32) and bf["reconstruction"].shape == x.shape
    amap, amap_bf = ref["anomaly_map"], bf["anomaly_map"]
    assert not torch.equal(amap, amap_bf), "autocast had no effect"
    map_diff = float((amap - amap_bf).abs().max()) / float(amap.max() - amap.min())
    score_diff = float(((ref["pred_score"] - bf["pred_score"]).abs() / ref["pred_score"].abs()).max())
    rho = spearman(ref["pred_score"], bf["pred_score"])
    assert map_diff < MAX_MAP_DIFF_OF_RANGE and score_diff < MAX_REL_SCORE_DIFF and rho > MIN_SPEARMAN, (
        map_diff, score_diff, rho)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_amp_inferer_trains_in_bf16_and_returns_float32(bundle):
    torch.manual_seed(0)
    net = _tiny_network(bundle).train()
    x = _images(4)
    out = AmpInferer(torch.bfloat16)(x, net)
    ref = SimpleInferer()(x, net)
    assert type(out) is type(ref)  # MorphAEusOutput stays a named tuple
    for o, r in zip(out, ref):
        if torch.is_tensor(o) and o.is_floating_point():
            assert o.dtype == torch.float32 and o.shape == r.shape
    out[0].float().pow(2).mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------------------------ CLI
# About 40 s per bundle and 8 s for the refusal on 2 busy CPU cores, so marked slow like the project's other CLI tests.
# Measured through the CLI (model trained 1 epoch with --amp bf16 on these phantoms, 6 test images, bf16 vs none
# inference): max relative score difference 0.11 % (MorphAEus) and 0.06 % (MemMC-MAE), Spearman 1.0 for both.


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("phantoms")
    generate_demo_dataset(str(d), n_train=8, n_val=4, n_test_normal=3, n_test_abnormal=3, size=64, seed=5)
    return str(d)


def _scores(folder) -> dict[str, float]:
    with open(os.path.join(folder, "scores.csv")) as f:
        return {r["image"]: float(r["pred_score"]) for r in csv.DictReader(f)}


@pytest.mark.slow  # a bundle CLI run in a subprocess (the marker's definition)
@pytest.mark.parametrize("bundle", BUNDLES)
def test_cli_bf16_training_and_inference(bundle, dataset, tmp_path):
    settings = tiny(bundle, dataset_dir=dataset, ckpt_dir=tmp_path / "models", num_workers=0, progress_bar=False,
                    batch_size=4, cache_rate=0.0)
    if bundle == "morphaeus":
        settings.update(warmup_epochs=0, perceptual_weight=0.0)
    else:
        settings.update(warmup_epochs=0)
    _bundle_cli.bundle_run(bundle, tmp_path, ["train.json"], output_dir=tmp_path / "eval", max_epochs=1, amp="bf16",
                           cudnn_benchmark=True, **settings)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state and all(v.dtype != torch.bfloat16 for v in state.values())  # weights stay float32
    cal = json.loads((tmp_path / "models" / "calibration.json").read_text())
    assert cal["n_images"] == 4 and cal["image_threshold"] > 0

    for amp in ("bf16", "none"):
        _bundle_cli.bundle_run(bundle, tmp_path, ["inference.json"], output_dir=tmp_path / f"pred_{amp}", amp=amp,
                               write_overlays=False, **settings)
    bf, ref = _scores(tmp_path / "pred_bf16"), _scores(tmp_path / "pred_none")
    assert len(bf) == len(ref) == 6 and bf.keys() == ref.keys()
    keys = sorted(ref)
    a, b = torch.tensor([ref[k] for k in keys]), torch.tensor([bf[k] for k in keys])
    assert float(((a - b).abs() / a.abs()).max()) < MAX_REL_SCORE_DIFF, (a, b)
    assert spearman(a, b) > MIN_SPEARMAN, (a, b)


@pytest.mark.slow  # a bundle CLI run in a subprocess (the marker's definition)
def test_cli_refuses_fp16_on_cpu(dataset, tmp_path):
    cdir = _bundle_cli.configs_dir("morphaeus")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", os.path.join(cdir, "inference.json"),
           "--meta_file", os.path.join(cdir, "metadata.json"), "--dataset_dir", dataset, "--amp", "fp16",
           "--ckpt_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"), "--num_workers", "0",
           "--device", "$torch.device('cpu')"]
    for k, v in TINY_NETWORKS["morphaeus"].items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "use --amp bf16 on CPU or run on a GPU" in proc.stderr, proc.stderr[-3000:]
