"""Label-free thresholds and display normalisation fitted on **healthy validation images only**.

No anomaly label is used anywhere here. The image threshold is a high quantile of healthy image scores and the pixel
threshold a high quantile of healthy pixel values, chosen so that on the calibration data at most the target
false-positive rate (FPR) is flagged. This is the deployable alternative to thresholds tuned on labelled anomalies
(anomalib's F1-adaptive threshold on a validation split that contains anomalies, anchors §1 and §4 #1); the
pixel-level default of 5 % healthy-pixel FPR is the convention of Bercea et al.'s GenAI_UAD benchmark
(``DownstreamEvaluator.thresholding``: thresholds with <= 1/2/5 % pixel FPR on healthy validation data, 5 % used).

Threshold rule (our choice, tested): for ``n`` healthy values and a target ``fpr`` the threshold is the
``k``-th smallest value with ``k = n - floor(n * fpr)`` (1-based), i.e. the empirical ``(1 - fpr)`` quantile with the
inverted-CDF rule (``numpy.quantile(..., method="inverted_cdf")``). With the decision "anomalous if value > threshold"
at most ``floor(n * fpr)`` calibration values are flagged (fewer with ties), so the empirical FPR never exceeds the
target, and it is the smallest sample value with that property. Interpolating rules ("linear") can exceed the target.

Pixels can be many (1000 images x 128^2 = 16M values), so :class:`CalibrationAccumulator` keeps them exactly up to
``max_pixels`` (default 2^24, 64 MiB of float32) and beyond that a deterministic uniform reservoir sample of that
size (Vitter's Algorithm R, seeded). For a uniform sample of ``K`` pixels the FPR that the sampled quantile achieves on
all pixels has a standard deviation of about ``sqrt(fpr * (1 - fpr) / K)`` (5e-5 at the defaults, 3 sigma < 2e-4).
Pixel mean, std, min and max are always exact (running sums in float64).

Display normalisation (dataset level, never per image, anchors §4 #2; anomalib-style): with ``lo``/``hi`` the
0.1 % / 99.9 % quantiles of healthy values, ``norm(x) = clamp((x - threshold) / (hi - lo) + 0.5, 0, 1)``; the
threshold maps to 0.5 (``hi - lo`` falls back to ``max - min`` and then to 1 when degenerate).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from medad_monai.evaluation.scoring import MAP_RESIDUALS, SCORE_METHODS, aggregate_score, to_tensor

__all__ = [
    "CALIBRATION_VERSION",
    "QUANTILE_LEVELS",
    "Calibration",
    "CalibrationAccumulator",
    "Reservoir",
    "fit_calibration",
    "fpr_threshold",
]

#: version of the JSON layout written by :meth:`Calibration.save`.
CALIBRATION_VERSION = 1
#: quantile levels stored as healthy statistics (0.001 and 0.999 drive the display normalisation).
QUANTILE_LEVELS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
#: default cap of exactly kept calibration pixels (2^24 float32 = 64 MiB).
DEFAULT_MAX_PIXELS = 1 << 24


def _n_above(n: int, fpr: float) -> int:
    # 1e-9 absorbs representation error, e.g. 100 * 0.07 = 7.000000000000001 but 100 * 0.29 = 28.999999999999996
    return int(math.floor(n * fpr + 1e-9))


def _sorted_quantile(sorted_values: torch.Tensor, q: float) -> float:
    """Inverted-CDF quantile of an ascending 1-D tensor: the ``ceil(n * q)``-th smallest value (1-based, >= 1)."""
    n = sorted_values.numel()
    k = min(max(int(math.ceil(n * q - 1e-9)), 1), n)
    return float(sorted_values[k - 1])


def _sorted_fpr_threshold(sorted_values: torch.Tensor, fpr: float) -> float:
    """The ``(n - floor(n * fpr))``-th smallest value of an ascending 1-D tensor (see :func:`fpr_threshold`)."""
    n = sorted_values.numel()
    return float(sorted_values[max(n - _n_above(n, fpr), 1) - 1])


def fpr_threshold(values: Any, fpr: float) -> float:
    """Smallest healthy value ``t`` such that at most ``floor(n * fpr)`` of the ``n`` values are ``> t``.

    Equal to ``numpy.quantile(values, 1 - fpr, method="inverted_cdf")`` (up to floating-point rounding of
    ``n * fpr``). ``fpr = 0`` gives the maximum.

    Args:
        values: healthy scores or pixel values, any shape (flattened).
        fpr: target false-positive rate in [0, 1).

    Example::

        >>> fpr_threshold(torch.arange(1.0, 101.0), 0.05)  # 5 of 100 values (96..100) lie above 95
        95.0
    """
    v = to_tensor(values, "values").reshape(-1)
    _check_fpr(fpr, "fpr")
    _check_values(v, "values")
    n = v.numel()
    k = n - _n_above(n, fpr)  # 1-based rank of the threshold
    return float(torch.kthvalue(v.float() if not v.is_floating_point() else v, max(k, 1)).values)


def _check_fpr(fpr: float, name: str) -> None:
    if not (isinstance(fpr, (int, float)) and 0.0 <= float(fpr) < 1.0):
        raise ValueError(f"medad_monai.evaluation.calibration: {name} must be in [0, 1), got {fpr!r}.")


def _check_values(v: torch.Tensor, name: str) -> None:
    if v.numel() == 0:
        raise ValueError(
            f"medad_monai.evaluation.calibration: got no {name}; calibration needs at least one healthy validation image."
        )
    if v.is_floating_point():
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise ValueError(
                f"medad_monai.evaluation.calibration: {bad} of {v.numel()} {name} are NaN or infinite; the model or its input "
                "produced non-finite anomaly maps (check the checkpoint and the intensity transforms)."
            )


def _stats(sorted_sample: torch.Tensor, mean: float, std: float, vmin: float, vmax: float) -> dict[str, Any]:
    return {
        "mean": mean,
        "std": std,
        "min": vmin,
        "max": vmax,
        "quantiles": {f"{q:g}": _sorted_quantile(sorted_sample, q) for q in QUANTILE_LEVELS},
    }


def _norm_scale(stats: dict[str, Any]) -> float:
    q = stats.get("quantiles", {})
    lo, hi = q.get("0.001"), q.get("0.999")
    if lo is not None and hi is not None and hi > lo:
        return float(hi - lo)
    if stats.get("max") is not None and stats.get("min") is not None and stats["max"] > stats["min"]:
        return float(stats["max"] - stats["min"])
    return 1.0


def _normalize(x: Any, threshold: float, scale: float) -> Any:
    if isinstance(x, (int, float, np.number)):
        return float(min(max((x - threshold) / scale + 0.5, 0.0), 1.0))
    is_numpy = isinstance(x, np.ndarray)
    t = to_tensor(x, "x")
    if not t.is_floating_point():
        t = t.float()
    out = ((t - threshold) / scale + 0.5).clamp(0.0, 1.0)
    return out.numpy() if is_numpy else out


@dataclass
class Calibration:
    """Thresholds and healthy statistics of one trained model; saved next to the model as JSON.

    Attributes:
        image_threshold: an image is anomalous when its score is ``> image_threshold``.
        pixel_threshold: a pixel is anomalous when its map value is ``> pixel_threshold``.
        image_fpr, pixel_fpr: the target false-positive rates the thresholds were fitted for.
        score_method, percentile: the :func:`~medad_monai.evaluation.scoring.aggregate_score` settings of the image
            scores.
        map_sigma: Gaussian smoothing (pixels) of the maps the thresholds were fitted on
            (:class:`~medad_monai.networks.AnomalyMapNet` ``smooth_sigma``; 0 = none, also for files written before it
            was recorded).
        map_residual: ``"abs"``, ``"signed"`` or ``"ssim"`` (:class:`~medad_monai.networks.AnomalyMapNet`;
            ``"abs"`` in files written before it was recorded).
        map_normalization: the healthy per-pixel statistics the maps were normalised with
            (:meth:`MapNormalizer.state <medad_monai.networks.MapNormalizer.state>`), empty when they were not.
        n_images: healthy images used.
        n_pixels: healthy pixels seen (all of them, even when only a sample was kept).
        pixel_sample_size: pixels the pixel quantiles were computed from (``== n_pixels`` when exact).
        image_stats, pixel_stats: ``mean, std, min, max`` and ``quantiles`` (keys ``"0.001"`` ... ``"0.999"``) of
            healthy image scores and healthy pixel values.
        extra: free-form provenance (method, checkpoint, data list, ...), written to the JSON unchanged.

    Example::

        >>> cal = fit_calibration(torch.rand(100), torch.rand(100, 1, 8, 8))
        >>> round(float(cal.normalize_map(cal.pixel_threshold)), 3)
        0.5
    """

    image_threshold: float
    pixel_threshold: float
    image_fpr: float = 0.05
    pixel_fpr: float = 0.05
    score_method: str = "mean"
    percentile: float = 99.0
    map_sigma: float = 0.0
    map_residual: str = "abs"
    map_normalization: dict[str, Any] = field(default_factory=dict)
    n_images: int = 0
    n_pixels: int = 0
    pixel_sample_size: int = 0
    image_stats: dict[str, Any] = field(default_factory=dict)
    pixel_stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: what the thresholds were fitted for (:func:`medad_monai.evaluation.model_record.network_record`); empty in older
    #: files.
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("image_threshold", "pixel_threshold"):
            value = getattr(self, name)
            if value is None or not math.isfinite(float(value)):
                raise ValueError(f"medad_monai.evaluation.calibration.Calibration: {name} must be a finite number, got {value!r}.")
            setattr(self, name, float(value))
        _check_fpr(self.image_fpr, "image_fpr")
        _check_fpr(self.pixel_fpr, "pixel_fpr")
        if self.score_method not in SCORE_METHODS:
            raise ValueError(
                f"medad_monai.evaluation.calibration.Calibration: score_method must be one of {SCORE_METHODS}, got "
                f"{self.score_method!r}."
            )
        self.percentile = float(self.percentile)
        self.map_sigma = float(self.map_sigma)
        if self.map_residual not in MAP_RESIDUALS:
            raise ValueError(
                f"medad_monai.evaluation.calibration.Calibration: map_residual must be one of {MAP_RESIDUALS}, got "
                f"{self.map_residual!r}."
            )
        self.map_normalization = dict(self.map_normalization or {})
        self.n_images, self.n_pixels, self.pixel_sample_size = (
            int(self.n_images),
            int(self.n_pixels),
            int(self.pixel_sample_size),
        )

    def fits_map_sigma(self, sigma: float) -> bool:
        """Whether maps smoothed with ``sigma`` px are the ones these thresholds were fitted on."""
        return abs(float(sigma) - self.map_sigma) <= 1e-9

    # -- display normalisation -------------------------------------------------------------------------------------
    @property
    def pixel_norm_scale(self) -> float:
        """``q99.9 - q0.1`` of healthy pixels (fallbacks: ``max - min``, then 1)."""
        return _norm_scale(self.pixel_stats)

    @property
    def image_norm_scale(self) -> float:
        """``q99.9 - q0.1`` of healthy image scores (fallbacks: ``max - min``, then 1)."""
        return _norm_scale(self.image_stats)

    def normalize_map(self, anomaly_map: Any) -> Any:
        """Dataset-level display normalisation of raw maps: ``clamp((x - pixel_threshold) / scale + 0.5, 0, 1)``.

        The pixel threshold maps to 0.5; ``scale`` is :attr:`pixel_norm_scale`. Never per image. Returns the input's
        kind (torch tensor, numpy array or float).
        """
        return _normalize(anomaly_map, self.pixel_threshold, self.pixel_norm_scale)

    def normalize_score(self, score: Any) -> Any:
        """Same as :meth:`normalize_map` for image scores, with the image threshold and :attr:`image_norm_scale`."""
        return _normalize(score, self.image_threshold, self.image_norm_scale)

    # -- (de)serialisation -----------------------------------------------------------------------------------------
    def describe(self) -> str:
        """One paragraph saying how the numbers were computed (stored in the JSON as ``description``)."""
        pixels = (
            f"all {self.n_pixels} healthy pixels"
            if self.pixel_sample_size >= self.n_pixels
            else f"a uniform deterministic reservoir sample of {self.pixel_sample_size} of {self.n_pixels} healthy "
            "pixels (mean/std/min/max exact)"
        )
        recipe = f"maps smoothed with sigma={self.map_sigma:g} px, {self.map_residual} residual"
        if self.map_normalization:
            recipe += (
                f", each pixel normalised against {self.map_normalization.get('n_images', 0)} healthy maps "
                "(leave-one-out for the calibration images themselves)"
            )
        return (
            f"Fitted on healthy validation images only ({self.n_images} images, no anomaly labels). image_threshold is "
            f"the empirical {1 - self.image_fpr:g} quantile (inverted CDF) of the image scores "
            f"(aggregate_score method={self.score_method!r}, percentile={self.percentile:g}, {recipe}), so at most "
            f"{self.image_fpr:g} of the calibration images score strictly above it. pixel_threshold is the same "
            f"{1 - self.pixel_fpr:g} quantile over {pixels}. Decision rule: anomalous if value > threshold. Display "
            "normalisation: clamp((x - threshold) / (q0.999 - q0.001) + 0.5, 0, 1) with healthy quantiles."
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``version`` and ``description`` first."""
        return {"version": CALIBRATION_VERSION, "description": self.describe(), **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "calibration dict") -> Calibration:
        """Inverse of :meth:`to_dict`; ``description`` is ignored and unknown keys are dropped with a warning."""
        if not isinstance(data, dict):
            raise ValueError(f"medad_monai.evaluation.calibration: {source} must hold a JSON object, got {type(data).__name__}.")
        version = data.get("version", CALIBRATION_VERSION)
        if not isinstance(version, int) or version > CALIBRATION_VERSION:
            raise ValueError(
                f"medad_monai.evaluation.calibration: {source} has version {version!r}; this medad_monai reads versions up to "
                f"{CALIBRATION_VERSION}. Upgrade medad_monai or re-run the calibration."
            )
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("image_threshold", "pixel_threshold") if k not in data]
        if missing:
            raise ValueError(f"medad_monai.evaluation.calibration: {source} lacks {missing}.")
        unknown = sorted(set(data) - known - {"version", "description"})
        if unknown:
            warnings.warn(f"medad_monai.evaluation.calibration: ignoring unknown keys {unknown} in {source}.", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        """Write human-readable JSON (standard JSON: no NaN/Infinity)."""
        from medad_monai.io.outputs import write_json_atomic

        write_json_atomic(self.to_dict(), path, allow_nan=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read a file written by :meth:`save`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"medad_monai.evaluation.calibration: no calibration file at {os.path.abspath(path)}; run the bundle's "
                "'calibration' workflow first."
            )
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"medad_monai.evaluation.calibration: {path} is not valid JSON ({e}).") from e
        return cls.from_dict(data, source=str(path))

    # -- tensors that travel with an export ------------------------------------------------------------------------
    #: order of the values in :meth:`as_tensor`.
    TENSOR_FIELDS = ("image_threshold", "pixel_threshold", "image_norm_scale", "pixel_norm_scale")

    def as_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[image_threshold, pixel_threshold, image_norm_scale, pixel_norm_scale]`` (see :attr:`TENSOR_FIELDS`)."""
        return torch.tensor([float(getattr(self, k)) for k in self.TENSOR_FIELDS], dtype=dtype)

    def register_buffers(self, module: torch.nn.Module, prefix: str = "calibration_") -> torch.nn.Module:
        """Register each :attr:`TENSOR_FIELDS` value as a scalar buffer (``<prefix><field>``) of ``module``.

        The buffers are part of ``state_dict`` and of TorchScript/ONNX exports, so the deployed model carries its
        thresholds (anomalib keeps them as buffers for the same reason). Existing buffers are overwritten.

        Example::

            >>> net = torch.nn.Identity()
            >>> _ = fit_calibration(torch.rand(10), torch.rand(10, 1, 4, 4)).register_buffers(net)
            >>> sorted(net.state_dict())[:2]
            ['calibration_image_norm_scale', 'calibration_image_threshold']
        """
        for name, value in zip(self.TENSOR_FIELDS, self.as_tensor()):
            key = prefix + name
            if key in dict(module.named_buffers(recurse=False)):
                setattr(module, key, value.clone())  # keeps the buffer's persistence
            else:
                module.register_buffer(key, value.clone())
        return module


class Reservoir:
    """Exact storage of 1-D streams up to ``capacity`` rows, then a uniform reservoir sample of that many rows.

    The bounded pixel memory of :class:`CalibrationAccumulator` and
    :class:`~medad_monai.evaluation.metrics.AnomalyMetricAccumulator`. Several aligned columns (e.g. pixel value and
    pixel label) are sampled together. Algorithm R (Vitter 1985), vectorised per update: row ``i`` (0-based,
    ``i >= capacity``) replaces slot ``floor(u * (i + 1))`` when that is ``< capacity``; when several rows of one
    update hit the same slot the last one wins, as in the sequential algorithm. Deterministic for a given seed and
    sequence of updates.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"medad_monai: the sample capacity must be >= 1, got {capacity}.")
        self.capacity = int(capacity)
        self.seen = 0
        self._chunks: list[tuple[torch.Tensor, ...]] = []
        self._buf: tuple[torch.Tensor, ...] | None = None
        self._gen = torch.Generator().manual_seed(int(seed))

    @property
    def exact(self) -> bool:
        """True while every row seen is kept."""
        return self.seen <= self.capacity

    def add(self, *columns: torch.Tensor) -> None:
        """Add aligned rows, one tensor per column (flattened; every column the same length)."""
        cols = tuple(c.reshape(-1) for c in columns)
        m = cols[0].numel()
        if any(c.numel() != m for c in cols):
            raise ValueError("medad_monai: reservoir columns must have the same length.")
        if m == 0:
            return
        if self._buf is None:
            room = self.capacity - self.seen
            if room > 0:
                self._chunks.append(tuple(c[:room].clone() for c in cols))
                taken = min(room, m)
                self.seen += taken
                if taken == m:
                    return
                cols = tuple(c[taken:] for c in cols)
                m = cols[0].numel()
            self._buf = tuple(torch.cat(parts) for parts in zip(*self._chunks))
            self._chunks = []
        pos = torch.arange(self.seen, self.seen + m, dtype=torch.float64)
        slot = (torch.rand(m, generator=self._gen, dtype=torch.float64) * (pos + 1)).floor().long()
        self.seen += m
        hit = torch.nonzero(slot < self.capacity).squeeze(1)
        if hit.numel() == 0:
            return
        uniq, inverse = torch.unique(slot[hit], return_inverse=True)
        last = torch.full((uniq.numel(),), -1, dtype=torch.long).scatter_reduce(0, inverse, hit, reduce="amax")
        for buf, c in zip(self._buf, cols):
            buf[uniq] = c[last].to(buf.dtype)

    def columns(self) -> tuple[torch.Tensor, ...] | None:
        """The kept rows, one tensor per column; ``None`` before any row was added."""
        if self._buf is not None:
            return self._buf
        if not self._chunks:
            return None
        return tuple(torch.cat(parts) for parts in zip(*self._chunks))


