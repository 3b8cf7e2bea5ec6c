"""MorphAEus losses: schedule, NCC and regulariser against the original formulas, VGG19 perceptual loss, training."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiffusionLoss

from medad_monai.data.phantoms import synthesize_cxr
from medad_monai.losses import MorphAEusLoss, VGG19PerceptualLoss, morphaeus_beta
from medad_monai.losses.morphaeus_loss import validation_criterion
from medad_monai.losses.perceptual import VGG19_WEIGHTS_URL, default_vgg19_weights_path
from medad_monai.networks import MorphAEus

SMALL = dict(spatial_size=(32, 32), channels=(8, 16, 32, 64, 64))
VGG_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
             16: (256, 256), 19: (512, 256)}  # torchvision vgg19().features[0:21] conv layers: (out, in)


@pytest.fixture(scope="module")
def phantoms():
    imgs = [synthesize_cxr(i, size=64).image for i in range(4)]
    return torch.tensor(np.stack(imgs))[:, None].float()


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch hub cache, so that no weights installed on the machine are picked up."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def _random_vgg_state(seed: int, prefix: str = "features.") -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (cout, cin) in VGG_CONVS.items():
        sd[f"{prefix}{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        sd[f"{prefix}{i}.bias"] = torch.randn(cout, generator=g) * 0.05
    return sd


# ------------------------------------------------------------------------------------------------------ schedule


def test_beta_ramp_and_warmup_follow_the_original_epochs():
    loss = MorphAEusLoss(perceptual_weight=0)
    # Ignite epoch e is the original's 0-based epoch e - 1
    expected = {1: 1e-3, 2: 0.015, 11: 0.15, 12: 0.165, 101: 1.5, 201: 3.0, 500: 3.0}
    for epoch, beta in expected.items():
        loss.set_epoch(epoch)
        assert loss.beta == pytest.approx(beta)
        assert morphaeus_beta(epoch) == pytest.approx(beta)
    # original: deformation terms for 0-based epoch > 10, i.e. 11 warm-up epochs
    for epoch in range(1, 12):
        loss.set_epoch(epoch)
        assert not loss.deformation_active
    loss.set_epoch(12)
    assert loss.deformation_active
    short = MorphAEusLoss(perceptual_weight=0, warmup_epochs=1, beta_max=10, beta_ramp_epochs=50)  # teaser config
    short.set_epoch(3)
    assert short.deformation_active and short.beta == pytest.approx(0.4)
    with pytest.raises(ValueError, match="1-based"):
        loss.set_epoch(0)


def _net_and_batch(seed=0, **kwargs):
    torch.manual_seed(seed)
    net = MorphAEus(**SMALL, **kwargs)
    if net.deformer is not None:
        with torch.no_grad():
            net.deformer.flow.weight.normal_(0, 0.02)  # a visible field
    return net, torch.rand(2, 1, 32, 32)


def _grad_norm(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_deformation_terms_only_after_warmup():
    net, x = _net_and_batch()
    loss = MorphAEusLoss(perceptual_weight=0)

    loss.set_epoch(11)  # last warm-up epoch
    out = net(x)
    total = loss(out, x)
    assert total.item() == pytest.approx(F.mse_loss(out.prior, x).item(), rel=1e-6)
    terms = loss.last_terms
    assert terms["deformation_on"] == 0.0 and terms["total"] == pytest.approx(terms["mse"])
    assert "ncc" in terms and "reg" in terms  # monitored, as the original logs them, but not in the loss
    total.backward()
    assert _grad_norm(net.deformer) == 0.0
    assert _grad_norm(net.encoder) > 0

    net.zero_grad(set_to_none=True)
    loss.set_epoch(12)
    out = net(x)
    total = loss(out, x)
    ncc = 0.5 * (loss.ncc_loss(x, out.reconstruction) + loss.ncc_loss(out.prior, out.reversed))
    expected = F.mse_loss(out.prior, x) + ncc + 0.165 * loss.regularizer(out.velocity)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.last_terms["deformation_on"] == 1.0 and loss.last_terms["ncc"] == pytest.approx(ncc.item(), rel=1e-5)
    total.backward()
    assert net.deformer.flow.weight.grad.abs().sum() > 0
    assert _grad_norm(net.deformer.refine) > 0


def test_weights_are_applied():
    net, x = _net_and_batch()
    out = net(x)
    base = MorphAEusLoss(perceptual_weight=0)
    base.set_epoch(101)
    weighted = MorphAEusLoss(perceptual_weight=0, delta=2.0, beta_max=6.0)
    weighted.set_epoch(101)
    b, w = base(out, x).item(), weighted(out, x).item()
    t = base.last_terms
    assert t["beta"] == pytest.approx(1.5) and weighted.last_terms["beta"] == pytest.approx(3.0)
    assert w == pytest.approx(t["mse"] + 2.0 * (t["ncc"] + 3.0 * t["reg"]), rel=1e-5)
    assert b == pytest.approx(t["mse"] + t["ncc"] + 1.5 * t["reg"], rel=1e-5)


def test_ssim_weight_adds_monai_ssim_loss_of_the_prior():
    """``ssim_weight`` (ours, off by default) adds ``w * (1 - SSIM(prior, x))`` (MONAI's SSIMLoss) to ``L_Rec``, in the
    warm-up too, and its gradient reaches the network; a negative weight is refused."""
    from monai.losses import SSIMLoss

    net, x = _net_and_batch()
    out = net(x)
    plain, structural = MorphAEusLoss(perceptual_weight=0), MorphAEusLoss(perceptual_weight=0, ssim_weight=0.5)
    plain(out, x)
    assert "ssim" not in plain.last_terms
    expected = float(SSIMLoss(spatial_dims=2, data_range=1.0)(out.prior, x))
    total = structural(out, x)
    assert structural.last_terms["ssim"] == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx(plain.last_terms["total"] + 0.5 * expected, rel=1e-5)
    total.backward()
    assert net.decoder.head.weight.grad is not None and float(net.decoder.head.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="ssim_weight=-1"):
        MorphAEusLoss(perceptual_weight=0, ssim_weight=-1)


def test_plain_autoencoder_and_unidirectional_variants():
    ae, x = _net_and_batch(deformation=False)
    loss = MorphAEusLoss(perceptual_weight=0)
    loss.set_epoch(50)
    out = ae(x)
    total = loss(out, x)
    assert total.item() == pytest.approx(F.mse_loss(out.prior, x).item(), rel=1e-6)
    assert "ncc" not in loss.last_terms and loss.last_terms["deformation_on"] == 0.0
    forced = MorphAEusLoss(perceptual_weight=0, deformation=True)
    forced.set_epoch(50)
    assert forced(out, x).item() > total.item()  # the explicit flag overrides the detection

    uni, x = _net_and_batch(bidirectional=False)
    out = uni(x)
    total = loss(out, x)
    expected = F.mse_loss(out.prior, x) + loss.ncc_loss(x, out.reconstruction) + loss.beta * loss.regularizer(
        out.velocity
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_validation_criterion_and_bad_outputs():
    net, x = _net_and_batch()
    out = net(x)
    expected = (F.mse_loss(out.prior, x) + F.mse_loss(out.reconstruction, x)) / 2
    assert validation_criterion(out, x).item() == pytest.approx(expected.item())
    assert validation_criterion(out, x).item() != pytest.approx(F.mse_loss(out.prior, x).item(), rel=1e-9)
    with pytest.raises(TypeError, match="reconstruction, prior, velocity, reversed"):
        MorphAEusLoss(perceptual_weight=0)(out[:2], x)


# ------------------------------------------------------------------------------------------ NCC and regulariser


def _original_ncc(i, j, win=9):
    """The original's formula (voxelmorph NCC as used by MorphAEus), rewritten for this comparison."""
    filt = torch.ones(1, i.shape[1], win, win)
    box = lambda t: F.conv2d(t, filt, padding=win // 2)  # noqa: E731
    i_sum, j_sum, i2, j2, ij = box(i), box(j), box(i * i), box(j * j), box(i * j)
    n = win * win
    ui, uj = i_sum / n, j_sum / n
    cross = ij - uj * i_sum - ui * j_sum + ui * uj * n
    var_i = i2 - 2 * ui * i_sum + ui * ui * n
    var_j = j2 - 2 * uj * j_sum + uj * uj * n
    return 1 - (cross * cross / (var_i * var_j).clamp(min=0).add(1e-5)).mean()


def test_ncc_matches_the_original_formula(phantoms):
    loss = MorphAEusLoss(perceptual_weight=0)
    x = phantoms
    candidates = {
        "blurred": F.avg_pool2d(x, 5, 1, 2),
        "shifted": torch.roll(x, 2, -1),
        "noisy": (x + 0.05 * torch.randn_like(x)).clamp(0, 1),
        "piecewise constant": torch.where(x > 0.5, 0.8, 0.3),
        "itself": x,
    }
    for name, y in candidates.items():
        ours, orig = loss.ncc_loss(x, y).item(), _original_ncc(x, y).item()
        assert ours == pytest.approx(orig, abs=6e-3), name
    assert loss.ncc_loss(x, x).item() < 0.05 < loss.ncc_loss(x, torch.roll(x, 2, -1)).item()
    assert loss.ncc_loss(x, torch.rand_like(x)).item() > 0.9


def test_regularizer_is_gradient_l2_over_two():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 2, 20, 24, generator=g)
    reg = MorphAEusLoss.regularizer(v)
    dh = (v[:, :, 2:, 1:-1] - v[:, :, :-2, 1:-1]) / 2
    dw = (v[:, :, 1:-1, 2:] - v[:, :, 1:-1, :-2]) / 2
    assert reg.item() == pytest.approx(((dh**2 + dw**2).mean() / 2).item(), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI 1.6.1 list indexing deprecation
        assert reg.item() == pytest.approx(0.5 * DiffusionLoss()(v).item(), rel=1e-6)
    # known value: v0 = a * row -> d/drow = a for one of two components -> mean a^2 / 2 -> / 2 = a^2 / 4
    a = 0.3
    ramp = torch.zeros(1, 2, 16, 16)
    ramp[:, 0] = a * torch.arange(16.0).view(16, 1)
    assert MorphAEusLoss.regularizer(ramp).item() == pytest.approx(a * a / 4)
    assert MorphAEusLoss.regularizer(torch.full((1, 2, 8, 8), 5.0)).item() == 0.0


# ----------------------------------------------------------------------------------------------- perceptual loss


def test_vgg_layout_matches_torchvision(hub_dir):
    with pytest.warns(UserWarning, match="RANDOM"):
        pl = VGG19PerceptualLoss(allow_random_weights=True)
    sd = pl.state_dict()
    expected = {f"features.{i}.{p}" for i in VGG_CONVS for p in ("weight", "bias")}
    assert set(sd) == expected
    for i, (cout, cin) in VGG_CONVS.items():
        assert sd[f"features.{i}.weight"].shape == (cout, cin, 3, 3)
    assert sum(v.numel() for v in sd.values()) == 3_505_728
    kinds = [type(pl.features[i]).__name__ for i in (1, 4, 6, 9, 11, 18, 20)]
    assert kinds == ["ReLU", "MaxPool2d", "ReLU", "MaxPool2d", "ReLU", "MaxPool2d", "ReLU"]
    assert all(not p.requires_grad for p in pl.parameters())
    pl.train()
    assert not pl.features.training
    # fixed-seed fallback: the same random weights every time, without touching the caller's RNG stream
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning):
        again = VGG19PerceptualLoss(allow_random_weights=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(again.features[19].weight, pl.features[19].weight)


def test_vgg_missing_weights_say_how_to_get_them(hub_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        VGG19PerceptualLoss()
    msg = str(err.value)
    assert VGG19_WEIGHTS_URL in msg and default_vgg19_weights_path() in msg and "weights_path" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VGG19PerceptualLoss(weights_path=tmp_path / "nope.pth", allow_random_weights=True)
    with pytest.raises(FileNotFoundError):
        MorphAEusLoss(perceptual_weight=0.05)
    assert MorphAEusLoss(perceptual_weight=0).perceptual is None  # no VGG needed without the term


def test_vgg_weights_load_from_file_and_hub_cache(hub_dir, tmp_path):
    full = _random_vgg_state(1)
    full["features.21.weight"] = torch.zeros(512, 512, 3, 3)  # deeper layers and the classifier are ignored
    full["classifier.0.weight"] = torch.zeros(4096, 25088)
    path = tmp_path / "vgg19_standin.pth"
    torch.save(full, path)
    pl = VGG19PerceptualLoss(weights_path=path)
    assert torch.equal(pl.features[10].weight, full["features.10.weight"])

    bare = tmp_path / "bare.pth"
    torch.save(_random_vgg_state(2, prefix=""), bare)
    assert torch.equal(VGG19PerceptualLoss(weights_path=bare).features[0].bias, _random_vgg_state(2)["features.0.bias"])

    cached = default_vgg19_weights_path()
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(_random_vgg_state(3), cached)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real weights found: no random-weights warning
        pl = VGG19PerceptualLoss(allow_random_weights=True)
    assert pl.weights_path == cached
    assert torch.equal(pl.features[19].weight, _random_vgg_state(3)["features.19.weight"])

    broken = _random_vgg_state(1)
    del broken["features.12.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="features.12.weight|12.weight"):
        VGG19PerceptualLoss(weights_path=tmp_path / "broken.pth")


def test_perceptual_loss_value(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(_random_vgg_state(4), path)
    pl = VGG19PerceptualLoss(weights_path=path)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    # independent computation: features after layers 1, 6, 11, 20 of the 3-channel repeat, summed MSE
    fa, fb, expected = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1), 0.0
    for i, layer in enumerate(pl.features):
        fa, fb = layer(fa), layer(fb)
        if i in (1, 6, 11, 20):
            expected += F.mse_loss(fa, fb).item()
    assert pl(a, b).item() == pytest.approx(expected, rel=1e-5)
    assert pl(a, a).item() == 0.0
    assert pl(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)).item() == pytest.approx(expected, rel=1e-5)
    normed = VGG19PerceptualLoss(weights_path=path, normalize_imagenet=True)
    assert normed(a, b).item() != pytest.approx(expected, rel=1e-3)
    pred = a.clone().requires_grad_(True)
    pl(pred, b).backward()
    assert pred.grad.abs().sum() > 0 and all(p.grad is None for p in pl.parameters())

    loss = MorphAEusLoss(perceptual_weight=0.05, vgg_weights_path=path)
    net, x = _net_and_batch()
    out = net(x)
    total = loss(out, x)
    assert total.item() == pytest.approx(F.mse_loss(out.prior, x).item() + 0.05 * pl(out.prior, x).item(), rel=1e-5)
    assert loss.last_terms["perceptual"] > 0


# -------------------------------------------------------------------------------------------------- training


def test_loss_and_ncc_decrease_over_adam_steps(phantoms):
    torch.manual_seed(0)
    net = MorphAEus(spatial_size=(64, 64), channels=(16, 32, 64, 128, 256, 256))
    loss = MorphAEusLoss(perceptual_weight=0)
    loss.set_epoch(12)  # deformation terms on
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)  # the original's optimiser
    history = []
    for _ in range(30):
        total = loss(net(phantoms), phantoms)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(dict(loss.last_terms))
    first, last = history[0], history[-3:]
    assert all(math.isfinite(h["total"]) for h in history)
    assert np.mean([h["total"] for h in last]) < 0.85 * first["total"]
    # the NCC term itself goes down (TransMorph #55: voxelmorph-style NCC stalling on recent torch)
    assert np.mean([h["ncc"] for h in last]) < first["ncc"] - 0.1
    assert net.deformer.flow.weight.abs().max() > 1e-3  # the deformer moved away from its 1e-5 init


def test_perceptual_loss_channels_last_equals_nchw():
    import warnings

    from medad_monai.losses.perceptual import VGG19PerceptualLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nhwc = VGG19PerceptualLoss(allow_random_weights=True)
        nchw = VGG19PerceptualLoss(allow_random_weights=True, channels_last=False)
    assert nhwc.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 1, 64, 64, generator=gen, requires_grad=True)
    target = torch.rand(2, 1, 64, 64, generator=gen)
    a, b = nhwc(pred, target), nchw(pred, target)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    ga, = torch.autograd.grad(a, pred)
    gb, = torch.autograd.grad(b, pred)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)
