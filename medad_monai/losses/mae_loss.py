"""Masked reconstruction loss for MemMC-MAE (and any MAE returning ``(pred_patches, mask)``).

The MemMC-MAE paper's loss is not public (only its abstract is); this is MAE's ``forward_loss``
(``facebookresearch/mae`` ``models_mae.py``): per-patch mean squared error, averaged over the masked patches only,
optionally on per-patch normalised targets (``norm_pix_loss``). No memory regulariser is added (M²'s memory has none
either).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medad_monai.networks.memmc_mae import normalize_patches, patchify

__all__ = ["MaskedReconstructionLoss", "validation_criterion"]


def _patch_size(pred: torch.Tensor, x: torch.Tensor, patch_size: Sequence[int] | int | None) -> list[int]:
    """The patch size given, or the isotropic one implied by ``pred (B, N, P*C)`` and ``x (B, C, *spatial)``."""
    spatial = list(x.shape[2:])
    if patch_size is not None:
        ps = [int(patch_size)] * len(spatial) if isinstance(patch_size, int) else [int(p) for p in patch_size]
    else:
        n, channels = pred.shape[1], x.shape[1]
        volume = pred.shape[2] // channels if channels else 0
        side = round(volume ** (1.0 / len(spatial))) if volume > 0 else 0
        ps = [side] * len(spatial)
        if side < 1 or side ** len(spatial) * channels != pred.shape[2] or math.prod(s // side for s in spatial) != n:
            raise ValueError(
                f"mae_loss: cannot infer an isotropic patch size from pred {tuple(pred.shape)} and image "
                f"{tuple(x.shape)}; pass patch_size."
            )
    if len(ps) != len(spatial) or any(s % p for s, p in zip(spatial, ps)):
        raise ValueError(f"mae_loss: patch_size {ps} does not tile the image {tuple(x.shape)}.")
    return ps


def _per_patch_mse(outputs, x: torch.Tensor, norm_pix_loss: bool, patch_size) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(outputs, (tuple, list)) or len(outputs) < 2:
        raise TypeError("mae_loss: outputs must be the network's (pred_patches, mask) pair.")
    pred, mask = outputs[0], outputs[1]
    target = patchify(x, _patch_size(pred, x, patch_size))
    if target.shape != pred.shape:
        raise ValueError(
            f"mae_loss: pred {tuple(pred.shape)} does not match the patchified image {tuple(target.shape)}."
        )
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    mask = mask.to(per_patch.dtype)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0).expand_as(per_patch)
    return per_patch, mask


class MaskedReconstructionLoss(nn.Module):
    """MAE's reconstruction loss: MSE per patch, averaged over the masked patches (``mask == 1``).

    ``forward(outputs, x)`` takes the network's ``(pred_patches, mask)`` and the image batch, so it plugs into
    ``SupervisedTrainer`` with :func:`medad_monai.engine.evaluator.prepare_image_batch` (the image is its own target).

    Args:
        norm_pix_loss: normalise each target patch by its own mean and std (MAE option). Must equal the network's
            ``norm_pix_loss`` so that its anomaly maps are computed in the same space.
        masked_only: average over masked patches only (MAE, default) or over all patches.
        patch_size: the network's patch size; None infers an isotropic one from the shapes.

    ``last_terms`` holds, after each call, ``loss``, ``mse_masked`` and ``mse_visible`` (floats) for logging;
    ``set_epoch`` is a no-op kept for API parity with epoch-scheduled losses.

    Example::

        >>> from medad_monai.networks.memmc_mae import MemMCMAE
        >>> net = MemMCMAE(img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4,
        ...                decoder_hidden_size=32, decoder_mlp_dim=64, decoder_num_layers=1, decoder_num_heads=4)
        >>> x = torch.rand(2, 1, 32, 32)
        >>> MaskedReconstructionLoss()(net(x), x).shape
        torch.Size([])
    """

    def __init__(
        self, norm_pix_loss: bool = False, masked_only: bool = True, patch_size: Sequence[int] | int | None = None
    ) -> None:
        super().__init__()
        self.norm_pix_loss = norm_pix_loss
        self.masked_only = masked_only
        self.patch_size = patch_size
        self.last_terms: dict[str, float] = {}

    def set_epoch(self, epoch: int) -> None:
        """No schedule: present so that the shared loss-schedule handler can treat every loss alike."""

    def forward(self, outputs, x: torch.Tensor) -> torch.Tensor:
        per_patch, mask = _per_patch_mse(outputs, x, self.norm_pix_loss, self.patch_size)
        n_masked = mask.sum()
        n_visible = mask.numel() - n_masked
        masked = (per_patch * mask).sum() / n_masked.clamp_min(1.0)
        visible = (per_patch * (1.0 - mask)).sum() / n_visible.clamp_min(1.0)
        loss = masked if self.masked_only else per_patch.mean()
        self.last_terms = {
            "loss": float(loss.detach()),
            "mse_masked": float(masked.detach()),
            "mse_visible": float(visible.detach()),
        }
        return loss


def validation_criterion(outputs, x: torch.Tensor) -> torch.Tensor:
    """Masked-patch MSE in pixel space (lower is better), for label-free checkpoint selection.

    Use it with the network in eval mode and ``eval_masking="fixed"`` (the default), so that the validation masks do
    not change between epochs. For a network trained with ``norm_pix_loss=True`` use
    ``MaskedReconstructionLoss(norm_pix_loss=True)`` instead: its predictions are not in pixel space.
    """
    per_patch, mask = _per_patch_mse(outputs, x, False, None)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