class CalibrationAccumulator:
    """Streaming calibration on healthy validation batches with bounded memory.

    Image scores are all kept (one float per image). Pixels are kept exactly up to ``max_pixels`` and then as a
    uniform reservoir sample of ``max_pixels`` values (see the module docstring for the error bound); running
    float64 sums give exact pixel mean/std and exact min/max.

    Args:
        image_fpr: target image FPR on healthy data (default 0.05).
        pixel_fpr: target pixel FPR on healthy data (default 0.05, GenAI_UAD's <= 5 % healthy-pixel convention).
        score_method, percentile: the aggregation used for the scores (stored; also used to compute scores when
            :meth:`update` gets none).
        max_pixels: pixels kept exactly before switching to the reservoir sample.
        seed: seed of the reservoir sample.
        extra: provenance copied into :attr:`Calibration.extra`.

    Example::

        >>> acc = CalibrationAccumulator()
        >>> for _ in range(3):
        ...     maps = torch.rand(8, 1, 16, 16)
        ...     acc.update(maps, maps.mean(dim=(1, 2, 3)))
        >>> acc.compute().n_images
        24
    """

    def __init__(
        self,
        image_fpr: float = 0.05,
        pixel_fpr: float = 0.05,
        score_method: str = "mean",
        percentile: float = 99.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        seed: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        _check_fpr(image_fpr, "image_fpr")
        _check_fpr(pixel_fpr, "pixel_fpr")
        if score_method not in SCORE_METHODS:
            raise ValueError(
                f"medad_monai.evaluation.calibration: score_method must be one of {SCORE_METHODS}, got {score_method!r}."
            )
        self.image_fpr = float(image_fpr)
        self.pixel_fpr = float(pixel_fpr)
        self.score_method = score_method
        self.percentile = float(percentile)
        self.max_pixels = int(max_pixels)
        self.seed = int(seed)
        self.extra = dict(extra or {})
        self.reset()

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._pixels = Reservoir(self.max_pixels, self.seed)
        self._sum = 0.0
        self._sumsq = 0.0
        self._min = math.inf
        self._max = -math.inf

    def add_scores(self, scores: Any) -> None:
        """Add healthy image scores (any shape, flattened)."""
        s = to_tensor(scores, "scores").detach().reshape(-1).cpu().double()
        if s.numel():
            _check_values(s, "image scores")
        self._scores.append(s)

    def add_pixels(self, values: Any, mask: Any | None = None) -> None:
        """Add healthy pixel values (any shape); with ``mask``, only where ``mask > 0``."""
        v = to_tensor(values, "maps").detach()
        if mask is not None:
            m = to_tensor(mask, "mask").to(v.device)
            try:
                v = v[torch.broadcast_to(m > 0, v.shape)]
            except RuntimeError as e:
                raise ValueError(
                    f"medad_monai.evaluation.calibration: mask {tuple(m.shape)} does not broadcast to the maps {tuple(v.shape)}."
                ) from e
        v = v.reshape(-1).cpu().float()
        if v.numel() == 0:
            return
        _check_values(v, "pixel values")
        vd = v.double()
        self._sum += float(vd.sum())
        self._sumsq += float((vd * vd).sum())
        self._min = min(self._min, float(v.min()))
        self._max = max(self._max, float(v.max()))
        self._pixels.add(v)

    def update(self, maps: Any, scores: Any | None = None, mask: Any | None = None) -> None:
        """Add one batch of healthy ``(B, 1, H, W)`` maps and their ``(B,)`` image scores.

        Args:
            maps: raw anomaly maps of healthy validation images.
            scores: their image scores; computed from ``maps`` with ``score_method``/``percentile`` (and ``mask``)
                when ``None``.
            mask: optional ``(B, 1, H, W)`` region (e.g. a body mask); pixels outside do not count.
        """
        m = to_tensor(maps, "maps")
        if scores is None:
            scores = aggregate_score(m, method=self.score_method, percentile=self.percentile, mask=mask)
        s = to_tensor(scores, "scores").reshape(-1)
        if m.ndim >= 3 and s.numel() != m.shape[0]:
            raise ValueError(f"medad_monai.evaluation.calibration: {s.numel()} scores for a batch of {m.shape[0]} maps.")
        self.add_scores(s)
        self.add_pixels(m, mask)

    def image_scores(self) -> torch.Tensor:
        """Every image score added so far, in order, as one float64 tensor (empty when none)."""
        return torch.cat(self._scores) if self._scores else torch.zeros(0, dtype=torch.float64)

    def pixel_sample(self) -> torch.Tensor:
        """The pixel values kept so far: all of them up to ``max_pixels``, then the reservoir sample (empty when
        none). A distributed run gathers these, and :meth:`image_scores`, from every rank before fitting
        (:class:`~medad_monai.engine.handlers.CalibrationHandler`)."""
        return self._pixels.columns()[0] if self._pixels.seen else torch.zeros(0)

    def compute(self) -> Calibration:
        """Fit the thresholds; raises ``ValueError`` when no image or no pixel was added."""
        scores = self.image_scores()
        if scores.numel() == 0:
            raise ValueError(
                "medad_monai.evaluation.calibration: got no images; calibration needs at least one healthy validation image "
                "(check the 'validation' section of the datalist)."
            )
        if self._pixels.seen == 0:
            raise ValueError("medad_monai.evaluation.calibration: got no pixels (empty maps or empty masks).")
        s_sorted = torch.sort(scores).values
        p_sorted = torch.sort(self._pixels.columns()[0]).values
        n = self._pixels.seen
        p_mean = self._sum / n
        p_std = math.sqrt(max(self._sumsq / n - p_mean * p_mean, 0.0))
        return Calibration(
            image_threshold=_sorted_fpr_threshold(s_sorted, self.image_fpr),
            pixel_threshold=_sorted_fpr_threshold(p_sorted, self.pixel_fpr),
            image_fpr=self.image_fpr,
            pixel_fpr=self.pixel_fpr,
            score_method=self.score_method,
            percentile=self.percentile,
            n_images=int(scores.numel()),
            n_pixels=int(n),
            pixel_sample_size=int(p_sorted.numel()),
            image_stats=_stats(
                s_sorted,
                float(scores.mean()),
                float(scores.std(unbiased=False)),
                float(s_sorted[0]),
                float(s_sorted[-1]),
            ),
            pixel_stats=_stats(p_sorted, p_mean, p_std, self._min, self._max),
            extra=dict(self.extra),
        )


def fit_calibration(
    image_scores: Any,
    pixel_values_or_maps: Any,
    image_fpr: float = 0.05,
    pixel_fpr: float = 0.05,
    score_method: str = "mean",
    percentile: float = 99.0,
    mask: Any | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    map_sigma: float = 0.0,
) -> Calibration:
    """Fit a :class:`Calibration` from healthy scores and healthy pixels held in memory.

    Args:
        image_scores: ``(N,)`` scores of healthy validation images (computed with ``score_method``/``percentile``).
        pixel_values_or_maps: their maps ``(N, 1, H, W)`` or any array of healthy pixel values (flattened).
        image_fpr: target image FPR (default 0.05).
        pixel_fpr: target pixel FPR (default 0.05, Bercea et al.'s GenAI_UAD convention of <= 5 % on healthy val).
        score_method, percentile: recorded with the thresholds (they must match the evaluation's).
        mask: optional region for the pixels (broadcast to ``pixel_values_or_maps``).
        max_pixels, seed: see :class:`CalibrationAccumulator`.
        extra: provenance stored in the result.
        map_sigma: Gaussian smoothing (pixels) the maps were made with (recorded).

    Raises:
        ValueError: no images, no pixels, or NaN/infinite values.

    Example::

        >>> cal = fit_calibration(torch.arange(1.0, 101.0), torch.rand(100, 1, 8, 8), image_fpr=0.05)
        >>> cal.image_threshold
        95.0
    """
    acc = CalibrationAccumulator(
        image_fpr=image_fpr,
        pixel_fpr=pixel_fpr,
        score_method=score_method,
        percentile=percentile,
        max_pixels=max_pixels,
        seed=seed,
        extra=extra,
    )
    acc.add_scores(image_scores)
    acc.add_pixels(pixel_values_or_maps, mask)
    cal = acc.compute()
    cal.map_sigma = float(map_sigma)
    return cal
