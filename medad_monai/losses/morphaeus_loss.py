"""MorphAEus training loss with its warm-up and smoothness schedule, and the validation criterion.

**original** (``ci-ber/MorphAEus``, ``projects/23_morphaeus/MorphTrainer.py``, CXR config), per batch ``x``::

    L_Rec   = MSE(prior, x) + alpha * PL(prior, x)                                  alpha = 0.05
    L_Morph = (NCC(x, reconstruction) + NCC(prior, reversed)) / 2 + beta(t) * Reg(velocity)
    loss    = L_Rec                      while t <= 10   (t = 0-based epoch: warm-up, 11 epochs)
    loss    = L_Rec + delta * L_Morph    when  t > 10    delta = 1
    beta(t) = clip(beta_max * t / 200, 1e-3, beta_max)                              beta_max = 3

Without bidirectional training (``reversed`` is the reconstruction) ``L_Morph`` uses ``NCC(x, reconstruction)``
alone, as the original. The reconstruction terms act on the un-deformed prior.

**Epoch mapping (ours).** Ignite's epochs are 1-based; :meth:`MorphAEusLoss.set_epoch` takes that 1-based epoch
``e`` and uses the original's index ``t = e - 1`` in both formulas, unchanged. ``warmup_epochs`` is the original's
threshold (deformation terms on when ``t > warmup_epochs``), so the default 10 gives 11 warm-up epochs (Ignite 1-11)
and the deformation terms start at Ignite epoch 12 with ``beta = 0.165``; ``beta`` is 1.5 at Ignite epoch 101 and
3 from Ignite epoch 201 on, exactly the original's values for the same epoch of training.

**NCC** reuses MONAI's :class:`~monai.losses.LocalNormalizedCrossCorrelationLoss` (9x9 box window, zero padding,
squared local NCC): the original's ``1 - mean(cc)`` is ``1 + LNCC``. Only the stabilising constant differs: the
original computes ``cc = cross² / (max(var_I * var_J, 0) + 1e-5)``, MONAI ``cross² / (max(var_I, d) * max(var_J, d))``
with ``d = smooth_dr``. We set ``d = sqrt(1e-5)`` (``ncc_smooth_dr``), so that both floor the variance product at
1e-5: windows with contrast give the same cc, and flat windows give cc ~ 0 in both (with MONAI's default
``d = 1e-5`` the floor is 1e-10 and float round-off in flat windows yields spurious cc). Measured on 128x128 phantom
radiographs: |difference| <= 0.004 in the loss value. For multi-channel images MONAI correlates channel by channel;
the original sums the channels in its window (identical for 1-channel X-rays). Unlike the original (hard-coded
``"cuda"``) it runs on any device.

**Reg** is the original's ``gradient-l2`` (TransMorph ``DisplacementRegularizer2D``): central differences on interior
pixels, ``mean(dx² + dy²) / 2`` over batch, both components and pixels, on the velocity before integration. MONAI's
:class:`~monai.losses.DiffusionLoss` computes the same differences and ``mean(dx² + dy²)`` without the ``/ 2``, so
``Reg = DiffusionLoss()(v) / 2`` exactly (tested) and ``beta_max = 3`` keeps its meaning. It is computed here in a few
lines rather than through ``DiffusionLoss`` because MONAI 1.6.1's ``spatial_gradient`` indexes tensors with a list,
which torch warns about on every call as deprecated with a future change of meaning.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import LocalNormalizedCrossCorrelationLoss, SSIMLoss
from torch import nn

from medad_monai.losses.perceptual import VGG19PerceptualLoss

__all__ = ["MorphAEusLoss", "validation_criterion", "morphaeus_beta"]


def morphaeus_beta(epoch: int, beta_max: float = 3.0, beta_ramp_epochs: int = 200, beta_min: float = 1e-3) -> float:
    """The smoothness weight at 1-based epoch ``epoch``: ``clip(beta_max * (epoch - 1) / beta_ramp_epochs,
    beta_min, beta_max)`` (original formula on its 0-based epoch)."""
    t = max(int(epoch) - 1, 0)
    return float(np.clip(beta_max * t / beta_ramp_epochs, beta_min, beta_max))


def _unpack(outputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 4:
        got = type(outputs).__name__
        if isinstance(outputs, (tuple, list)):
            got += f" of length {len(outputs)}"
        raise TypeError(
            "MorphAEusLoss: outputs must be the MorphAEus network's (reconstruction, prior, velocity, reversed) "
            f"tuple, got {got}."
        )
    return outputs[0], outputs[1], outputs[2], outputs[3]


class MorphAEusLoss(nn.Module):
    """``L_Rec`` (MSE + perceptual on the prior) plus, after the warm-up, ``delta * L_Morph`` (NCC + beta * Reg).

    ``forward(outputs, target)`` takes the network's ``(reconstruction, prior, velocity, reversed)`` and the image
    batch (the image is its own target, :func:`medad_monai.engine.evaluator.prepare_image_batch`) and returns the scalar
    loss.
    :meth:`set_epoch` (called by :class:`medad_monai.engine.handlers.LossScheduleHandler` with Ignite's 1-based epoch)
    sets the schedule; see the module docstring for the exact epoch mapping. After each call ``last_terms`` holds the
    detached terms as floats: ``mse``, ``perceptual`` (and ``ssim`` when weighted), ``l_rec``, ``ncc``, ``reg``,
    ``beta``, ``deformation_on`` and ``total``. During the warm-up ``ncc`` and ``reg`` are still computed (without
    gradient) for monitoring, as the original logs them, but ``total`` leaves them out.

    Args:
        perceptual_weight: ``alpha``. 0 skips the VGG entirely (nothing built or run). (original: 0.05)
        delta: weight of ``L_Morph``. (original: 1)
        warmup_epochs: deformation terms are on when the 0-based epoch ``t = epoch - 1`` exceeds it. (original: 10)
        beta_max, beta_ramp_epochs, beta_min: ``beta(t) = clip(beta_max * t / beta_ramp_epochs, beta_min, beta_max)``.
            (original: 3, 200 (``max_iter``), 1e-3)
        ncc_kernel_size: NCC window side. (original: 9)
        ncc_smooth_dr: MONAI LNCC's per-window variance floor; ``sqrt(1e-5)`` matches the original's floor of the
            variance product (see the module docstring).
        vgg_weights_path, allow_random_weights, normalize_imagenet: passed to
            :class:`~medad_monai.losses.perceptual.VGG19PerceptualLoss` when ``perceptual_weight > 0``.
        deformation: whether the network deforms. ``None`` (default) detects the plain-autoencoder ablation
            (``MorphAEus(deformation=False)``) by its all-zero velocity and then skips NCC and Reg.
        ssim_weight: weight of a structural term ``1 - SSIM(prior, x)`` added to ``L_Rec`` (**ours**, default 0: not
            in the paper). MONAI's :class:`~monai.losses.SSIMLoss` (Gaussian window 11 px, sigma 1.5, data range 1;
            Wang et al. 2004). A texture-aware reconstruction term that needs no pretrained weights, for runs without
            the ImageNet VGG19 (the CPU demo). Logged as ``ssim`` in ``last_terms``.

    Example::

        >>> from medad_monai.networks import MorphAEus
        >>> net = MorphAEus(spatial_size=(64, 64), channels=(16, 32, 64, 128, 256, 256))
        >>> loss = MorphAEusLoss(perceptual_weight=0.0)
        >>> loss.set_epoch(12)  # first epoch with deformation terms
        >>> x = torch.rand(2, 1, 64, 64)
        >>> loss(net(x), x).backward()
    """

    def __init__(
        self,
        perceptual_weight: float = 0.05,
        delta: float = 1.0,
        warmup_epochs: int = 10,
        beta_max: float = 3.0,
        beta_ramp_epochs: int = 200,
        beta_min: float = 1e-3,
        ncc_kernel_size: int = 9,
        ncc_smooth_dr: float = math.sqrt(1e-5),
        vgg_weights_path: str | os.PathLike | None = None,
        allow_random_weights: bool = False,
        normalize_imagenet: bool = False,
        deformation: bool | None = None,
        ssim_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if beta_ramp_epochs <= 0:
            raise ValueError(f"MorphAEusLoss: beta_ramp_epochs must be > 0, got {beta_ramp_epochs}.")
        if perceptual_weight < 0 or delta < 0 or ssim_weight < 0:
            raise ValueError(
                f"MorphAEusLoss: weights must be >= 0, got alpha={perceptual_weight}, delta={delta}, "
                f"ssim_weight={ssim_weight}."
            )
        self.ssim_weight = float(ssim_weight)
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0) if self.ssim_weight > 0 else None
        self.perceptual_weight = float(perceptual_weight)
        self.delta = float(delta)
        self.warmup_epochs = int(warmup_epochs)
        self.beta_max = float(beta_max)
        self.beta_ramp_epochs = int(beta_ramp_epochs)
        self.beta_min = float(beta_min)
        self.deformation = deformation
        self.perceptual = (
            VGG19PerceptualLoss(
                weights_path=vgg_weights_path,
                allow_random_weights=allow_random_weights,
                normalize_imagenet=normalize_imagenet,
            )
            if self.perceptual_weight > 0
            else None
        )
        self.ncc = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=2, kernel_size=ncc_kernel_size, kernel_type="rectangular", smooth_dr=ncc_smooth_dr
        )
        self.epoch = 1
        self.last_terms: dict[str, float] = {}

    def set_epoch(self, epoch: int) -> None:
        """Sets the 1-based training epoch (Ignite's ``engine.state.epoch``) that the schedule follows."""
        if int(epoch) < 1:
            raise ValueError(f"MorphAEusLoss.set_epoch: epochs are 1-based (Ignite), got {epoch}.")
        self.epoch = int(epoch)

    @property
    def beta(self) -> float:
        """Smoothness weight at the current epoch."""
        return morphaeus_beta(self.epoch, self.beta_max, self.beta_ramp_epochs, self.beta_min)

    @property
    def deformation_active(self) -> bool:
        """Whether the deformation terms are in the loss at the current epoch (``epoch - 1 > warmup_epochs``)."""
        return self.epoch - 1 > self.warmup_epochs

    def ncc_loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The original's ``1 - mean(squared local NCC)`` via MONAI (0 for identical images with contrast)."""
        return 1.0 + self.ncc(b, a)

    @staticmethod
    def regularizer(velocity: torch.Tensor) -> torch.Tensor:
        """``gradient-l2`` of a ``(B, 2, H, W)`` field: ``mean(dx² + dy²) / 2``, central differences on interior
        pixels (``== DiffusionLoss()(velocity) / 2``)."""
        dh = (velocity[:, :, 2:, 1:-1] - velocity[:, :, :-2, 1:-1]) / 2
        dw = (velocity[:, :, 1:-1, 2:] - velocity[:, :, 1:-1, :-2]) / 2
        return 0.5 * (dh * dh + dw * dw).mean()

    def _morph_terms(self, x, rec, prior, velocity, rev) -> tuple[torch.Tensor, torch.Tensor]:
        if rev is rec or torch.equal(rev, rec):  # not bidirectional: the original's single-NCC branch
            ncc = self.ncc_loss(x, rec)
        else:
            ncc = 0.5 * (self.ncc_loss(x, rec) + self.ncc_loss(prior, rev))
        return ncc, self.regularizer(velocity)

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        """Returns the scalar training loss for the network ``outputs`` on the image batch ``target``."""
        rec, prior, velocity, rev = _unpack(outputs)
        if prior.shape != target.shape:
            raise ValueError(f"MorphAEusLoss: prior {tuple(prior.shape)} and image {tuple(target.shape)} differ.")
        mse = F.mse_loss(prior, target)
        if self.perceptual is not None:
            pl = self.perceptual(prior, target)
            l_rec = mse + self.perceptual_weight * pl
        else:
            pl = None
            l_rec = mse
        terms = {"mse": float(mse.detach()), "perceptual": float(pl.detach()) if pl is not None else 0.0}
        if self.ssim is not None:
            structural = self.ssim(prior, target)
            l_rec = l_rec + self.ssim_weight * structural
            terms["ssim"] = float(structural.detach())
        total = l_rec
        terms["l_rec"] = float(l_rec.detach())

        if self.deformation is None:
            deforms = bool(torch.count_nonzero(velocity.detach()) > 0)  # the ablation returns exact zeros
        else:
            deforms = self.deformation
        active = deforms and self.deformation_active
        beta = self.beta
        if deforms:
            if active:
                ncc, reg = self._morph_terms(target, rec, prior, velocity, rev)
                total = l_rec + self.delta * (ncc + beta * reg)
            else:
                with torch.no_grad():  # monitored only: the deformer gets no gradient during the warm-up
                    ncc, reg = self._morph_terms(target, rec, prior, velocity, rev)
            terms["ncc"] = float(ncc.detach())
            terms["reg"] = float(reg.detach())
        terms["beta"] = beta
        terms["deformation_on"] = float(active)
        terms["total"] = float(total.detach())
        self.last_terms = terms
        return total


def validation_criterion(outputs, x: torch.Tensor) -> torch.Tensor:
    """``(MSE(prior, x) + MSE(reconstruction, x)) / 2`` for the batch: the original's ``Val_loss_mse``, which selects
    the best checkpoint and drives early stopping (lower is better)."""
    rec, prior, _, _ = _unpack(outputs)
    return 0.5 * (F.mse_loss(prior, x) + F.mse_loss(rec, x))
