"""Anomaly maps, image scores and the output contract shared by every method.

Conventions shared by the whole package: images are ``(B, C, H, W)`` float in [0, 1]; anomaly
maps are ``(B, 1, H, W)``, non-negative and never normalised per image; an image score is one float per image and
higher means more anomalous. A pixel or image is predicted anomalous when its value is **strictly greater** than the
calibrated threshold (:mod:`medad_monai.evaluation.calibration` chooses thresholds so that this rule gives at most the
target false-positive rate on the healthy calibration data).

Every function accepts torch tensors (including MONAI ``MetaTensor``) or numpy arrays and returns torch tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d

__all__ = [
    "SCORE_METHODS",
    "to_tensor",
    "residual_map",
    "residual_error",
    "MAP_RESIDUALS",
    "ssim_error",
    "aggregate_score",
    "gaussian_smooth",
    "gaussian_kernel_1d",
    "separable_smooth",
    "AnomalyOutput",
    "apply_thresholds",
]

#: image-score aggregations understood by :func:`aggregate_score`.
SCORE_METHODS = ("mean", "max", "topk", "percentile")


def to_tensor(x: Any, name: str = "input", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``x`` as a plain ``torch.Tensor`` (numpy arrays, lists, numbers and MONAI ``MetaTensor`` accepted).

    Args:
        x: the data.
        name: used in the error message.
        dtype: optional dtype to cast to.

    Raises:
        TypeError: when ``x`` cannot be turned into a tensor.
    """
    if isinstance(x, torch.Tensor):
        t = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> Tensor, drops the metadata
    elif isinstance(x, np.ndarray):
        arr = np.ascontiguousarray(x)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # torch warns on read-only memory
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as e:  # noqa: BLE001 - re-raised with the argument's name
            raise TypeError(
                f"medad_monai.evaluation.scoring: {name} must be a torch tensor or numpy array, got {type(x)!r}."
            ) from e
    return t.to(dtype) if dtype is not None and t.dtype != dtype else t


def _check_map(anomaly_map: torch.Tensor, name: str = "anomaly_map") -> None:
    if anomaly_map.ndim < 3:
        raise ValueError(
            f"medad_monai.evaluation.scoring: {name} must be batched (B, 1, H, W) (or (B, 1, *spatial)), got shape "
            f"{tuple(anomaly_map.shape)}."
        )


def residual_map(image: Any, reconstruction: Any, kind: str = "l1") -> torch.Tensor:
    """Per-pixel reconstruction residual, averaged over channels to one map channel.

    ``"l1"`` is ``|x - x_rec|``, the residual of the original MorphAEus code (Bercea et al., MICCAI 2023);
    ``"l2"`` is ``(x - x_rec)^2`` (the usual AE residual, e.g. MedIAnomaly's AE). Averaging over channels (for RGB
    endoscopy in MemMC-MAE) is our choice: it keeps maps one-channel and on the same scale as grayscale maps.

    Args:
        image: ``(B, C, *spatial)`` input.
        reconstruction: same shape as ``image``.
        kind: ``"l1"`` or ``"l2"``.

    Returns:
        ``(B, 1, *spatial)`` non-negative map in the image's floating dtype.

    Example::

        >>> x = torch.rand(2, 3, 8, 8)
        >>> residual_map(x, torch.zeros_like(x)).shape
        torch.Size([2, 1, 8, 8])
    """
    x = to_tensor(image, "image")
    r = to_tensor(reconstruction, "reconstruction")
    if x.shape != r.shape:
        raise ValueError(
            f"medad_monai.evaluation.scoring.residual_map: image {tuple(x.shape)} and reconstruction {tuple(r.shape)} must have "
            "the same shape."
        )
    if x.ndim < 3:
        raise ValueError(f"medad_monai.evaluation.scoring.residual_map: expected (B, C, H, W), got {tuple(x.shape)}.")
    if not x.is_floating_point():
        x = x.float()
    if kind not in ("l1", "l2"):
        raise ValueError(f"medad_monai.evaluation.scoring.residual_map: kind must be 'l1' or 'l2', got {kind!r}.")
    return residual_error(x, r.to(x.dtype), kind)


