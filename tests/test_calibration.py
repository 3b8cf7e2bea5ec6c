"""Tests of medad_monai.evaluation.calibration: FPR thresholds on healthy data, streaming, JSON, normalisation, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medad_monai.evaluation.calibration import (
    CALIBRATION_VERSION,
    Calibration,
    CalibrationAccumulator,
    Reservoir,
    fit_calibration,
    fpr_threshold,
)
from medad_monai.evaluation.scoring import aggregate_score


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fpr_threshold_is_inverted_cdf_quantile_and_bounds_the_fpr(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 2, 7, 20, 99, 100, 101, 1000):
        v = rng.normal(size=n)
        if seed % 2:
            v = np.round(v, 1)  # many ties
        for fpr in (0.0, 0.01, 0.05, 0.1, 0.29, 0.5):
            t = fpr_threshold(v, fpr)
            assert t == pytest.approx(np.quantile(v, 1 - fpr, method="inverted_cdf")), (n, fpr)
            assert np.mean(v > t) <= fpr + 1e-12, (n, fpr)
            # the tightest such sample value: any lower sample value flags more than floor(n * fpr) values
            lower = v[v < t]
            if lower.size:
                assert np.sum(v > lower.max()) > math.floor(n * fpr + 1e-9)


def test_fpr_threshold_exact_counts():
    v = torch.arange(1.0, 101.0)
    assert fpr_threshold(v, 0.05) == 95.0  # 96..100 (5 %) are above
    assert fpr_threshold(torch.arange(1.0, 21.0), 0.05) == 19.0  # one of 20 above
    assert fpr_threshold(v, 0.0) == 100.0
    with pytest.raises(ValueError, match="fpr"):
        fpr_threshold(v, 1.0)


def test_fit_calibration_thresholds_stats_and_normalisation():
    rng = np.random.default_rng(0)
    scores = rng.random(200)
    maps = rng.random((200, 1, 16, 16)).astype(np.float32)
    cal = fit_calibration(scores, maps, image_fpr=0.05, pixel_fpr=0.01)
    assert cal.n_images == 200 and cal.n_pixels == 200 * 256 and cal.pixel_sample_size == cal.n_pixels
    assert cal.image_threshold == pytest.approx(np.quantile(scores, 0.95, method="inverted_cdf"))
    assert cal.pixel_threshold == pytest.approx(np.quantile(maps, 0.99, method="inverted_cdf"))
    assert np.mean(scores > cal.image_threshold) <= 0.05
    assert np.mean(maps > cal.pixel_threshold) <= 0.01
    assert cal.image_stats["mean"] == pytest.approx(scores.mean())
    assert cal.pixel_stats["std"] == pytest.approx(maps.astype(np.float64).std(), rel=1e-6)
    assert cal.pixel_stats["min"] == pytest.approx(maps.min()) and cal.pixel_stats["max"] == pytest.approx(maps.max())
    assert cal.pixel_stats["quantiles"]["0.5"] == pytest.approx(np.quantile(maps, 0.5, method="inverted_cdf"))

    # threshold -> 0.5, clamped to [0, 1], same kind as the input, dataset-level scale (q99.9 - q0.1)
    scale = cal.pixel_stats["quantiles"]["0.999"] - cal.pixel_stats["quantiles"]["0.001"]
    assert cal.pixel_norm_scale == pytest.approx(scale)
    assert cal.normalize_map(cal.pixel_threshold) == pytest.approx(0.5)
    assert cal.normalize_map(cal.pixel_threshold + 0.1 * scale) == pytest.approx(0.6)
    norm = cal.normalize_map(np.array([-10.0, cal.pixel_threshold, 10.0]))
    assert isinstance(norm, np.ndarray) and norm.tolist() == pytest.approx([0.0, 0.5, 1.0])
    tmap = cal.normalize_map(torch.from_numpy(maps[:2]))
    assert isinstance(tmap, torch.Tensor) and tmap.shape == (2, 1, 16, 16)
    assert float(tmap.min()) >= 0.0 and float(tmap.max()) <= 1.0
    assert cal.normalize_score(cal.image_threshold) == pytest.approx(0.5)
    assert cal.normalize_score(np.float32(1e6)) == 1.0


def test_accumulator_streaming_equals_in_memory_and_computes_scores():
    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.gamma(2.0, 0.05, size=(37, 1, 12, 12)).astype(np.float32))
    scores = aggregate_score(maps, "topk", percentile=90.0)
    ref = fit_calibration(scores, maps, score_method="topk", percentile=90.0)
    acc = CalibrationAccumulator(score_method="topk", percentile=90.0)
    for start, stop in ((0, 5), (5, 6), (6, 30), (30, 37)):
        acc.update(maps[start:stop])  # scores computed from the maps with the accumulator's method
    cal = acc.compute()
    assert cal.image_threshold == pytest.approx(ref.image_threshold)
    assert cal.pixel_threshold == pytest.approx(ref.pixel_threshold)
    assert cal.n_images == 37 and cal.n_pixels == ref.n_pixels
    assert cal.pixel_stats["mean"] == pytest.approx(ref.pixel_stats["mean"])
    assert cal.image_stats["quantiles"] == pytest.approx(ref.image_stats["quantiles"])
    with pytest.raises(ValueError, match="scores for a batch"):
        acc.update(maps[:3], scores[:2])


def test_mask_restricts_calibration_pixels():
    maps = torch.zeros(4, 1, 8, 8)
    maps[..., :4] = 10.0  # outside the body mask
    mask = torch.zeros(4, 1, 8, 8)
    mask[..., 4:] = 1
    maps[..., 4:] = torch.rand(4, 1, 8, 4)
    acc = CalibrationAccumulator()
    acc.update(maps, mask=mask)
    cal = acc.compute()
    assert cal.n_pixels == 4 * 32
    assert cal.pixel_stats["max"] < 1.0 and cal.image_stats["max"] < 1.0


def test_reservoir_regime_is_bounded_deterministic_and_accurate():
    n_img, side, cap = 200, 32, 20_000  # 204,800 pixels, 10x the cap
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(n_img, 1, side, side, generator=gen)  # U(0, 1): true 0.95 quantile is 0.95

    def run():
        acc = CalibrationAccumulator(pixel_fpr=0.05, max_pixels=cap, seed=7)
        for i in range(0, n_img, 16):
            acc.update(maps[i : i + 16])
        return acc.compute()

    cal, again = run(), run()
    assert cal.pixel_sample_size == cap and cal.n_pixels == n_img * side * side
    assert cal.pixel_threshold == again.pixel_threshold  # deterministic
    achieved = float((maps > cal.pixel_threshold).double().mean())
    bound = 5 * math.sqrt(0.05 * 0.95 / cap)  # 5 sigma of the documented error
    assert abs(achieved - 0.05) < bound
    assert cal.pixel_stats["mean"] == pytest.approx(float(maps.double().mean()), rel=1e-9)  # exact despite sampling
    assert "reservoir sample of 20000" in cal.describe()


def test_reservoir_sample_is_uniform_over_the_stream():
    res = Reservoir(capacity=5_000, seed=0)
    n = 200_000
    for start in range(0, n, 3_333):  # uneven updates
        idx = torch.arange(start, min(start + 3_333, n), dtype=torch.float32)
        res.add(idx, idx.long() % 2 == 0)
    values, parity = res.columns()
    assert values.numel() == 5_000 and res.seen == n and not res.exact
    assert torch.unique(values).numel() == 5_000  # sampling without replacement
    assert torch.equal(parity, values.long() % 2 == 0)  # columns stay aligned
    # each tenth of the stream holds ~500 samples; a biased reservoir (e.g. favouring early items) fails this
    counts = torch.histc(values, bins=10, min=0, max=n)
    assert float(counts.min()) > 400 and float(counts.max()) < 600


def test_save_load_json_roundtrip(tmp_path):
    cal = fit_calibration(torch.rand(50), torch.rand(50, 1, 8, 8), score_method="max", extra={"method": "morphaeus"})
    path = tmp_path / "calibration.json"
    cal.save(path)
    text = path.read_text()
    data = json.loads(text)  # standard JSON
    assert data["version"] == CALIBRATION_VERSION
    assert "healthy validation images only" in data["description"]
    assert data["score_method"] == "max" and data["extra"] == {"method": "morphaeus"}
    loaded = Calibration.load(path)
    assert loaded == cal
    assert data["map_sigma"] == 0.0
    # a file written before map_sigma was recorded (maps were never smoothed then) reads as sigma 0
    del data["map_sigma"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Calibration.load(tmp_path / "old.json").map_sigma == 0.0
    smoothed = fit_calibration(torch.rand(20), torch.rand(20, 1, 8, 8), map_sigma=2)
    smoothed.save(tmp_path / "s.json")
    assert Calibration.load(tmp_path / "s.json").map_sigma == 2.0 and "sigma=2 px" in smoothed.describe()

    with pytest.raises(FileNotFoundError, match="no calibration file"):
        Calibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="version"):
        Calibration.from_dict({**data, "version": CALIBRATION_VERSION + 1})
    with pytest.warns(UserWarning, match="unknown keys"):
        Calibration.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match="lacks"):
        Calibration.from_dict({"pixel_threshold": 0.1})


def test_tensor_and_buffer_helpers():
    cal = fit_calibration(torch.rand(30), torch.rand(30, 1, 4, 4))
    t = cal.as_tensor()
    assert t.shape == (4,) and t.dtype == torch.float32
    assert float(t[0]) == pytest.approx(cal.image_threshold) and float(t[1]) == pytest.approx(cal.pixel_threshold)
    net = torch.nn.Conv2d(1, 1, 1)
    cal.register_buffers(net)
    sd = net.state_dict()
    assert float(sd["calibration_pixel_threshold"]) == pytest.approx(cal.pixel_threshold)
    # travels with a TorchScript export
    scripted = torch.jit.script(net)
    assert float(scripted.calibration_image_threshold) == pytest.approx(cal.image_threshold)
    cal2 = fit_calibration(torch.rand(30) + 5, torch.rand(30, 1, 4, 4))
    cal2.register_buffers(net)  # overwrite, not fail
    assert float(net.calibration_image_threshold) == pytest.approx(cal2.image_threshold)


def test_errors():
    with pytest.raises(ValueError, match="no images"):
        CalibrationAccumulator().compute()
    with pytest.raises(ValueError, match="NaN"):
        fit_calibration(torch.tensor([0.1, float("nan")]), torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        fit_calibration(torch.tensor([0.1, 0.2]), torch.tensor([0.1, float("inf")]))
    with pytest.raises(ValueError, match="at least one healthy"):
        fit_calibration(torch.zeros(0), torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="no pixels"):
        fit_calibration(torch.rand(3), torch.zeros(0))
    with pytest.raises(ValueError, match="image_fpr"):
        CalibrationAccumulator(image_fpr=1.5)
    with pytest.raises(ValueError, match="score_method"):
        CalibrationAccumulator(score_method="median")
    with pytest.raises(ValueError, match="finite"):
        Calibration(image_threshold=float("nan"), pixel_threshold=0.1)


def test_network_record_tells_architectures_and_sizes_apart():
    from medad_monai.evaluation.model_record import ModelRecordMismatch, check_network_record, network_record
    from medad_monai.networks import AnomalyMapNet, MemMCMAE, MorphAEus

    morph = MorphAEus(spatial_size=(32, 32), channels=(8, 16, 32, 64, 64))
    record = network_record(AnomalyMapNet(morph), (1, 32, 32))
    assert record["network"] == "MorphAEus" and record["input_shape"] == [1, 32, 32]
    check_network_record(record, AnomalyMapNet(MorphAEus(spatial_size=(32, 32), channels=(8, 16, 32, 64, 64))),
                         (1, 32, 32))  # same settings, other weights: accepted
    check_network_record({}, morph, (1, 64, 64))  # an older calibration without a record: accepted
    with pytest.raises(ModelRecordMismatch, match=r"fitted for MorphAEus on 1×32×32 .* uses MorphAEus on 1×64×64"):
        check_network_record(record, morph, (1, 64, 64))
    with pytest.raises(ModelRecordMismatch, match=r"uses MorphAEus on 1×32×32 .*fingerprint"):
        check_network_record(record, MorphAEus(spatial_size=(32, 32), channels=(8, 16, 32, 64, 128)), (1, 32, 32))
    memmc = MemMCMAE(in_channels=1, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
                     decoder_hidden_size=32, decoder_mlp_dim=64, decoder_num_layers=1, decoder_num_heads=2,
                     num_memory_slots=4)
    with pytest.raises(ModelRecordMismatch, match=r"fitted for MemMCMAE .* uses MorphAEus"):
        check_network_record(network_record(memmc, (1, 32, 32)), morph, (1, 32, 32))
    # a configuration that keeps each image's size (input_shape None) compares the network alone
    check_network_record(record, AnomalyMapNet(MorphAEus(spatial_size=(32, 32), channels=(8, 16, 32, 64, 64))), None)
    with pytest.raises(ModelRecordMismatch, match=r"fitted for MemMCMAE .* uses MorphAEus"):
        check_network_record(network_record(memmc, (1, 32, 32)), morph, None)
