"""The references every method must beat, as networks: the mean healthy image and the healthy principal subspace.

Both are fitted on healthy training images (``fit``) instead of trained, keep what they fitted as buffers (so
``model.pt`` is a plain state dict, and an unfitted instance loads a fitted one of any image shape), and offer the
interface of the reconstruction networks (``reconstruct``, and ``predict_anomaly`` where the map is not the plain
residual), so :class:`~medad_monai.networks.AnomalyMapNet` wraps them like MorphAEus and MemMC-MAE. In a bundle they
are a model like the others: ``configs/mean_image.json`` and ``configs/pca.json`` fit, calibrate, evaluate, infer,
export and serve them through the same configs and predictor (:mod:`medad_monai.evaluation.predictor`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medad_monai.evaluation.scoring import residual_error, to_tensor

__all__ = ["MeanImageBaseline", "PCABaseline"]


def _adopt_fitted_shapes(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, names: Sequence[str]) -> None:
    """Resizes a baseline's buffers to the stored shapes before ``load_state_dict`` copies into them: the image shape
    is only known after ``fit``, so an unfitted instance must be able to load a fitted one."""
    for name in names:
        key = prefix + name
        if key in state_dict and state_dict[key].shape != getattr(module, name).shape:
            setattr(module, name, torch.empty_like(state_dict[key], device=getattr(module, name).device))


class MeanImageBaseline(nn.Module):
    """The trivial baseline every method must beat: distance to the mean healthy training image.

    ``fit`` accumulates the per-pixel mean (and standard deviation) of healthy training images; the anomaly map is
    ``|x - mean|`` averaged over channels, or the z-score ``|x - mean| / max(std, min_std)`` when ``use_std=True``.
    Reporting a trivial intensity baseline follows Meissen et al. (anchors §2.6); the mean-image form is our choice.

    The statistics are buffers, so the fitted baseline is saved and restored with ``state_dict``/``torch.save`` and
    wraps into :class:`~medad_monai.networks.AnomalyMapNet` like a trained network. A fresh, unfitted instance loads
    a fitted state dict of any image shape (the buffers are resized on load).

    Args:
        use_std: return z-scores instead of absolute differences.
        min_std: floor of the per-pixel standard deviation in the z-score (our choice: 1 % of the [0, 1] intensity
            range), so that constant background pixels do not produce huge z-scores.

    Example::

        >>> base = MeanImageBaseline()
        >>> _ = base.fit([torch.rand(4, 1, 16, 16) for _ in range(3)])
        >>> base(torch.rand(2, 1, 16, 16)).shape
        torch.Size([2, 1, 16, 16])
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor

    def __init__(self, use_std: bool = False, min_std: float = 0.01) -> None:
        super().__init__()
        if min_std <= 0:
            raise ValueError(f"medad_monai.networks.MeanImageBaseline: min_std must be > 0, got {min_std}.")
        self.use_std = bool(use_std)
        self.min_std = float(min_std)
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.zeros(0))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        shape = tuple(self.mean.shape)
        return f"use_std={self.use_std}, min_std={self.min_std}, fitted_on={int(self.count)}, shape={shape}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _adopt_fitted_shapes(self, state_dict, prefix, ("mean", "std"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit(self, batches: Iterable[Any]) -> MeanImageBaseline:
        """Accumulate the per-pixel mean and standard deviation of healthy images.

        Args:
            batches: iterable of ``(B, C, *spatial)`` tensors/arrays, or of dicts with an ``"image"`` entry (MONAI
                loader batches). Sums are kept in float64 so long streams do not lose precision.

        Returns:
            ``self`` (fitted).
        """
        total = total_sq = None
        n = 0
        for batch in batches:
            x = batch["image"] if isinstance(batch, Mapping) else batch
            x = to_tensor(x, "batch").double()
            if x.ndim < 3:
                raise ValueError(
                    f"medad_monai.networks.MeanImageBaseline.fit: batches must be (B, C, H, W), got {tuple(x.shape)}."
                )
            if total is None:
                total = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
                total_sq = torch.zeros_like(total)
            elif x.shape[1:] != total.shape:
                raise ValueError(
                    "medad_monai.networks.MeanImageBaseline.fit: all images must share one shape; got "
                    f"{tuple(x.shape[1:])} after {tuple(total.shape)}. Resize them in the transforms first."
                )
            total += x.sum(dim=0)
            total_sq += (x * x).sum(dim=0)
            n += x.shape[0]
        if total is None or n == 0:
            raise ValueError("medad_monai.networks.MeanImageBaseline.fit: got no images.")
        mean = total / n
        var = (total_sq / n - mean * mean).clamp(min=0.0)
        if n > 1:
            var = var * (n / (n - 1))  # unbiased sample variance
        device = self.mean.device
        self.mean = mean.float().unsqueeze(0).to(device)
        self.std = var.sqrt().float().unsqueeze(0).to(device)
        self.count = torch.tensor(n, dtype=torch.long, device=device)
        return self

    def _check_ready(self, x: torch.Tensor) -> None:
        if int(self.count) == 0 or self.mean.numel() == 0:
            raise RuntimeError("medad_monai.networks.MeanImageBaseline: call fit() (or load a fitted state dict) first.")
        if x.shape[1:] != self.mean.shape[1:]:
            raise ValueError(
                f"medad_monai.networks.MeanImageBaseline: input {tuple(x.shape[1:])} does not match the fitted image "
                f"shape {tuple(self.mean.shape[1:])}."
            )

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The 'reconstruction' of every image: the mean healthy image, broadcast to the batch."""
        x = to_tensor(x, "x")
        self._check_ready(x)
        mean = self.mean.to(dtype=x.dtype if x.is_floating_point() else torch.float32)
        return mean.expand(x.shape[0], *self.mean.shape[1:])

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *spatial)`` map: ``|x - mean|`` (or its z-score) averaged over channels."""
        x = to_tensor(x, "x")
        self._check_ready(x)
        if not x.is_floating_point():
            x = x.float()
        diff = (x - self.mean.to(x.dtype)).abs()
        if self.use_std:
            diff = diff / self.std.to(x.dtype).clamp(min=self.min_std)
        return diff.mean(dim=1, keepdim=True)

    def predict_anomaly(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, anomaly_map)``: the map is :meth:`anomaly_map` (the z-score with ``use_std``), not only
        the residual :class:`AnomalyMapNet` would make of :meth:`reconstruct`."""
        return self.reconstruct(x), self.anomaly_map(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.anomaly_map(x)


class PCABaseline(nn.Module):
    """A classical, non-deep reference: reconstruction by the principal components of healthy training images.

    ``fit`` centres the flattened healthy images on their mean and keeps the ``k`` leading principal components, the
    fewest that explain ``variance`` of the training variance (``k <= max_components``); an image is reconstructed
    as ``mean + (x - mean) V_k V_k^T`` and the anomaly map is ``|x - reconstruction|`` averaged over channels. This
    is the linear autoencoder every reconstruction method generalises (PCA for anomaly detection, e.g. the
    reconstruction-error detectors of Shyu et al. 2003); ``k`` is set on the training data only, never on test
    labels. Same interface as the networks (``reconstruct``; ``fit`` instead of training), so it is calibrated,
    evaluated, exported and served like them.

    Args:
        variance: fraction of the training variance the kept components explain (0 < variance <= 1).
        max_components: upper bound on ``k``.

    Example::

        >>> pca = PCABaseline(variance=0.9)
        >>> _ = pca.fit([torch.rand(8, 1, 16, 16) for _ in range(4)])
        >>> pca(torch.rand(2, 1, 16, 16)).shape
        torch.Size([2, 1, 16, 16])
    """

    mean: torch.Tensor
    components: torch.Tensor

    def __init__(self, variance: float = 0.95, max_components: int = 256) -> None:
        super().__init__()
        if not 0.0 < variance <= 1.0:
            raise ValueError(f"medad_monai.networks.PCABaseline: variance must be in (0, 1], got {variance}.")
        if max_components < 1:
            raise ValueError(f"medad_monai.networks.PCABaseline: max_components must be >= 1, got {max_components}.")
        self.variance = float(variance)
        self.max_components = int(max_components)
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("components", torch.zeros(0))

    def extra_repr(self) -> str:
        return f"variance={self.variance}, components={tuple(self.components.shape)}, shape={tuple(self.mean.shape)}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _adopt_fitted_shapes(self, state_dict, prefix, ("mean", "components"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit(self, batches: Iterable[Any]) -> PCABaseline:
        """Fits mean and components on healthy images (``(B, C, H, W)`` tensors or dicts with ``"image"``).

        Returns:
            ``self`` (fitted).
        """
        rows = []
        shape = None
        for batch in batches:
            x = to_tensor(batch["image"] if isinstance(batch, Mapping) else batch, "batch").double()
            if x.ndim < 3:
                raise ValueError(f"medad_monai.networks.PCABaseline.fit: batches must be (B, C, H, W), got {tuple(x.shape)}.")
            if shape is not None and x.shape[1:] != shape:
                raise ValueError(
                    f"medad_monai.networks.PCABaseline.fit: all images must share one shape; got {tuple(x.shape[1:])} "
                    f"after {tuple(shape)}. Resize them in the transforms first."
                )
            shape = x.shape[1:]
            rows.append(x.reshape(x.shape[0], -1))
        if not rows:
            raise ValueError("medad_monai.networks.PCABaseline.fit: got no images.")
        data = torch.cat(rows)
        if data.shape[0] < 2:
            raise ValueError("medad_monai.networks.PCABaseline.fit: needs at least 2 images.")
        mean = data.mean(dim=0)
        _, sing, vt = torch.linalg.svd(data - mean, full_matrices=False)
        explained = torch.cumsum(sing**2, 0) / (sing**2).sum().clamp(min=1e-30)
        k = int(torch.searchsorted(explained, torch.tensor(self.variance, dtype=explained.dtype)).item()) + 1
        k = max(1, min(k, self.max_components, vt.shape[0]))
        device = self.mean.device
        self.mean = mean.float().reshape(1, *shape).to(device)
        self.components = vt[:k].float().to(device)
        return self

    def _check_ready(self, x: torch.Tensor) -> None:
        if self.components.numel() == 0:
            raise RuntimeError("medad_monai.networks.PCABaseline: call fit() (or load a fitted state dict) first.")
        if x.shape[1:] != self.mean.shape[1:]:
            raise ValueError(
                f"medad_monai.networks.PCABaseline: input {tuple(x.shape[1:])} does not match the fitted image shape "
                f"{tuple(self.mean.shape[1:])}."
            )

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``mean + (x - mean) V_k V_k^T``, the projection onto the healthy principal subspace."""
        x = to_tensor(x, "x")
        self._check_ready(x)
        x = x if x.is_floating_point() else x.float()
        flat = (x - self.mean.to(x.dtype)).reshape(x.shape[0], -1)
        v = self.components.to(x.dtype)
        return (flat @ v.T @ v).reshape(x.shape) + self.mean.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``|x - reconstruction|`` averaged over channels (the map :class:`AnomalyMapNet` makes of it)."""
        x = to_tensor(x, "x")
        return residual_error(x if x.is_floating_point() else x.float(), self.reconstruct(x), "l1")
