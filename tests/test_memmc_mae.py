"""MemMC-MAE network, operators, deterministic inference masks and masked reconstruction loss (tiny configs, CPU)."""

from __future__ import annotations

import einops
import pytest
import torch
from monai.networks.blocks import SABlock

from medad_monai.losses.mae_loss import MaskedReconstructionLoss, validation_criterion
from medad_monai.networks.blocks import (
    MemoryAugmentedSABlock,
    MemoryTransformerBlock,
    MultiLevelCrossAttentionDecoderBlock,
)
from medad_monai.networks.memmc_mae import (
    MEMMC_MAE_ABLATIONS,
    MemMCMAE,
    MemMCMAEAnomalyMap,
    complementary_masks,
    memmc_mae_ablation,
    patchify,
    unpatchify,
)

TINY = dict(
    img_size=(32, 32),
    patch_size=8,
    hidden_size=32,
    mlp_dim=64,
    num_layers=4,
    num_heads=4,
    decoder_hidden_size=32,
    decoder_mlp_dim=64,
    decoder_num_layers=2,
    decoder_num_heads=4,
    num_memory_slots=6,
)
N = 16  # (32 / 8) ** 2 patches


def _net(**kw) -> MemMCMAE:
    torch.manual_seed(0)
    return MemMCMAE(**{**TINY, **kw})


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(channels):
    net = _net(in_channels=channels)
    x = torch.rand(3, channels, 32, 32)
    pred, mask = net(x)
    assert pred.shape == (3, N, 8 * 8 * channels)
    assert mask.shape == (3, N)
    assert torch.equal(mask.sum(1), torch.full((3,), float(N - int(N * 0.25))))
    net.eval()
    rec, amap = net.predict_anomaly(x)
    assert rec.shape == x.shape
    assert amap.shape == (3, 1, 32, 32)
    assert (amap >= 0).all() and torch.isfinite(amap).all()


def test_patch_order_matches_monai():
    x = torch.rand(2, 3, 32, 24)
    p = patchify(x, [8, 8])
    # MONAI's perceptron patch embedding / flattened conv output: raster order, channel fastest in a patch
    assert torch.equal(p, einops.rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=8, p2=8))
    assert torch.equal(unpatchify(p, [8, 8], [4, 3], 3), x)
    x3 = torch.rand(1, 2, 8, 12, 16)
    p3 = patchify(x3, [4, 4, 8])
    assert torch.equal(p3, einops.rearrange(x3, "b c (h p) (w q) (d r) -> b (h w d) (p q r c)", p=4, q=4, r=8))
    assert torch.equal(unpatchify(p3, [4, 4, 8], [2, 3, 2], 2), x3)


def test_given_mask_is_used_and_masked_content_is_ignored():
    net = _net().eval()
    x = torch.rand(2, 1, 32, 32)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[torch.randperm(N, generator=torch.Generator().manual_seed(1))[:12]] = True
    pred, m = net(x, mask)
    assert torch.equal(m, mask.float().expand(2, -1))
    # the encoder sees only visible patches: changing the pixels of masked patches changes nothing
    pix_mask = net.unpatchify(mask.float().expand(2, -1)[..., None].expand(-1, -1, 64)).bool()
    x2 = torch.where(pix_mask, torch.rand_like(x), x)
    assert not torch.equal(x, x2)
    torch.testing.assert_close(net(x2, mask)[0], pred)
    # ... whereas changing a visible patch does change the prediction
    x3 = torch.where(pix_mask, x, torch.rand_like(x))
    assert not torch.allclose(net(x3, mask)[0], pred)
    with pytest.raises(ValueError, match="same number"):
        bad = torch.zeros(2, N)
        bad[0, :12] = 1
        bad[1, :11] = 1
        net(x, bad)


def test_random_masking_in_training_and_fixed_masks_in_eval():
    net = _net()
    x = torch.rand(4, 1, 32, 32)
    _, m1 = net(x)
    _, m2 = net(x)
    assert not torch.equal(m1, m2)
    assert not torch.equal(m1[0], m1[1])  # per-sample
    net.eval()
    p1, e1 = net(x)
    p2, e2 = net(x)
    assert torch.equal(e1, e2) and torch.equal(p1, p2)
    assert torch.equal(e1.bool(), net.inference_masks[:1].expand(4, -1))
    # an image's validation output does not depend on the batch it is in
    p_single, _ = net(x[2:3])
    assert torch.allclose(p_single, p1[2:3], atol=1e-5)


