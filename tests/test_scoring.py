"""Tests of medad_monai.evaluation.scoring: residual maps, image scores, smoothing, the mean-image baseline, thresholds."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from monai.networks.layers import GaussianFilter

from medad_monai.evaluation.calibration import fit_calibration
from medad_monai.networks import MeanImageBaseline
from medad_monai.networks.anomaly_map import AnomalyMapNet
from medad_monai.evaluation.scoring import (
    AnomalyOutput,
    aggregate_score,
    apply_thresholds,
    gaussian_smooth,
    residual_map,
)


def test_residual_map_l1_l2_and_channel_mean():
    x = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.5]], [[1.0, 0.0]]]])  # (1, 3, 1, 2)
    r = torch.zeros_like(x)
    l1 = residual_map(x, r, "l1")
    l2 = residual_map(x, r, "l2")
    assert l1.shape == (1, 1, 1, 2)
    torch.testing.assert_close(l1, torch.tensor([[[[0.5, 0.5]]]]))
    torch.testing.assert_close(l2, torch.tensor([[[[(0 + 0.25 + 1) / 3, (1 + 0.25 + 0) / 3]]]]))
    # numpy input, sign does not matter
    np.testing.assert_allclose(residual_map(np.zeros((2, 1, 4, 4)), np.ones((2, 1, 4, 4))).numpy(), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        residual_map(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="kind"):
        residual_map(x, r, "l3")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_score_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    maps = rng.random((5, 1, 13, 11)).astype(np.float32)
    maps[1, 0, :3] = 0.25  # ties
    flat = maps.reshape(5, -1).astype(np.float64)
    np.testing.assert_allclose(aggregate_score(maps, "mean").numpy(), flat.mean(1), rtol=1e-6)
    np.testing.assert_allclose(aggregate_score(maps, "max").numpy(), flat.max(1), rtol=1e-6)
    for p in (0.0, 50.0, 90.0, 99.0, 99.9, 100.0):
        np.testing.assert_allclose(
            aggregate_score(maps, "percentile", percentile=p).numpy(), np.percentile(flat, p, axis=1), rtol=1e-6
        )
        k = max(1, math.ceil(flat.shape[1] * (100 - p) / 100 - 1e-9))
        expected = np.sort(flat, axis=1)[:, ::-1][:, :k].mean(1)
        np.testing.assert_allclose(aggregate_score(maps, "topk", percentile=p).numpy(), expected, rtol=1e-6)


def test_topk_is_top_percent():
    m = torch.arange(1000.0).view(1, 1, 25, 40)
    assert float(aggregate_score(m, "topk", percentile=99.0)) == pytest.approx(np.mean(np.arange(990, 1000)))
    assert float(aggregate_score(m, "topk", percentile=100.0)) == 999.0  # at least one pixel


def test_aggregate_score_with_mask_matches_per_image_numpy():
    rng = np.random.default_rng(3)
    maps = rng.random((4, 1, 10, 10))
    mask = rng.random((4, 1, 10, 10)) > 0.6
    for method in ("mean", "max", "topk", "percentile"):
        got = aggregate_score(torch.from_numpy(maps), method, percentile=95.0, mask=mask).numpy()
        for i in range(4):
            v = maps[i][mask[i]]
            if method == "mean":
                e = v.mean()
            elif method == "max":
                e = v.max()
            elif method == "percentile":
                e = np.percentile(v, 95.0)
            else:
                k = max(1, math.ceil(v.size * 0.05 - 1e-9))
                e = np.sort(v)[::-1][:k].mean()
            assert got[i] == pytest.approx(e, rel=1e-9), (method, i)


def test_aggregate_score_empty_mask_gives_nan_with_warning():
    maps = torch.rand(2, 1, 4, 4)
    mask = torch.ones(2, 1, 4, 4)
    mask[1] = 0
    for method in ("mean", "max", "topk", "percentile"):
        with pytest.warns(UserWarning, match="empty mask"):
            s = aggregate_score(maps, method, mask=mask)
        assert math.isfinite(float(s[0])) and math.isnan(float(s[1]))


def test_aggregate_score_errors():
    with pytest.raises(ValueError, match="method"):
        aggregate_score(torch.rand(1, 1, 4, 4), "median")
    with pytest.raises(ValueError, match="percentile"):
        aggregate_score(torch.rand(1, 1, 4, 4), "topk", percentile=120)
    with pytest.raises(ValueError, match="batched"):
        aggregate_score(torch.rand(4, 4))


def test_gaussian_smooth():
    m = torch.rand(2, 1, 32, 32)
    assert gaussian_smooth(m, 0.0) is m
    # replicate padding: a constant map stays constant, also at the border (zero padding would darken it)
    torch.testing.assert_close(gaussian_smooth(torch.full((1, 1, 16, 16), 0.7), 2.0), torch.full((1, 1, 16, 16), 0.7))
    # away from the border it equals MONAI's GaussianFilter
    out = gaussian_smooth(m, 1.5)
    ref = GaussianFilter(spatial_dims=2, sigma=1.5)(m)
    torch.testing.assert_close(out[..., 8:-8, 8:-8], ref[..., 8:-8, 8:-8], atol=1e-4, rtol=1e-4)
    assert float(out.std()) < float(m.std())
    with pytest.raises(ValueError, match="sigma"):
        gaussian_smooth(m, -1.0)


def test_mean_image_baseline_fit_map_and_state_dict():
    rng = np.random.default_rng(0)
    batches = [rng.random((n, 1, 8, 6)).astype(np.float32) for n in (3, 5, 1)]
    allx = np.concatenate(batches).astype(np.float64)
    base = MeanImageBaseline().fit(batches)
    np.testing.assert_allclose(base.mean[0].numpy(), allx.mean(0), rtol=1e-5)
    np.testing.assert_allclose(base.std[0].numpy(), allx.std(0, ddof=1), rtol=1e-4)
    assert int(base.count) == 9
    x = torch.rand(2, 1, 8, 6)
    torch.testing.assert_close(base(x), (x - base.mean).abs())

    # saved and restored into a fresh, unfitted instance (shape adopted on load)
    buf = io.BytesIO()
    torch.save(base.state_dict(), buf)
    buf.seek(0)
    fresh = MeanImageBaseline()
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), base(x))

    # used like a network through AnomalyMapNet
    net = AnomalyMapNet(fresh).eval()
    rec, amap = net.predict(x)
    torch.testing.assert_close(amap, base(x))
    torch.testing.assert_close(rec, base.mean.expand(2, 1, 8, 6))


def test_mean_image_baseline_zscore_dict_batches_and_errors():
    imgs = torch.stack([torch.full((3, 4, 4), v) for v in (0.2, 0.4, 0.6)])  # RGB, per-pixel std 0.2
    base = MeanImageBaseline(use_std=True).fit([{"image": imgs}])
    x = torch.full((1, 3, 4, 4), 0.8)
    torch.testing.assert_close(base(x), torch.full((1, 1, 4, 4), 2.0))
    const = MeanImageBaseline(use_std=True, min_std=0.1).fit([torch.full((2, 1, 4, 4), 0.5)])
    torch.testing.assert_close(const(torch.full((1, 1, 4, 4), 0.6)), torch.full((1, 1, 4, 4), 1.0))  # std floored
    with pytest.raises(RuntimeError, match="fit"):
        MeanImageBaseline()(torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        base(torch.rand(1, 3, 5, 4))
    with pytest.raises(ValueError, match="no images"):
        MeanImageBaseline().fit([])


def test_apply_thresholds():
    maps = torch.tensor([[0.1, 0.5], [0.6, 0.9]]).view(2, 1, 1, 2)
    scores = torch.tensor([0.3, 0.75])
    out = apply_thresholds(maps, scores, {"image_threshold": 0.3, "pixel_threshold": 0.5})
    assert isinstance(out, AnomalyOutput)
    assert out.pred_label.tolist() == [0, 1]  # strictly greater: 0.3 is not above 0.3
    assert out.pred_mask.dtype == torch.bool
    assert out.pred_mask.view(2, 2).tolist() == [[False, False], [True, True]]
    assert set(out.to_dict()) == {"pred_score", "pred_label", "anomaly_map", "pred_mask"}

    none = apply_thresholds(maps, scores, None)
    assert none.pred_label.tolist() == [-1, -1] and not bool(none.pred_mask.any())

    cal = fit_calibration(torch.tensor([0.2, 0.3, 0.4]), torch.rand(3, 1, 4, 4), score_method="max")
    auto = apply_thresholds(maps.numpy(), None, cal)  # scores from the calibration's score method
    torch.testing.assert_close(auto.pred_score, torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="scores"):
        apply_thresholds(maps, torch.tensor([1.0]), cal)


def test_anomaly_map_net_smoothing_is_gaussian_smooth_and_keeps_checkpoints_plain():
    from medad_monai.networks import MorphAEus

    torch.manual_seed(0)
    model = MorphAEus(spatial_size=(32, 32), channels=(8, 8, 8, 8, 8)).eval()
    raw, smooth = AnomalyMapNet(model).eval(), AnomalyMapNet(model, smooth_sigma=1.5).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        rec_raw, map_raw = raw.predict(x)
        rec, amap = smooth.predict(x)
    torch.testing.assert_close(rec, rec_raw)  # only the map is post-processed
    torch.testing.assert_close(amap, gaussian_smooth(map_raw, 1.5))
    assert float(amap.std()) < float(map_raw.std())  # it really smooths
    # the kernel is not persistent: a training checkpoint loads strictly into either wrapper
    assert set(smooth.state_dict()) == set(raw.state_dict())
    smooth.load_state_dict(model.state_dict(), strict=True)
    # traceable like the unsmoothed wrapper
    traced = torch.jit.trace(smooth, x)
    torch.testing.assert_close(traced(x), amap)
    with pytest.raises(ValueError, match="smooth_sigma"):
        AnomalyMapNet(model, smooth_sigma=-1)


def test_evaluator_refuses_a_calibration_fitted_on_differently_smoothed_maps():
    from medad_monai.engine.evaluator import AnomalyEvaluator

    base = MeanImageBaseline().fit([torch.rand(4, 1, 8, 8)])
    cal = fit_calibration(torch.rand(10), torch.rand(10, 1, 8, 8), score_method="max", map_sigma=1.0)
    AnomalyEvaluator("cpu", [], AnomalyMapNet(base, smooth_sigma=1.0), score_method="max", calibration=cal)
    with pytest.raises(ValueError, match=r"map_sigma=0\.0 \(calibration: 1\.0\).*--map_sigma 1"):
        AnomalyEvaluator("cpu", [], AnomalyMapNet(base), score_method="max", calibration=cal)


def test_pca_baseline_reconstructs_the_healthy_subspace_and_flags_the_rest():
    from medad_monai.networks import AnomalyMapNet
    from medad_monai.networks import PCABaseline

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 1 * 8 * 8, generator=g)
    healthy = (torch.randn(40, 3, generator=g) @ basis).reshape(40, 1, 8, 8) + 0.5
    pca = PCABaseline(variance=0.999).fit([healthy[:20], healthy[20:]])
    assert pca.components.shape == (3, 64)  # the three directions the healthy images span
    inside = (torch.randn(2, 3, generator=g) @ basis).reshape(2, 1, 8, 8) + 0.5
    torch.testing.assert_close(pca.reconstruct(inside), inside, atol=1e-4, rtol=1e-4)
    outside = inside.clone()
    outside[:, :, 2, 3] += 5.0  # a "lesion" no healthy direction explains
    amap = pca(outside)
    assert amap.shape == (2, 1, 8, 8) and int(amap[0, 0].argmax()) == 2 * 8 + 3
    fresh = PCABaseline()
    fresh.load_state_dict(pca.state_dict())
    torch.testing.assert_close(fresh(outside), amap)
    torch.testing.assert_close(AnomalyMapNet(fresh).eval()(outside), amap)
    with pytest.raises(ValueError, match="variance"):
        PCABaseline(variance=0.0)
    with pytest.raises(RuntimeError, match="fit"):
        PCABaseline()(outside)


def test_ssim_error_is_wang_et_al_ssim_in_a_gaussian_window():
    """``1 - SSIM`` per pixel equals a direct computation of Wang et al.'s formula (population statistics of the
    Gaussian-weighted window, C1 = 0.01², C2 = 0.03²) at interior pixels; 0 for identical images; a patch with the
    same mean but flattened texture scores high where an equal-energy intensity shift of a smooth image scores low."""
    from medad_monai.evaluation.scoring import gaussian_kernel_1d, ssim_error

    torch.manual_seed(0)
    k = gaussian_kernel_1d(1.5)
    r = (k.numel() - 1) // 2
    x = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    got = ssim_error(x, y, [k, k])
    assert got.shape == (2, 1, 24, 24)
    w = torch.outer(k, k).double()
    for b, i, j in [(0, r, r), (1, 12, 7), (0, 24 - r - 1, 24 - r - 1)]:
        values = []
        for c in range(3):
            px = x[b, c, i - r : i + r + 1, j - r : j + r + 1]
            py = y[b, c, i - r : i + r + 1, j - r : j + r + 1]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            ssim = (2 * mx * my + 1e-4) * (2 * cxy + 9e-4) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4))
            values.append(1 - ssim)
        assert float(got[b, 0, i, j]) == pytest.approx(float(torch.stack(values).mean()), abs=1e-6)
    assert float(ssim_error(x, x, [k, k]).abs().max()) < 1e-12

    textured = 0.5 + 0.2 * torch.sign(torch.randn(1, 1, 32, 32))
    flattened = textured.clone()
    flattened[..., 8:24, 8:24] = 0.5  # the texture gone, the mean kept: a small intensity residual (0.2)
    assert float(ssim_error(textured, flattened, [k, k])[..., 12:20, 12:20].min()) > 0.9


def test_anomaly_map_net_ssim_recipe_scripts_and_needs_a_window():
    """``map_residual="ssim"``: ``1 - SSIM(x, reconstruct(x))`` with ``smooth_sigma`` as the window, also for a model
    with its own map; TorchScript gives the same map; sigma 0 is refused with the fix, also from a calibration."""
    from medad_monai.evaluation.scoring import gaussian_kernel_1d, ssim_error
    from medad_monai.networks.anomaly_map import follow_calibration

    torch.manual_seed(0)
    base = MeanImageBaseline().fit([torch.rand(8, 1, 16, 16)])
    net = AnomalyMapNet(base, smooth_sigma=1.5, map_residual="ssim").eval()
    x = torch.rand(3, 1, 16, 16)
    k = gaussian_kernel_1d(1.5)
    expected = ssim_error(x, base.reconstruct(x), [k, k])
    assert torch.allclose(net(x), expected)
    from medad_monai.networks import MorphAEus

    tiny = MorphAEus(spatial_size=(16, 16), channels=(4, 8), num_refine_levels=1)
    morph = AnomalyMapNet(tiny, smooth_sigma=1.5, map_residual="ssim")
    morph.eval()
    assert torch.allclose(torch.jit.script(morph)(x), ssim_error(x, morph.model.reconstruct(x), [k, k]))
    with pytest.raises(ValueError, match="'ssim' needs a window.*--map_sigma 1.5"):
        AnomalyMapNet(base, map_residual="ssim")
    cal = fit_calibration(torch.rand(20), torch.rand(20, 1, 16, 16), map_sigma=0.0)
    cal.map_residual = "ssim"
    with pytest.raises(ValueError, match="'ssim' needs a window"):
        follow_calibration(AnomalyMapNet(base, smooth_sigma=1.0), cal, "calibration.json", adopt=True)
