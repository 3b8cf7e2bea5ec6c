"""MorphAEus computed the way the original code computes it: the reference of the MorphAEus benchmark.

The original (``ci-ber/MorphAEus``, ``projects/23_morphaeus/MorphTrainer.py`` with ``model_zoo/morphaeus.py``,
``optim/losses/image_losses.py``; AGPL-3.0, read for facts only: this is our own code, written from a description
of the original, nothing copied) computes one training step as::

    x_rec, d = model(x)                 # prior, reversed, velocity in d
    L_Rec   = MSE(prior, x) + alpha * PL(prior, x)
    L_Morph = (NCC(x, x_rec) + NCC(prior, reversed)) / 2 + beta(t) * Reg(velocity)
    loss    = L_Rec + delta * L_Morph   (after the warm-up)
    loss.backward(); optimizer.step()

and differs from ours (:class:`~medad_monai.networks.MorphAEus` + :class:`~medad_monai.losses.MorphAEusLoss`)
not in the math but in how it is computed:

- **perceptual loss**: the VGG19 parameters keep ``requires_grad=True`` (outside the optimiser, so never updated, but
  their gradients are computed and accumulate in ``.grad``), and the target image's features are computed with
  autograd on, so their graph is built and the backward pass runs through both VGG passes. Ours freezes the VGG and
  computes the target features without a graph;
- **Swish**: ``x * sigmoid(x)`` as a hand-written autograd function (it saves its input and recomputes the sigmoid in
  backward); ours is torch's fused ``SiLU``;
- **NCC**: voxelmorph's formula with a 9x9 box filter applied by five full 2-D convolutions and the stabiliser
  ``cc = cross² / (var_I * var_J + 1e-5)``; ours is MONAI's ``LocalNormalizedCrossCorrelationLoss`` (separable
  filtering) whose floor ``max(var_I, d) * max(var_J, d)``, ``d = sqrt(1e-5)``, differs from the original only in
  windows without contrast (see :mod:`medad_monai.losses.morphaeus_loss`);
- **warping**: voxelmorph's ``SpatialTransformer`` (a registered identity grid, each axis normalised by
  ``2 * (p / (size - 1) - 0.5)``); ours is MONAI ``Warp``'s math (``p * 2 / (size - 1) - 1``), equal up to rounding;
- memory format: the original's convolutions run in NCHW (ours: channels-last, see
  :class:`~medad_monai.networks.MorphAEus`).

:class:`OriginalMorphAEus` runs this on **our network's modules and weights** (the state dicts correspond one to one,
:func:`~medad_monai.networks.convert_original_state_dict`), so that its outputs and loss can be compared with ours
on the same weights; BatchNorm follows the module's mode, as ours (the original trains with BatchNorm in eval mode).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from medad_monai.losses import MorphAEusLoss
from medad_monai.networks import MorphAEus, MorphAEusOutput

__all__ = ["OriginalMorphAEus", "original_swish", "original_ncc"]


class _Swish(torch.autograd.Function):
    """``x * sigmoid(x)``; backward ``g * s * (1 + x * (1 - s))`` with ``s = sigmoid(x)`` recomputed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s * (1 + x * (1 - s)))


def original_swish(x: torch.Tensor) -> torch.Tensor:
    """Swish as the original computes it: an unfused autograd function (same values as ``F.silu``)."""
    return _Swish.apply(x)


def original_ncc(i: torch.Tensor, j: torch.Tensor, window: int = 9) -> torch.Tensor:
    """``1 - mean(cc)``, the original's squared local NCC (voxelmorph's formula) with a ``window`` box filter.

    Window sums of ``I, J, I², J², IJ`` by full 2-D convolutions with a ones filter (zero padding);
    ``cc = cross² / (max(var_I * var_J, 0) + 1e-5)`` with ``cross``, ``var`` the window's centred sums.

    Args:
        i, j: ``(B, C, H, W)`` images; the channels are summed inside each window.
        window: window side (original: 9).
    """
    filt = torch.ones(1, i.shape[1], window, window, dtype=i.dtype, device=i.device)
    pad = window // 2
    n = float(window * window)
    i_sum = F.conv2d(i, filt, padding=pad)
    j_sum = F.conv2d(j, filt, padding=pad)
    i2_sum = F.conv2d(i * i, filt, padding=pad)
    j2_sum = F.conv2d(j * j, filt, padding=pad)
    ij_sum = F.conv2d(i * j, filt, padding=pad)
    u_i = i_sum / n
    u_j = j_sum / n
    cross = ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * n
    var_i = i2_sum - 2 * u_i * i_sum + u_i * u_i * n
    var_j = j2_sum - 2 * u_j * j_sum + u_j * u_j * n
    cc = cross * cross / ((var_i * var_j).clamp(min=0) + 1e-5)
    return 1 - cc.mean()