def test_memory_is_attended():
    net = _net()
    x = torch.rand(2, 1, 32, 32)
    loss = MaskedReconstructionLoss()(net(x, complementary_masks(N)[0]), x)
    loss.backward()
    mem = {n: p for n, p in net.named_parameters() if "memory" in n}
    assert len(mem) == 2 * TINY["num_layers"]
    for name, p in mem.items():
        assert p.shape == (1, 6, 32)
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    net.eval()
    mask = complementary_masks(N)[0]
    before = net(x, mask)[0]
    with torch.no_grad():
        net.blocks[0].attn.memory_v.add_(0.5)
    assert not torch.allclose(net(x, mask)[0], before, atol=1e-4)

    blk = MemoryAugmentedSABlock(32, 4, num_memory_slots=6, save_attn=True)
    blk(torch.rand(2, 5, 32))
    assert blk.att_mat.shape == (2, 4, 5, 11)
    assert blk.att_mat[..., 5:].sum(-1).min() > 0.01  # every query puts weight on the memory


def test_no_memory_reduces_to_plain_self_attention():
    for net in (_net(num_memory_slots=0), _net(use_memory=False), memmc_mae_ablation("mae", **TINY)):
        assert not [n for n, _ in net.named_parameters() if "memory" in n]
    partial = _net(memory_layers=(1, -1))
    assert [blk.attn.num_memory_slots for blk in partial.blocks] == [6, 0, 0, 6]

    torch.manual_seed(0)
    mem0 = MemoryAugmentedSABlock(32, 4, num_memory_slots=0, qkv_bias=True)
    sa = SABlock(32, 4, qkv_bias=True)
    sa.load_state_dict(mem0.state_dict())
    t = torch.rand(2, 7, 32)
    torch.testing.assert_close(mem0(t), sa(t))
    # fused attention computes the same thing, memory and key-padding mask included
    flash = MemoryAugmentedSABlock(32, 4, num_memory_slots=6, use_flash_attention=True).eval()
    plain = MemoryAugmentedSABlock(32, 4, num_memory_slots=6).eval()
    plain.load_state_dict(flash.state_dict())
    pad = torch.ones(2, 7)
    pad[:, 5:] = 0
    torch.testing.assert_close(flash(t, pad), plain(t, pad))
    assert MemoryTransformerBlock(32, 64, 4, num_memory_slots=6)(t).shape == t.shape


