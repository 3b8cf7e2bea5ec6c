"""MorphAEus network: architecture size, displacement convention, warping = MONAI's ``Warp``/``DVF2DDF`` (bitwise),
outputs, BatchNorm mode, scripting and tracing, original keys.

Measured (2 CPU cores, torch 2.13.0+cpu, monai 1.6.1): ``Warp2D`` vs MONAI ``Warp`` and ``ScalingAndSquaring2D`` vs
MONAI ``DVF2DDF``, and the whole network with our warping vs with MONAI's: max abs difference 0 (bitwise equal).
Scripted vs eager and traced vs eager: 0 at 32x32, 64x64 and 128x128, with and without deformation.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Warp

from medad_monai.networks import AnomalyMapNet, MorphAEus, MorphAEusOutput, convert_original_state_dict
from medad_monai.networks.blocks import ScalingAndSquaring2D, Warp2D

# TorchScript is deprecated in torch 2.13 but is what MONAI's tools (ckpt_export) and the model zoo use.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")

SMALL = dict(spatial_size=(32, 32), channels=(8, 16, 32, 64, 64))  # 5 levels, latent 64 x 1 x 1


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ architecture size


def test_paper_configuration_parameter_counts_and_forward():
    torch.manual_seed(0)
    net = MorphAEus()  # 128x128, channels 16..256 (7 levels), 3 refinement stages: the CXR config
    assert _count(net) == 3_854_755
    assert _count(net.encoder) == 1_574_496
    assert _count(net.decoder) == 2_164_193
    assert _count(net.deformer) == 116_066
    assert sum(p.numel() for p in net.deformer.refine.parameters()) == 115_488
    assert sum(p.numel() for p in net.deformer.flow.parameters()) == 578
    # the original's 125 state-dict entries minus its two sampling-grid buffers
    assert len(net.state_dict()) == 123

    x = torch.rand(1, 1, 128, 128)
    out = net(x)
    assert isinstance(out, MorphAEusOutput)
    assert out.reconstruction.shape == out.prior.shape == out.reversed.shape == (1, 1, 128, 128)
    assert out.velocity.shape == (1, 2, 128, 128)
    # flow head initialised N(0, 1e-5), zero bias: the deformation starts at (almost) identity
    assert 0 < out.velocity.abs().max() < 1e-3
    assert torch.allclose(out.reconstruction, out.prior, atol=1e-3)
    assert torch.allclose(out.reversed, x, atol=1e-3)
    assert out.prior.min() >= 0 and out.prior.max() <= 1


def test_other_sizes_and_depths():
    torch.manual_seed(0)
    net = MorphAEus(spatial_size=(64, 64), channels=(16, 32, 64, 128, 256, 256))  # 6 levels
    out = net(torch.rand(2, 1, 64, 64))
    assert out.reconstruction.shape == (2, 1, 64, 64) and out.velocity.shape == (2, 2, 64, 64)
    # stages read the pre-BN skips at 8x8 (enc 64 + dec 128), 16x16 (32 + 64 + 32), 32x32 (16 + 32 + 32)
    assert [s.conv.in_channels for s in net.deformer.refine] == [192, 128, 80]

    for levels in (1, 2, 4):
        n = MorphAEus(**SMALL, num_refine_levels=levels)
        assert len(n.deformer.refine) == levels
        assert n(torch.rand(1, 1, 32, 32)).velocity.shape == (1, 2, 32, 32)

    rect = MorphAEus(spatial_size=(32, 64), channels=(8, 16, 32, 64))  # latent 2 x 4, non-square
    assert rect(torch.rand(1, 1, 32, 64)).reconstruction.shape == (1, 1, 32, 64)

    rgb = MorphAEus(spatial_size=(32, 32), in_channels=3, out_channels=3, channels=(8, 16, 32, 64, 64))
    out = rgb(torch.rand(2, 3, 32, 32))
    assert out.reconstruction.shape == out.reversed.shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spatial_size=(48, 48), channels=(8, 16, 32, 64, 64)), "divisible"),
        (dict(SMALL, num_refine_levels=5), "num_refine_levels"),
        (dict(SMALL, strides=(2, 2, 1, 2, 2)), "strides"),
        (dict(SMALL, in_channels=1, out_channels=3), "in_channels"),
    ],
)
def test_invalid_configurations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MorphAEus(**kwargs)


def test_input_of_another_size_is_rejected():
    net = MorphAEus(**SMALL)
    with pytest.raises(ValueError, match="expected input"):
        net(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.rand(1, 3, 32, 32))


# ------------------------------------------------------------------------------------- displacement convention


def test_warp_moves_image_as_ij_pixel_displacement_with_zero_padding():
    warp = MorphAEus(**SMALL).deformer.warp
    img = torch.zeros(1, 1, 16, 16)
    img[0, 0, 8, 5] = 1.0
    ddf = torch.zeros(1, 2, 16, 16)
    ddf[:, 0] = 3.0  # channel 0: rows. out[i, j] = img[i + 3, j] -> the spot moves 3 rows up
    out = warp(img, ddf)
    assert out[0, 0, 5, 5] == pytest.approx(1.0, abs=1e-5)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    # zero padding (the original's grid_sample default), not MONAI Warp's default border padding
    ramp = torch.arange(16.0).view(1, 1, 16, 1).expand(1, 1, 16, 16).contiguous()
    assert torch.all(warp(ramp, ddf)[0, 0, -3:] == 0)

    ddf = torch.zeros(1, 2, 16, 16)
    ddf[:, 1] = -2.0  # channel 1: columns. out[i, j] = img[i, j - 2] -> the spot moves 2 columns right
    out = warp(img, ddf)
    assert out[0, 0, 8, 7] == pytest.approx(1.0, abs=1e-5)
    # a half-pixel shift interpolates bilinearly
    ddf = torch.zeros(1, 2, 16, 16)
    ddf[:, 0] = 0.5
    out = warp(img, ddf)
    assert out[0, 0, 7, 5] == pytest.approx(0.5, abs=1e-5) and out[0, 0, 8, 5] == pytest.approx(0.5, abs=1e-5)


def _voxelmorph_style_warp(img, disp):
    """Independent reference: ij-ordered pixel displacement, normalised by size-1, (x, y) order, align_corners."""
    h, w = img.shape[2:]
    ii, jj = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
    rows = 2 * ((ii + disp[:, 0]) / (h - 1) - 0.5)
    cols = 2 * ((jj + disp[:, 1]) / (w - 1) - 0.5)
    grid = torch.stack([cols, rows], dim=-1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def test_integration_matches_independent_scaling_and_squaring():
    net = MorphAEus(**SMALL)
    torch.manual_seed(1)
    v = F.avg_pool2d(torch.randn(2, 2, 40, 40) * 6, 9, 1)  # smooth field, a few pixels
    ref = v / 2**7
    for _ in range(7):
        ref = ref + _voxelmorph_style_warp(ref, ref)
    ddf = net.deformer.integrate(v)
    assert torch.allclose(ddf, ref, atol=1e-5)
    # constant translation: the integrated field equals the velocity away from the zero-padded border
    const = torch.zeros(1, 2, 32, 32)
    const[:, 0], const[:, 1] = 2.0, -1.0
    assert torch.allclose(net.deformer.integrate(const)[..., 8:-8, 8:-8], const[..., 8:-8, 8:-8], atol=1e-5)
    img = torch.rand(1, 1, 32, 32)
    assert torch.allclose(net.deformer.warp(img, ddf[:1]), _voxelmorph_style_warp(img, ddf[:1]), atol=1e-6)


# ------------------------------------------------------------------- our warping = MONAI's Warp / DVF2DDF, bitwise


def _monai(cls, *args):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
        return cls(*args)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_warp2d_equals_monai_warp(mode, padding_mode):
    ours, monai_warp = Warp2D(mode, padding_mode), _monai(Warp, mode, padding_mode)
    scripted = torch.jit.script(ours)
    g = torch.Generator().manual_seed(0)
    for batch, h, w in ((1, 16, 16), (3, 17, 23)):  # non-square, odd sizes; displacements far outside the image
        image, ddf = torch.rand(batch, 2, h, w, generator=g), torch.randn(batch, 2, h, w, generator=g) * 6
        expected = monai_warp(image, ddf)
        assert torch.equal(ours(image, ddf), expected)
        assert torch.equal(scripted(image, ddf), expected)


def test_scaling_and_squaring_equals_monai_dvf2ddf():
    ours = ScalingAndSquaring2D(num_steps=7, mode="bilinear", padding_mode="zeros")
    monai_int = _monai(DVF2DDF, 7, "bilinear", "zeros")
    torch.manual_seed(0)
    v = F.avg_pool2d(torch.randn(2, 2, 40, 40) * 6, 9, 1)  # smooth field of a few pixels
    expected = monai_int(v)
    assert torch.equal(ours(v), expected)
    assert torch.equal(torch.jit.script(ours)(v), expected)
    assert ScalingAndSquaring2D(num_steps=3).num_steps == 3
    with pytest.raises(ValueError, match="num_steps"):
        ScalingAndSquaring2D(num_steps=0)


def test_warp2d_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        Warp2D(mode="trilinear")
    with pytest.raises(ValueError, match="padding_mode"):
        Warp2D(padding_mode="constant")
    warp = Warp2D()
    with pytest.raises(ValueError, match="field must be"):
        warp(torch.rand(2, 1, 8, 8), torch.zeros(2, 2, 8, 9))
    with pytest.raises(ValueError, match="field must be"):
        warp(torch.rand(2, 1, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="expected a"):
        warp(torch.rand(1, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=">= 2"):
        warp(torch.rand(1, 1, 1, 8), torch.zeros(1, 2, 1, 8))


def test_network_equals_the_monai_warp_implementation():
    """The network with our warping gives bitwise the outputs it gave with MONAI's ``Warp``/``DVF2DDF`` (which it
    used before; no state, so checkpoints are unaffected)."""
    torch.manual_seed(0)
    net = MorphAEus(**SMALL).eval()
    with torch.no_grad():
        net.deformer.flow.weight.normal_(0, 0.05)  # a non-trivial field
        net.deformer.flow.bias.copy_(torch.tensor([1.5, -1.0]))
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        ours = net(x)
        keys = list(net.state_dict())
        net.deformer.integrate = _monai(DVF2DDF, 7, "bilinear", "zeros")
        net.deformer.warp = _monai(Warp, "bilinear", "zeros")
        assert list(net.state_dict()) == keys
        reference = net(x)
    assert ours.velocity.abs().max() > 0.5
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)


def _constant_flow(net: MorphAEus, rows: float, cols: float) -> None:
    with torch.no_grad():
        net.deformer.flow.weight.zero_()
        net.deformer.flow.bias.copy_(torch.tensor([rows, cols]))


def test_outputs_are_wired_as_the_original():
    torch.manual_seed(0)
    net = MorphAEus(**SMALL).eval()
    _constant_flow(net, 2.0, 0.0)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = net(x)
    assert torch.allclose(out.velocity, torch.tensor([2.0, 0.0]).view(1, 2, 1, 1).expand(2, 2, 32, 32))
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    # reconstruction = prior warped by phi+ (out[i] = prior[i + 2]); reversed = x warped by phi- (out[i] = x[i - 2])
    assert torch.allclose(out.reconstruction[inner], out.prior[:, :, 10:-6, 8:-8], atol=1e-4)
    assert torch.allclose(out.reversed[inner], x[:, :, 6:-10, 8:-8], atol=1e-4)

    uni = MorphAEus(**SMALL, bidirectional=False).eval()
    with torch.no_grad():
        o = uni(x)
    assert o.reversed is o.reconstruction  # the original returns y_source as x_reversed without bidir


def test_plain_autoencoder_ablation():
    torch.manual_seed(0)
    full = MorphAEus(**SMALL)
    ae = MorphAEus(**SMALL, deformation=False)
    assert ae.deformer is None
    assert _count(ae) == _count(full.encoder) + _count(full.decoder)
    assert not any(k.startswith("deformer") for k in ae.state_dict())
    x = torch.rand(2, 1, 32, 32)
    out = ae(x)
    assert out.reconstruction is out.prior
    assert out.velocity.shape == (2, 2, 32, 32) and torch.count_nonzero(out.velocity) == 0
    assert torch.equal(out.reversed, x)
    # the paper configuration without deformer: 3,854,755 - 116,066
    assert _count(MorphAEus(deformation=False)) == 3_738_689


def test_anomaly_map_wrapper_uses_the_morphed_reconstruction():
    torch.manual_seed(0)
    net = MorphAEus(**SMALL).eval()
    _constant_flow(net, 1.5, -0.5)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        rec, amap = AnomalyMapNet(net).predict(x)
        out = net(x)
    assert torch.equal(rec, out.reconstruction)
    assert torch.allclose(amap, (x - out.reconstruction).abs())


# ------------------------------------------------------------------------------------------------------ BatchNorm


def _bn(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_frozen_batchnorm_statistics_reproduce_the_original_trainer():
    torch.manual_seed(0)
    net = MorphAEus(**SMALL)  # freeze_bn_stats=True by default
    net.train()
    assert net.training and all(not m.training for m in _bn(net))
    out = net(torch.rand(4, 1, 32, 32) * 5 + 3)
    out.reconstruction.mean().backward()
    for m in _bn(net):
        assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
        assert m.num_batches_tracked == 0
    # BN is then a learnable affine map gamma * x / sqrt(1 + eps) + beta, which does receive gradients
    assert net.encoder.blocks[0].norm.weight.grad is not None
    assert net.encoder.blocks[0].norm.weight.grad.abs().sum() > 0
    # ... and the output of a batch does not depend on the other images in it
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x).prior[:1], net(x[:1]).prior, atol=1e-6)
    net.eval()
    net.train(True)
    assert all(not m.training for m in _bn(net))


def test_standard_batchnorm_when_not_frozen():
    torch.manual_seed(0)
    net = MorphAEus(**SMALL, freeze_bn_stats=False).train()
    assert all(m.training for m in _bn(net))
    net(torch.rand(4, 1, 32, 32))
    assert net.encoder.blocks[0].norm.num_batches_tracked == 1
    assert not torch.all(net.encoder.blocks[0].norm.running_mean == 0)
    net.eval()
    assert all(not m.training for m in _bn(net))


# ------------------------------------------------------------------------------------------- scripting and tracing

SCRIPT_CASES = {
    "tiny": dict(spatial_size=(32, 32), channels=(8, 16, 32, 64, 64)),  # the bundle tests' size
    "64": dict(spatial_size=(64, 64), channels=(16, 32, 64, 128, 256, 256)),
    "128-paper": dict(),  # the paper configuration
}


@pytest.mark.parametrize("deformation", [True, False], ids=["deformation", "ablation"])
@pytest.mark.parametrize("case", sorted(SCRIPT_CASES))
def test_script_matches_eager(case, deformation):
    """``torch.jit.script`` (what the model zoo's ``ckpt_export`` does) compiles the network and the anomaly-map
    wrapper, and both give the eager outputs for any batch size, also after a save/load round trip."""
    kwargs = SCRIPT_CASES[case]
    torch.manual_seed(0)
    net = MorphAEus(**kwargs, deformation=deformation).eval()
    if deformation:
        _constant_flow(net, 1.0, -2.0)
        with torch.no_grad():
            net.deformer.flow.weight.normal_(0, 0.05)  # a non-trivial field
    size = net.spatial_size
    scripted = torch.jit.script(net)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(AnomalyMapNet(net).eval()), buffer)
    buffer.seek(0)
    wrapper = torch.jit.load(buffer)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.rand(batch, 1, *size)
            eager = net(x)
            assert (eager.velocity.abs().max() > 0.5) == deformation
            for a, b in zip(eager, scripted(x)):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
            torch.testing.assert_close(wrapper(x), AnomalyMapNet(net)(x), rtol=0, atol=1e-6)
        with pytest.raises(Exception, match="expected input"):  # the size check is compiled in too
            scripted(torch.rand(1, 1, size[0] // 2, size[1]))


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
def test_trace_matches_eager_for_any_batch_size():
    """Tracing still works, without a TracerWarning (the identity grid comes from the traced shape) and with
    ``check_trace``, and the trace is valid for other batch sizes."""
    torch.manual_seed(0)
    net = MorphAEus(spatial_size=(64, 64), channels=(16, 32, 64, 128, 256, 256)).eval()
    _constant_flow(net, 1.0, -2.0)
    with torch.no_grad():
        net.deformer.flow.weight.normal_(0, 0.05)  # a non-trivial field
        x = torch.rand(2, 1, 64, 64)
        traced = torch.jit.trace(net, x)
        for batch in (x, torch.rand(3, 1, 64, 64)):
            eager = net(batch)
            assert eager.velocity.abs().max() > 0.5
            for a, b in zip(eager, traced(batch)):
                assert torch.allclose(a, b, atol=1e-6)
    ae = MorphAEus(**SMALL, deformation=False).eval()
    with torch.no_grad():
        x = torch.rand(2, 1, 32, 32)
        for a, b in zip(ae(x), torch.jit.trace(ae, x)(x)):
            assert torch.allclose(a, b)


# ------------------------------------------------------------------------------------------ original state dict


def _original_state_dict(channels=(16, 32, 64, 128, 256, 256, 256), size=128, refine=3) -> dict:
    """A state dict with the original code's key names and shapes (reference §1), filled with random values."""
    g = torch.Generator().manual_seed(0)
    sd = {}

    def bn(prefix, c):
        sd[f"{prefix}.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"{prefix}.bias"] = torch.randn(c, generator=g) * 0.1
        sd[f"{prefix}.running_mean"] = torch.randn(c, generator=g) * 0.1
        sd[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    cin = 1
    for i, c in enumerate(channels):
        sd[f"encoder.conv__encode_{i}.weight"] = torch.randn(c, cin, 3, 3, generator=g) * 0.1
        sd[f"encoder.conv__encode_{i}.bias"] = torch.randn(c, generator=g) * 0.1
        bn(f"encoder.conv__batch_{i}", c)
        cin = c
    for i, c in enumerate(reversed(channels)):
        sd[f"decoder.conv__decode_{i}.weight"] = torch.randn(c, cin, 3, 3, generator=g) * 0.05
        sd[f"decoder.conv__decode_{i}.bias"] = torch.randn(c, generator=g) * 0.1
        bn(f"decoder.conv__batch_{i}", c)
        cin = c
    sd["decoder.conv__decode_final.weight"] = torch.randn(1, channels[0], 1, 1, generator=g)
    sd["decoder.conv__decode_final.bias"] = torch.randn(1, generator=g)
    for j in range(refine):
        k = refine - j
        cin = channels[k - 1] + channels[k] + (32 if j else 0)
        sd[f"deformer.deformerNN.ref__refine_{j}.weight"] = torch.randn(cin, 32, 3, 3, generator=g) * 0.05  # in, out
        sd[f"deformer.deformerNN.ref__refine_{j}.bias"] = torch.randn(32, generator=g) * 0.1
        bn(f"deformer.deformerNN.ref__batch_{j}", 32)
    sd["deformer.flow.weight"] = torch.randn(2, 32, 3, 3, generator=g) * 0.01
    sd["deformer.flow.bias"] = torch.zeros(2)
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).unsqueeze(0).float()
    sd["deformer.transformer.grid"] = grid
    sd["deformer.integrate.transformer.grid"] = grid.clone()
    return sd


def test_load_original_state_dict():
    sd = _original_state_dict()
    # the reference's measured totals of the original state dict
    assert len(sd) == 125 and sum(v.numel() for v in sd.values()) == 3_924_532
    net = MorphAEus()
    result = net.load_original_state_dict({"model_weights": sd, "optimizer_weights": {}, "epoch": 3})
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(net.encoder.blocks[2].conv.weight, sd["encoder.conv__encode_2.weight"])
    assert torch.equal(net.encoder.blocks[6].norm.running_var, sd["encoder.conv__batch_6.running_var"])
    assert torch.equal(net.decoder.blocks[3].conv.bias, sd["decoder.conv__decode_3.bias"])
    assert torch.equal(net.decoder.head.weight, sd["decoder.conv__decode_final.weight"])
    assert torch.equal(net.deformer.refine[1].conv.weight, sd["deformer.deformerNN.ref__refine_1.weight"])
    assert torch.equal(net.deformer.refine[2].norm.bias, sd["deformer.deformerNN.ref__batch_2.bias"])
    assert torch.equal(net.deformer.flow.weight, sd["deformer.flow.weight"])

    ae = MorphAEus(deformation=False)
    assert not ae.load_original_state_dict(sd).missing_keys  # deformer keys dropped for the ablation
    assert torch.equal(ae.decoder.head.bias, sd["decoder.conv__decode_final.bias"])

    converted = convert_original_state_dict({"module." + k: v for k, v in sd.items()})
    assert len(converted) == 123 and "deformer.flow.bias" in converted
    with pytest.raises(KeyError, match="not a key of the original"):
        convert_original_state_dict({"encoder.something_else.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------------- performance (issue 12)


def test_channels_last_equals_nchw():
    """Channels-last convolutions (the default) give the NCHW network's outputs and gradients up to float rounding,
    with the same state dict; the velocity comes back in NCHW layout."""
    torch.manual_seed(0)
    fast = MorphAEus(**SMALL)
    assert fast.channels_last and fast.encoder.blocks[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    nchw = MorphAEus(**SMALL, channels_last=False)
    assert nchw.encoder.blocks[0].conv.weight.is_contiguous()
    nchw.load_state_dict(fast.state_dict())
    assert list(nchw.state_dict()) == list(fast.state_dict())
    torch.nn.init.normal_(fast.deformer.flow.weight, std=1e-2)  # a visible deformation
    nchw.deformer.flow.weight.data.copy_(fast.deformer.flow.weight)
    x = torch.rand(3, 1, 32, 32)
    out_fast, out_nchw = fast(x), nchw(x)
    for a, b in zip(out_fast, out_nchw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert out_fast.velocity.is_contiguous()
    sum(o.sum() for o in out_fast).backward()
    sum(o.sum() for o in out_nchw).backward()
    for (name, a), b in zip(fast.named_parameters(), nchw.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(fast.eval())(x)[0], nchw.eval()(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"bidirectional": False}, {"deformation": False}])
def test_reconstruct_skips_the_reversed_warp_and_equals_forward(kwargs):
    """``reconstruct`` (what the anomaly map uses) equals ``forward(x).reconstruction`` bitwise with half the warps:
    no ``-velocity`` integration and no warp of the input."""
    torch.manual_seed(0)
    net = MorphAEus(**SMALL, **kwargs).eval()
    if net.deformer is not None:
        torch.nn.init.normal_(net.deformer.flow.weight, std=1e-2)
    x = torch.rand(2, 1, 32, 32)
    warps = []
    hooks = [m.register_forward_hook(lambda *_: warps.append(1)) for m in net.modules() if isinstance(m, Warp2D)]
    with torch.no_grad():
        full = net(x).reconstruction
        n_forward = len(warps)
        rec = net.reconstruct(x)
    for h in hooks:
        h.remove()
    assert torch.equal(rec, full)
    assert len(warps) - n_forward == (n_forward // 2 if kwargs.get("bidirectional", True) else n_forward)
    wrapped = AnomalyMapNet(net).eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), (x - full).abs())
        assert torch.equal(torch.jit.script(wrapped)(x), wrapped(x))