class _GridWarp(nn.Module):
    """Warping with a registered identity grid, normalised per axis by ``2 * (p / (size - 1) - 0.5)``, channels
    swapped to ``grid_sample``'s (x, y), bilinear, zero padding, ``align_corners=True`` (voxelmorph's transformer)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
        self.register_buffer("grid", torch.stack([rows, cols]).unsqueeze(0).float(), persistent=False)

    def forward(self, src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        locs = self.grid + flow
        size = locs.shape[2:]
        axes = [2 * (locs[:, k] / (size[k] - 1) - 0.5) for k in range(2)]
        grid = torch.stack([axes[1], axes[0]], dim=-1)
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class OriginalMorphAEus(nn.Module):
    """The original code's computation of MorphAEus' forward pass and training loss, on our modules.

    Args:
        network: our :class:`~medad_monai.networks.MorphAEus`; its modules and weights are used, not copied (train
            and optimise this object's ``network`` like the original model), and converted to NCHW memory format.
        loss: our :class:`~medad_monai.losses.MorphAEusLoss`, for its settings (weights, schedule, epoch) and VGG
            weights. The VGG is copied, with ``requires_grad=True`` as in the original.

    ``forward(x)`` returns :class:`~medad_monai.networks.MorphAEusOutput`; :meth:`loss` the scalar loss of the
    original trainer at ``loss.epoch`` and :attr:`last_terms` its terms.

    Example::

        >>> net = MorphAEus(spatial_size=(64, 64), channels=(16, 32, 64, 128, 256, 256))
        >>> ref = OriginalMorphAEus(net, MorphAEusLoss(perceptual_weight=0.0))
        >>> x = torch.rand(2, 1, 64, 64)
        >>> ref.loss(ref(x), x).backward()
    """

    def __init__(self, network: MorphAEus, loss: MorphAEusLoss) -> None:
        super().__init__()
        self.network = network.to(memory_format=torch.contiguous_format)
        self.schedule = loss
        self.vgg: nn.Sequential | None = None
        self.feature_layers: tuple[int, ...] = ()
        if loss.perceptual is not None:
            self.vgg = copy.deepcopy(loss.perceptual.features).eval()
            for p in self.vgg.parameters():
                p.requires_grad_(True)  # original: trainable VGG outside the optimiser
            self.feature_layers = tuple(loss.perceptual.feature_layers)
            if loss.perceptual.normalize_imagenet:
                raise ValueError("OriginalMorphAEus: the original feeds VGG unnormalised images.")
        self.warp = _GridWarp(tuple(network.spatial_size))
        self.last_terms: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------------ network

    def forward(self, x: torch.Tensor) -> MorphAEusOutput:
        net = self.network
        h = x
        enc_taps = []
        for blk in net.encoder.blocks:
            tap = blk.conv(h)
            enc_taps.append(tap)
            h = original_swish(blk.norm(tap))
        z = h
        dec_taps = []
        for blk in net.decoder.blocks:
            tap = blk.conv(blk.upsample(z))
            dec_taps.append(tap)
            z = original_swish(blk.norm(tap))
        prior = torch.sigmoid(net.decoder.head(z))
        deformer = net.deformer
        if deformer is None:
            velocity = torch.zeros_like(x[:, :1]).expand(-1, 2, -1, -1).contiguous()
            return MorphAEusOutput(prior, prior, velocity, x)
        num_levels, num_stages = len(enc_taps), len(deformer.refine)
        for j, stage in enumerate(deformer.refine):
            k = num_stages - j
            feats = [enc_taps[k - 1], dec_taps[num_levels - 1 - k]] + ([h] if j > 0 else [])
            h = original_swish(stage.norm(stage.conv(torch.cat(feats, dim=1))))
        velocity = deformer.flow(h)
        pos_flow = self._integrate(velocity)
        reconstruction = self.warp(prior, pos_flow)
        if net.bidirectional:
            reversed_x = self.warp(x, self._integrate(-velocity))
        else:
            reversed_x = reconstruction
        return MorphAEusOutput(reconstruction, prior, velocity, reversed_x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The morphed reconstruction, the interface :class:`~medad_monai.networks.AnomalyMapNet` maps from (the
        original computes every output, reversed warp included)."""
        return self(x).reconstruction

    def _integrate(self, velocity: torch.Tensor) -> torch.Tensor:
        steps = self.network.int_steps
        v = velocity * (1.0 / 2**steps)
        for _ in range(steps):
            v = v + self.warp(v, v)
        return v

    # --------------------------------------------------------------------------------------------------------- loss

    def perceptual(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum over the feature layers of ``MSE(features(target), features(pred))``, both passes with autograd."""
        if self.vgg is None:
            raise RuntimeError("OriginalMorphAEus: the loss has no perceptual term.")
        if self.vgg[0].weight.device != pred.device:
            self.vgg.to(pred.device)
        feats = []
        for img in (pred, target):
            h = img.repeat(1, 3, 1, 1) if img.shape[1] == 1 else img
            out = []
            for i, layer in enumerate(self.vgg):
                h = layer(h)
                if i in self.feature_layers:
                    out.append(h)
            feats.append(out)
        loss = pred.new_zeros(())
        for fp, ft in zip(feats[0], feats[1]):
            loss = loss + F.mse_loss(ft, fp)
        return loss

    def loss(self, outputs: MorphAEusOutput, x: torch.Tensor) -> torch.Tensor:
        """The original trainer's loss at the schedule's current epoch (``loss.set_epoch`` of the given loss)."""
        rec, prior, velocity, rev = outputs
        s = self.schedule
        mse = F.mse_loss(prior, x)
        pl = self.perceptual(prior, x) if self.vgg is not None else None
        l_rec = mse + s.perceptual_weight * pl if pl is not None else mse
        total = l_rec
        terms = {"mse": float(mse.detach()), "perceptual": float(pl.detach()) if pl is not None else 0.0}
        if self.network.deformer is not None:
            if self.network.bidirectional:
                ncc = (original_ncc(x, rec) + original_ncc(prior, rev)) / 2
            else:
                ncc = original_ncc(x, rec)
            reg = MorphAEusLoss.regularizer(velocity)
            if s.deformation_active:
                total = l_rec + s.delta * (ncc + s.beta * reg)
            terms["ncc"], terms["reg"] = float(ncc.detach()), float(reg.detach())
        terms["total"] = float(total.detach())
        self.last_terms = terms
        return total