def residual_error(image: torch.Tensor, reconstruction: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """The arithmetic of :func:`residual_map` on plain tensors, without its conversions and checks: ``|x - x_rec|``
    (``"l1"``) or ``(x - x_rec)^2`` (``"l2"``), averaged over channels. TorchScript-compatible; it is what
    :class:`~medad_monai.networks.AnomalyMapNet` computes inside exported models.

    Args:
        image: ``(B, C, *spatial)`` tensor.
        reconstruction: a tensor of the same shape (the difference follows torch's type promotion).
        kind: ``"l1"`` or ``"l2"``.

    Returns:
        ``(B, 1, *spatial)`` non-negative map.
    """
    diff = image - reconstruction
    if kind == "l1":
        err = diff.abs()
    elif kind == "l2":
        err = diff * diff
    else:
        raise ValueError("medad_monai.evaluation.scoring.residual_error: kind must be 'l1' or 'l2', got " + kind + ".")
    return err.mean(dim=1, keepdim=True)


#: how a map is made from an image and its reconstruction (:class:`~medad_monai.networks.AnomalyMapNet`
#: ``map_residual``): ``"abs"`` smooths ``|x - x_rec|``, ``"signed"`` smooths ``x - x_rec`` before its magnitude,
#: ``"ssim"`` is ``1 - SSIM`` in a Gaussian window (:func:`ssim_error`).
MAP_RESIDUALS: tuple[str, ...] = ("abs", "signed", "ssim")

#: SSIM's stabilising constants for images in [0, 1] (Wang et al. 2004: ``(0.01 L)^2`` and ``(0.03 L)^2``, ``L = 1``).
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def ssim_error(
    image: torch.Tensor,
    reconstruction: torch.Tensor,
    kernels: list[torch.Tensor],
    c1: float = SSIM_C1,
    c2: float = SSIM_C2,
) -> torch.Tensor:
    """Per-pixel structural dissimilarity ``1 - SSIM(x, x_rec)``, averaged over channels.

    SSIM (Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to structural
    similarity", IEEE TIP 2004) compares local means, contrasts and correlation in a Gaussian window; it is the map of
    the SSIM autoencoder (Bergmann et al., VISAPP 2019), which scores a region whose texture or contrast differs even
    when its intensity residual is small. Window: the separable ``kernels`` (:func:`gaussian_kernel_1d`; SSIM's
    customary sigma is 1.5 px), applied by :func:`separable_smooth` with replicate padding so the map keeps the
    image's size (MONAI's ``compute_ssim_and_cs`` filters without padding, returns a smaller map and rescales the
    variances to sample variances). Wang et al.'s population statistics and constants for a data range of 1.
    TorchScript-compatible.

    Args:
        image: ``(B, C, *spatial)`` floating tensor in [0, 1].
        reconstruction: a tensor of the same shape.
        kernels: one odd-length 1-D window per spatial dimension.
        c1, c2: the stabilising constants (default :data:`SSIM_C1`, :data:`SSIM_C2`).

    Returns:
        ``(B, 1, *spatial)`` map in [0, 2] (0 where the two agree in mean, contrast and structure).
    """
    c = image.shape[1]
    stats = separable_smooth(
        torch.cat([image, reconstruction, image * image, reconstruction * reconstruction, image * reconstruction], 1),
        kernels,
    )
    mu_x, mu_y = stats[:, :c], stats[:, c : 2 * c]
    var_x = stats[:, 2 * c : 3 * c] - mu_x * mu_x
    var_y = stats[:, 3 * c : 4 * c] - mu_y * mu_y
    cov = stats[:, 4 * c :] - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return (1.0 - ssim).mean(dim=1, keepdim=True)


def _n_top(n: torch.Tensor, percentile: float) -> torch.Tensor:
    """Number of pixels in the top ``(100 - percentile)`` % of ``n`` pixels: ``max(1, ceil(n * (100 - p) / 100))``."""
    # the 1e-9 keeps an exact product such as 100 * 1 % = 1 from rounding up to 2 through representation error
    k = torch.ceil(n.double() * (100.0 - percentile) / 100.0 - 1e-9).long()
    return k.clamp(min=1)


def aggregate_score(
    anomaly_map: Any, method: str = "mean", percentile: float = 99.0, mask: Any | None = None
) -> torch.Tensor:
    """Reduce anomaly maps to one score per image (vectorised over the batch, no Python loop over images).

    Methods:

    - ``"mean"``: mean of the map, the image score of the MorphAEus paper and of MedIAnomaly.
    - ``"max"``: maximum of the map.
    - ``"topk"``: mean of the top ``k = max(1, ceil(n * (100 - percentile) / 100))`` pixels of the ``n`` pixels,
      i.e. of the pixels above the ``percentile``-th percentile (top 1 % by default). Our choice of a robust
      alternative to ``"max"``.
    - ``"percentile"``: the ``percentile``-th percentile of the map, linearly interpolated like ``numpy.percentile``.

    Args:
        anomaly_map: ``(B, 1, *spatial)`` map (any number of channels is accepted; all values of an image are pooled).
        method: one of :data:`SCORE_METHODS`.
        percentile: in [0, 100], used by ``"topk"`` and ``"percentile"``.
        mask: optional ``(B, 1, *spatial)`` (or broadcastable) region; only pixels where ``mask > 0`` count. An image
            whose mask is empty gets a NaN score and a warning.

    Returns:
        ``(B,)`` float tensor in the map's floating dtype.

    Example::

        >>> m = torch.arange(100.0).view(1, 1, 10, 10)
        >>> aggregate_score(m, "topk", percentile=95.0)  # mean of 95..99
        tensor([97.])
    """
    amap = to_tensor(anomaly_map, "anomaly_map")
    _check_map(amap)
    if method not in SCORE_METHODS:
        raise ValueError(f"medad_monai.evaluation.scoring.aggregate_score: method must be one of {SCORE_METHODS}, got {method!r}.")
    percentile = float(percentile)
    if method in ("topk", "percentile") and not 0.0 <= percentile <= 100.0:
        raise ValueError(f"medad_monai.evaluation.scoring.aggregate_score: percentile must be in [0, 100], got {percentile}.")
    if not amap.is_floating_point():
        amap = amap.float()
    b = amap.shape[0]
    flat = amap.reshape(b, -1)
    if mask is None:
        if method == "mean":
            return flat.mean(dim=1)
        if method == "max":
            return flat.amax(dim=1)
        valid = None
        n = torch.full((b,), flat.shape[1], dtype=torch.long, device=flat.device)
    else:
        m = to_tensor(mask, "mask").to(flat.device)
        try:
            m = torch.broadcast_to(m > 0, amap.shape).reshape(b, -1)
        except RuntimeError as e:
            raise ValueError(
                f"medad_monai.evaluation.scoring.aggregate_score: mask {tuple(m.shape)} does not broadcast to the map "
                f"{tuple(amap.shape)}."
            ) from e
        valid = m
        n = valid.sum(dim=1)
        if bool((n == 0).any()):
            warnings.warn(
                f"medad_monai.evaluation.scoring.aggregate_score: {int((n == 0).sum())} image(s) have an empty mask; their score "
                "is NaN.",
                stacklevel=2,
            )
        if method == "mean":
            return torch.where(valid, flat, torch.zeros_like(flat)).sum(dim=1) / n.to(flat.dtype)
        if method == "max":
            out = torch.where(valid, flat, torch.full_like(flat, -math.inf)).amax(dim=1)
            return torch.where(n > 0, out, torch.full_like(out, math.nan))
    if method == "topk":
        work = flat if valid is None else torch.where(valid, flat, torch.full_like(flat, -math.inf))
        srt = torch.sort(work, dim=1, descending=True).values
        k = _n_top(n, percentile).clamp(max=max(flat.shape[1], 1))
        csum = torch.cumsum(srt.double().nan_to_num(neginf=0.0), dim=1)
        out = csum.gather(1, (k - 1).unsqueeze(1)).squeeze(1) / k.double()
        out = out.to(flat.dtype)
        return torch.where(n > 0, out, torch.full_like(out, math.nan))
    # percentile: numpy's default "linear" rule, position (n - 1) * p / 100 among the n sorted valid pixels
    work = flat if valid is None else torch.where(valid, flat, torch.full_like(flat, math.inf))
    srt = torch.sort(work, dim=1).values
    pos = (n.clamp(min=1) - 1).double() * (percentile / 100.0)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = (pos - lo.double()).to(flat.dtype)
    v_lo = srt.gather(1, lo.unsqueeze(1)).squeeze(1)
    v_hi = srt.gather(1, hi.unsqueeze(1)).squeeze(1)
    out = v_lo + (v_hi - v_lo) * frac
    out = torch.where(hi == lo, v_lo, out)  # avoids inf - inf when a value is infinite
    return torch.where(n > 0, out, torch.full_like(out, math.nan))


def gaussian_smooth(anomaly_map: Any, sigma: float | tuple[float, ...] = 0.0, truncated: float = 4.0) -> torch.Tensor:
    """Optional Gaussian post-processing of anomaly maps (``sigma = 0`` returns the input unchanged).

    Uses MONAI's ``gaussian_1d`` kernels (:func:`gaussian_kernel_1d`) in a separable filter
    (:func:`separable_smooth`, what MONAI's ``GaussianFilter`` does), with **replicate** padding instead of
    ``GaussianFilter``'s zero padding, so that the map is not darkened along the image border (our choice; zero
    padding would hide anomalies that touch the border). :class:`~medad_monai.networks.AnomalyMapNet` smooths with
    the same two functions.

    Args:
        anomaly_map: ``(B, C, *spatial)`` maps.
        sigma: standard deviation in pixels, one value or one per spatial dimension.
        truncated: kernel radius in standard deviations (MONAI's default 4).

    Returns:
        smoothed maps, same shape and dtype.

    Example::

        >>> m = torch.zeros(1, 1, 9, 9); m[..., 4, 4] = 1.0
        >>> float(gaussian_smooth(m, 1.0).sum())  # mass is preserved away from the border  # doctest: +ELLIPSIS
        0.99...
    """
    amap = to_tensor(anomaly_map, "anomaly_map")
    _check_map(amap)
    sigmas = [float(s) for s in (sigma if isinstance(sigma, (tuple, list)) else [sigma] * (amap.ndim - 2))]
    if len(sigmas) != amap.ndim - 2:
        raise ValueError(
            f"medad_monai.evaluation.scoring.gaussian_smooth: {len(sigmas)} sigmas for {amap.ndim - 2} spatial dimensions."
        )
    if any(s < 0 for s in sigmas):
        raise ValueError(f"medad_monai.evaluation.scoring.gaussian_smooth: sigma must be >= 0, got {sigma}.")
    if all(s == 0 for s in sigmas):
        return amap
    if len(sigmas) > 3:
        raise ValueError(
            f"medad_monai.evaluation.scoring.gaussian_smooth: 1 to 3 spatial dimensions are supported, got {len(sigmas)}."
        )
    if not amap.is_floating_point():
        amap = amap.float()
    return separable_smooth(amap, [gaussian_kernel_1d(s, truncated) for s in sigmas])


def gaussian_kernel_1d(sigma: float, truncated: float = 4.0) -> torch.Tensor:
    """The normalised 1-D Gaussian kernel of :func:`gaussian_smooth` and
    :class:`~medad_monai.networks.AnomalyMapNet`: MONAI's ``gaussian_1d`` (``approx="erf"``), float32, radius
    ``truncated`` standard deviations; ``[1.]`` (no smoothing) when ``sigma`` is 0.

    Example::

        >>> k = gaussian_kernel_1d(1.0)
        >>> k.shape, round(float(k.sum()), 6)
        (torch.Size([9]), 1.0)
    """
    sigma = float(sigma)
    if sigma <= 0:
        return torch.ones(1)
    return gaussian_1d(torch.tensor(sigma), truncated=truncated, approx="erf", normalize=True).float()


def separable_smooth(amap: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
    """Separable filtering of ``(B, C, *spatial)`` maps (1 to 3 spatial dimensions) with **replicate** padding:
    the input is padded once on every side, then filtered along each spatial dimension in turn, each channel on
    its own (a ``[1.]`` kernel leaves its dimension unchanged). The one smoothing of the package
    (:func:`gaussian_smooth`, :meth:`AnomalyMapNet.smooth <medad_monai.networks.AnomalyMapNet.smooth>`);
    TorchScript-compatible, so exported models smooth exactly as the bundles do.

    Args:
        amap: ``(B, C, *spatial)`` floating tensor.
        kernels: one odd-length 1-D kernel per spatial dimension (cast to the map's dtype and device).

    Returns:
        the filtered maps, same shape and dtype.
    """
    n = amap.dim() - 2
    c = amap.shape[1]
    pad: list[int] = []
    for d in range(n - 1, -1, -1):  # F.pad lists the last dimension first
        r = (kernels[d].shape[0] - 1) // 2
        pad += [r, r]
    out = F.pad(amap, pad, mode="replicate")
    for d in range(n):
        k = kernels[d].to(device=amap.device, dtype=amap.dtype)
        view = [1] * (n + 2)
        view[d + 2] = -1
        weight = k.view(view).expand([c] + view[1:])
        if n == 1:
            out = F.conv1d(out, weight, groups=c)
        elif n == 2:
            out = F.conv2d(out, weight, groups=c)
        else:
            out = F.conv3d(out, weight, groups=c)
    return out


@dataclass
class AnomalyOutput:
    """Per-batch predictions, with the field names of anomalib's ``ImageBatch`` (anchors §1).

    Attributes:
        pred_score: ``(B,)`` float image scores (raw, not normalised).
        pred_label: ``(B,)`` int64, 1 = anomalous, 0 = normal, -1 = undecided (no calibration given).
        anomaly_map: ``(B, 1, *spatial)`` float raw anomaly map.
        pred_mask: ``(B, 1, *spatial)`` bool, ``anomaly_map > pixel_threshold`` (all False without calibration).
    """

    pred_score: torch.Tensor
    pred_label: torch.Tensor
    anomaly_map: torch.Tensor
    pred_mask: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _threshold(calibration: Any, name: str) -> float:
    value = calibration[name] if isinstance(calibration, Mapping) else getattr(calibration, name, None)
    if value is None:
        raise ValueError(f"medad_monai.evaluation.scoring.apply_thresholds: the calibration has no {name!r}.")
    return float(value)


def apply_thresholds(anomaly_map: Any, scores: Any | None = None, calibration: Any | None = None) -> AnomalyOutput:
    """Fill labels and masks from a calibration: anomalous when **strictly above** the threshold.

    Args:
        anomaly_map: ``(B, 1, *spatial)`` raw maps.
        scores: ``(B,)`` image scores; when ``None`` they are computed with the calibration's ``score_method`` and
            ``percentile`` (``"mean"`` without a calibration).
        calibration: a :class:`~medad_monai.evaluation.calibration.Calibration` (or a mapping with ``image_threshold``
            and ``pixel_threshold``); ``None`` gives ``pred_label = -1`` and empty masks.

    Returns:
        :class:`AnomalyOutput`.

    Example::

        >>> out = apply_thresholds(torch.rand(2, 1, 8, 8), calibration={"image_threshold": 0.5, "pixel_threshold": 0.9})
        >>> out.pred_label.dtype, out.pred_mask.dtype
        (torch.int64, torch.bool)
    """
    amap = to_tensor(anomaly_map, "anomaly_map")
    _check_map(amap)
    if scores is None:
        method = getattr(calibration, "score_method", "mean") if calibration is not None else "mean"
        pct = getattr(calibration, "percentile", 99.0) if calibration is not None else 99.0
        if isinstance(calibration, Mapping):
            method, pct = calibration.get("score_method", "mean"), calibration.get("percentile", 99.0)
        score = aggregate_score(amap, method=method, percentile=pct)
    else:
        score = to_tensor(scores, "scores").reshape(-1).to(amap.device)
        if score.shape[0] != amap.shape[0]:
            raise ValueError(
                f"medad_monai.evaluation.scoring.apply_thresholds: {score.shape[0]} scores for {amap.shape[0]} maps."
            )
    if calibration is None:
        label = torch.full((amap.shape[0],), -1, dtype=torch.long, device=amap.device)
        mask = torch.zeros_like(amap, dtype=torch.bool)
    else:
        label = (score > _threshold(calibration, "image_threshold")).long()
        mask = amap > _threshold(calibration, "pixel_threshold")
    return AnomalyOutput(pred_score=score, pred_label=label, anomaly_map=amap, pred_mask=mask)