def test_multi_level_gates_and_levels():
    net = _net(decoder_levels=(1, 3, 4))
    assert net.level_ids == [0, 2, 3]
    assert len(net.level_embed) == 3
    for blk in net.decoder_blocks:
        assert blk.num_levels == 3 and len(blk.gates) == 3
    x = torch.rand(2, 1, 32, 32)
    MaskedReconstructionLoss()(net(x), x).backward()
    for n, p in net.named_parameters():
        if ".gates." in n or n.startswith("level_embed"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n

    assert _net().level_ids == [0, 1, 2, 3]  # default: ceil(num_layers * k / 4), k = 1..4
    assert _net(num_layers=12).level_ids == [2, 5, 8, 11]
    single = _net(multi_level=False)
    assert single.level_ids == [3]
    assert all(len(b.gates) == 0 and not b.gated for b in single.decoder_blocks)
    with pytest.raises(ValueError, match="last encoder block"):
        _net(multi_level=False, decoder_levels=(2, 4))
    with pytest.raises(ValueError, match="numbered 1..4"):
        _net(decoder_levels=(0,))
    with pytest.raises(ValueError, match="numbered 1..4"):
        _net(decoder_levels=(5,))

    # one shared cross-attention == per-level copies of it
    shared = MultiLevelCrossAttentionDecoderBlock(32, 64, 4, num_levels=3).eval()
    per_level = MultiLevelCrossAttentionDecoderBlock(32, 64, 4, num_levels=3, shared_cross_attention=False).eval()
    state = {}
    for k, v in shared.state_dict().items():
        for i in range(3) if k.startswith("cross_attn.0.") else [None]:
            state[k if i is None else k.replace("cross_attn.0.", f"cross_attn.{i}.")] = v
    per_level.load_state_dict(state)
    y, ctx = torch.rand(2, 17, 32), torch.rand(3, 2, 5, 32)
    torch.testing.assert_close(shared(y, ctx), per_level(y, ctx))
    with pytest.raises(ValueError, match="context must be"):
        shared(y, torch.rand(2, 2, 5, 32))


def test_ablation_presets():
    for name in MEMMC_MAE_ABLATIONS:
        net = memmc_mae_ablation(name, **TINY)
        has_mem = any("memory" in n for n, _ in net.named_parameters())
        has_gates = any(".gates." in n for n, _ in net.named_parameters())
        assert has_mem == (name in ("full", "memory_only")), name
        assert has_gates == (name in ("full", "multilevel_only")), name
    with pytest.raises(ValueError, match="unknown variant"):
        memmc_mae_ablation("nope")
    with pytest.raises(ValueError, match="set by the variant"):
        memmc_mae_ablation("mae", use_memory=True)


def test_complementary_masks():
    m = complementary_masks(64, num_masks=4, masking_ratio=0.75, seed=0)
    assert m.shape == (4, 64) and m.dtype == torch.bool
    assert torch.equal(m.sum(1), torch.full((4,), 48))
    assert torch.equal(m.sum(0), torch.full((64,), 3))  # every patch masked exactly 3 times
    assert torch.equal(m, complementary_masks(64, 4, 0.75, seed=0))
    assert not torch.equal(m, complementary_masks(64, 4, 0.75, seed=1))
    for n, k, r in [(49, 3, 0.75), (196, 5, 0.6), (50, 2, 0.5), (17, 6, 0.8)]:
        mk = complementary_masks(n, k, r, seed=3)
        n_keep = int(n * (1 - r))
        assert torch.equal((~mk).sum(1), torch.full((k,), n_keep))
        kept = (~mk).sum(0)
        assert kept.min() >= (k * n_keep) // n and kept.max() <= -(-k * n_keep // n)
        assert mk.any(0).all()
    with pytest.raises(ValueError, match="cannot mask every"):
        complementary_masks(64, num_masks=2, masking_ratio=0.25)
    with pytest.raises(ValueError, match="num_masks must be >= 2"):
        complementary_masks(64, num_masks=1)


def test_anomaly_map_matches_per_pass_computation_and_is_deterministic():
    net = _net().eval()
    x = torch.rand(3, 1, 32, 32)
    amap = net.anomaly_map(x)
    torch.testing.assert_close(net.anomaly_map(x), amap, rtol=0, atol=0)
    # reference: one forward per pass, squared error counted on masked patches only
    err_sum, count = torch.zeros(3, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    rec_sum = torch.zeros(3, 1, 32, 32)
    for mask in net.inference_masks:
        pred, m = net(x, mask)
        pix = net.unpatchify(m[..., None].expand(-1, -1, 64))
        rec = net.unpatchify(pred)
        err_sum += (rec - x) ** 2 * pix
        rec_sum += rec * pix
        count += pix[:1]
    assert count.min() == 3
    torch.testing.assert_close(amap, err_sum / count, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(net.reconstruct(x), rec_sum / count, rtol=1e-4, atol=1e-6)
    l1 = net.anomaly_map(x, kind="l1")
    assert not torch.allclose(l1, amap)
    assert net.anomaly_map(x, num_masks=8).shape == (3, 1, 32, 32)
    wrapped = MemMCMAEAnomalyMap(net)
    torch.testing.assert_close(wrapped(x), amap)
    assert list(wrapped.state_dict()) == ["model." + k for k in net.state_dict()]


def test_trace_and_script_parity():
    net = _net().eval()
    wrapped = MemMCMAEAnomalyMap(net).eval()
    x, y = torch.rand(2, 1, 32, 32), torch.rand(5, 1, 32, 32)
    traced = torch.jit.trace(wrapped, x)
    scripted = torch.jit.script(wrapped)
    for inp in (x, y):
        expected = wrapped(inp)
        torch.testing.assert_close(traced(inp), expected)
        torch.testing.assert_close(scripted(inp), expected)
    scripted_net = torch.jit.script(net)
    mask = complementary_masks(N)[1]
    torch.testing.assert_close(scripted_net(y, mask)[0], net(y, mask)[0])


def test_loss():
    net = _net()
    x = torch.rand(2, 1, 32, 32)
    pred, mask = net(x)
    loss_fn = MaskedReconstructionLoss()
    loss = loss_fn((pred, mask), x)
    per_patch = ((pred - patchify(x, [8, 8])) ** 2).mean(-1)
    torch.testing.assert_close(loss, (per_patch * mask).sum() / mask.sum())
    assert set(loss_fn.last_terms) == {"loss", "mse_masked", "mse_visible"}
    visible = (per_patch * (1 - mask)).sum() / (1 - mask).sum()
    assert loss_fn.last_terms["mse_visible"] == pytest.approx(float(visible.detach()))
    loss_fn.set_epoch(3)
    torch.testing.assert_close(MaskedReconstructionLoss(masked_only=False)((pred, mask), x), per_patch.mean())
    torch.testing.assert_close(validation_criterion((pred, mask), x), loss)
    torch.testing.assert_close(MaskedReconstructionLoss(patch_size=(8, 8))((pred, mask), x), loss)
    norm = MaskedReconstructionLoss(norm_pix_loss=True)((pred, mask), x)
    assert torch.isfinite(norm) and not torch.allclose(norm, loss)
    loss.backward()
    assert net.decoder_pred.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot infer"):
        MaskedReconstructionLoss()((torch.rand(2, 16, 50), mask), x)


def test_training_localises_an_inserted_blob():
    torch.manual_seed(0)
    net = _net(in_channels=1)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    loss_fn = MaskedReconstructionLoss()
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    for _ in range(40):
        # smooth "normal" images: random horizontal/vertical ramps around mid-grey
        a, b = torch.rand(16, 1, 1, 1) * 0.4, torch.rand(16, 1, 1, 1) * 0.4
        x = 0.3 + a * xx + b * yy
        opt.zero_grad()
        loss_fn(net(x), x).backward()
        opt.step()
    net.eval()
    normal = (0.3 + 0.2 * xx + 0.2 * yy).expand(1, 1, 32, 32).clone()
    blob = normal.clone()
    blob[..., 10:18, 12:20] = 1.0
    amap = net.anomaly_map(torch.cat([normal, blob]))
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[10:18, 12:20] = True
    assert amap[1, 0][inside].mean() > 5 * amap[0, 0][inside].mean()  # vs the same region without the blob
    assert amap[1, 0][inside].mean() > 5 * amap[1, 0][~inside].mean()  # vs the rest of the same image


def test_norm_pix_maps_and_3d():
    net = _net(norm_pix_loss=True).eval()
    x = torch.rand(2, 1, 32, 32)
    rec, amap = net.predict_anomaly(x)
    assert rec.shape == x.shape and torch.isfinite(amap).all() and (amap >= 0).all()
    net3 = MemMCMAE(
        in_channels=1, img_size=16, patch_size=8, hidden_size=48, mlp_dim=64, num_layers=2, num_heads=4,
        decoder_hidden_size=48, decoder_mlp_dim=64, decoder_num_layers=1, decoder_num_heads=4, num_memory_slots=4,
        masking_ratio=0.5, num_inference_masks=2, spatial_dims=3,
    )
    x3 = torch.rand(2, 1, 16, 16, 16)
    pred, mask = net3(x3)
    assert pred.shape == (2, 8, 512) and mask.shape == (2, 8)
    assert net3.eval().anomaly_map(x3).shape == (2, 1, 16, 16, 16)


def test_default_is_vit_b_and_parameter_count_matches_docstring():
    net = MemMCMAE()
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    fixed = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    assert (trainable, fixed) == (138_524_928, 250_880)
    assert "138,524,928" in MemMCMAE.__doc__
    assert net.num_patches == 196 and net.level_ids == [2, 5, 8, 11] and len(net.blocks) == 12


# ---------------------------------------------------------------------------------------- performance (issue 12)


def test_fused_attention_is_on_by_default_where_exact_and_equals_unfused():
    """Fused attention is the default when dropout is 0 (exact) and off with dropout (MONAI's fused call would drop
    attention weights in eval mode); outputs, maps and gradients equal the unfused network's on the same weights."""
    fused = _net().eval()
    assert fused.use_flash_attention
    attn = [m for m in fused.modules() if hasattr(m, "use_flash_attention") and m is not fused]
    assert attn and all(m.use_flash_attention for m in attn)
    assert not any(getattr(m, "use_flash_attention", False) for m in _net(dropout_rate=0.1).modules())
    plain = _net(use_flash_attention=False).eval()
    plain.load_state_dict(fused.state_dict())
    assert not any(getattr(m, "use_flash_attention", False) for m in plain.modules())
    x = torch.rand(3, 1, 32, 32)
    mask = complementary_masks(N)[2]
    torch.testing.assert_close(fused(x, mask)[0], plain(x, mask)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.anomaly_map(x), plain.anomaly_map(x), rtol=1e-5, atol=1e-6)
    for net in (fused, plain):
        net.train()
        MaskedReconstructionLoss()(net(x, mask), x).backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_shared_cross_attention_projects_the_query_once_with_monai_block_results(fused):
    """The shared cross-attention projects the query once for all levels; the result equals MONAI's
    CrossAttentionBlock called on the query repeated per level (what the block computed before), in eval and train
    mode."""
    torch.manual_seed(0)
    blk = MultiLevelCrossAttentionDecoderBlock(32, 64, 4, num_levels=3, qkv_bias=True, use_flash_attention=fused)
    q, ctx = torch.rand(2, 17, 32), torch.rand(3, 2, 5, 32)
    for mode in (False, True):
        blk.train(mode)
        expected = blk.cross_attn[0](q.repeat(3, 1, 1), context=ctx.reshape(6, 5, 32)).reshape(3, 2, 17, 32)
        torch.testing.assert_close(blk._attend_levels(q, ctx), expected, rtol=1e-5, atol=1e-6)
    scripted = torch.jit.script(blk.eval())
    torch.testing.assert_close(scripted(q, ctx), blk(q, ctx))


def test_k_mask_inference_embeds_patches_once():
    """The K passes share one patch embedding: it runs once per image batch, not K times."""
    net = _net().eval()
    calls = []
    net.patch_embedding.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    net.anomaly_map(torch.rand(3, 1, 32, 32))
    assert calls == [3]
