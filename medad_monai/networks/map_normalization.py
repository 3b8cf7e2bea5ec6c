"""Healthy map normalisation: each pixel of an anomaly map measured against what healthy images give at that pixel.

A reconstruction model is not equally good everywhere. On real chest radiographs its residual is large and variable
along body edges, the heart border, the arms, text markers and collimation, and small in the lung fields, so the
largest residual of a healthy image is usually a border, and a lesion of moderate contrast does not reach it. The
normalisation turns the map into a per-pixel z-value against the healthy calibration images (fitted on the same list
as the thresholds, :mod:`medad_monai.evaluation.calibration`)::

    z(p) = max(0, (m(p) - mean_healthy(p)) / max(std_healthy(p), floor))

with the floor the median of ``std_healthy`` over the image, so that pixels where every healthy map is the same do
not explode. Negative values (less residual than healthy images have there) are set to 0: a map stays "how
anomalous", never below normal.

This is a standard normative-modelling step (per-location healthy statistics of a deviation measure), not part of
either paper: MorphAEus and MemMC-MAE score the raw residual. It is a documented option of both bundles
(``map_normalization: "healthy"``), off in their paper configurations and on in the CPU demo configuration, where it
was chosen on a development set of synthetic lesions on real *validation* radiographs (never the test split); its
effect on the real-image benchmark is in the README.

``map_normalization: "healthy_lungs"`` also restricts the normalised map to the lung fields of a chest radiograph,
estimated from the same healthy calibration images: the pixels at or below the :data:`LUNG_QUANTILE` quantile of
their mean intensity (the lungs are the darkest part of a radiograph); the map is 0 elsewhere, so neither the image
score nor a pixel decision is made outside them. On the real development set (children of the Kermany test folder
that no test section holds; README, "Quality on real radiographs") it raised the image AUROC of all six models
compared (MorphAEus 0.620 -> 0.658, PCA 0.580 -> 0.636, MemMC-MAE 0.436 -> 0.505), quantile 0.4 chosen over 0.5 there.
Radiographs only: for colour endoscopy frames "darkest" means nothing anatomical; use ``"healthy"``.

Calibration fits the statistics and the thresholds on the same healthy images. A threshold fitted on images that
were part of their own normalisation is too low (an image cannot be far from a mean it is part of), so during
calibration each image is normalised with the statistics of the *other* images (leave-one-out, exact from the
per-pixel sums; :meth:`HealthyMapStatistics.leave_one_out`), and the thresholds keep their false-positive rate on
new healthy images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["MAP_NORMALIZATIONS", "LUNG_QUANTILE", "HealthyMapStatistics", "MapNormalizer"]

#: accepted values of ``map_normalization``.
MAP_NORMALIZATIONS: tuple[str, ...] = ("none", "healthy", "healthy_lungs")
#: ``"healthy_lungs"``: the lung fields are the pixels at or below this quantile of the healthy images' mean intensity.
LUNG_QUANTILE = 0.4
#: the quantile of the per-pixel healthy spread used as its floor.
STD_FLOOR_QUANTILE = 0.5


class HealthyMapStatistics:
    """Per-pixel count, sum and sum of squares of healthy anomaly maps (float64), mergeable across processes.

    Example::

        >>> stats = HealthyMapStatistics()
        >>> stats.update(torch.rand(10, 1, 8, 8))
        >>> mean, std = stats.mean_std()
        >>> mean.shape, stats.n
        (torch.Size([1, 8, 8]), 10)
    """

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None
        self.image_sum: torch.Tensor | None = None  # channel-mean intensity of the images, for the lung region

    def update(self, maps: torch.Tensor, images: torch.Tensor | None = None) -> None:
        """Adds a batch of ``(B, C, H, W)`` maps (and the images they were made from, for :meth:`lung_region`)."""
        if images is not None:
            if images.shape[1] != 1:
                raise ValueError(
                    "map_normalization 'healthy_lungs' finds the lung fields of greyscale radiographs; these images "
                    f"have {images.shape[1]} channels. Use --map_normalization healthy for colour images."
                )
            im = images.detach().to("cpu", torch.float64).mean(dim=1, keepdim=True).sum(0)
            self.image_sum = im if self.image_sum is None else self.image_sum + im
        m = maps.detach().to("cpu", torch.float64)
        if self.sum is None:
            self.sum, self.sum_sq = torch.zeros(m.shape[1:], dtype=torch.float64), torch.zeros(m.shape[1:], dtype=torch.float64)
        elif m.shape[1:] != self.sum.shape:
            raise ValueError(
                f"Healthy map statistics: a map of shape {tuple(m.shape[1:])} after maps of shape {tuple(self.sum.shape)}; "
                "every calibration image must have the same size (the preprocessing resizes them: check spatial_size)."
            )
        self.n += m.shape[0]
        self.sum += m.sum(0)
        self.sum_sq += (m * m).sum(0)

    def all_reduce(self) -> None:
        """Sums the statistics of every process when ``torch.distributed`` is initialised (no-op otherwise)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or self.sum is None:
            return
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        parts = [torch.tensor([float(self.n)], dtype=torch.float64), self.sum.flatten(), self.sum_sq.flatten()]
        if self.image_sum is not None:
            parts.append(self.image_sum.flatten())
        packed = torch.cat(parts).to(backend_device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        k = self.sum.numel()
        self.n = int(round(packed[0].item()))
        self.sum = packed[1 : 1 + k].view_as(self.sum)
        self.sum_sq = packed[1 + k : 1 + 2 * k].view_as(self.sum_sq)
        if self.image_sum is not None:
            self.image_sum = packed[1 + 2 * k :].view_as(self.image_sum)

    @staticmethod
    def _mean_std(n: int, s1: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = s1 / n
        var = (s2 - n * mean * mean) / max(n - 1, 1)
        return mean, var.clamp_min(0).sqrt()

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` per pixel, ``(C, H, W)`` float64 (sample standard deviation)."""
        if self.sum is None or self.n < 3:
            raise ValueError(
                f"Healthy map normalisation needs at least 3 healthy calibration images, got {self.n}; give a longer "
                "validation list or run with --map_normalization none."
            )
        return self._mean_std(self.n, self.sum, self.sum_sq)

    def lung_region(self, quantile: float = LUNG_QUANTILE) -> torch.Tensor:
        """``(1, H, W)`` float 0/1: pixels whose mean healthy intensity is at or below its ``quantile`` quantile."""
        if self.image_sum is None or self.n < 3:
            raise ValueError(
                "map_normalization 'healthy_lungs' needs the healthy calibration images themselves (at least 3); "
                f"got {self.n} maps and {'no' if self.image_sum is None else 'their'} images."
            )
        mean = self.image_sum / self.n
        return (mean <= torch.quantile(mean.flatten(), float(quantile))).to(torch.float32)

    def std_floor(self, std: torch.Tensor | None = None) -> float:
        """The floor of the per-pixel spread: its :data:`STD_FLOOR_QUANTILE` quantile (``std`` if already computed)."""
        std = self.mean_std()[1] if std is None else std
        return float(torch.quantile(std.flatten().float(), STD_FLOOR_QUANTILE))

    def leave_one_out(self, maps: torch.Tensor, floor: float) -> torch.Tensor:
        """Normalises each of ``maps`` (images that are part of these statistics) with the statistics of the others."""
        m = maps.detach().to("cpu", torch.float64)
        s1 = self.sum.unsqueeze(0) - m
        s2 = self.sum_sq.unsqueeze(0) - m * m
        mean, std = self._mean_std(self.n - 1, s1, s2)
        z = (m - mean) / std.clamp_min(floor)
        return z.clamp_min(0).to(device=maps.device, dtype=maps.dtype)


class MapNormalizer(nn.Module):
    """``map -> max(0, (map - mean) / std)`` with per-pixel healthy ``mean`` and floored ``std``, times the lung region
    for ``kind="healthy_lungs"``.

    Unfitted, it refuses to run (a map normalised with nothing would be a silent wrong answer). The buffers are not
    persistent: they belong to the calibration (``calibration.json`` ``map_normalization``), not to the weights, and
    are installed from it by :meth:`load_state` (or fitted by :meth:`fit`).

    Args:
        kind: ``"healthy"`` or ``"healthy_lungs"`` (see the module docstring).
    """

    __jit_ignored_attributes__ = ["stats"]

    def __init__(self, kind: str = "healthy") -> None:
        super().__init__()
        if kind not in MAP_NORMALIZATIONS[1:]:
            raise ValueError(f"MapNormalizer: kind must be one of {MAP_NORMALIZATIONS[1:]}, got {kind!r}.")
        self.kind = kind
        self.register_buffer("mean", torch.zeros(0), persistent=False)
        self.register_buffer("std", torch.ones(0), persistent=False)
        self.register_buffer("region", torch.zeros(0), persistent=False)  # empty: the whole map
        self.n_images = 0
        self.std_floor = 0.0
        self.stats: HealthyMapStatistics | None = None  # set while calibrating: leave-one-out normalisation
        self.leave_one_out_active = False

    def fit(self, stats: HealthyMapStatistics, leave_one_out: bool = False) -> MapNormalizer:
        """Installs the statistics; with ``leave_one_out`` the maps passed next are the very images fitted on."""
        mean, std = stats.mean_std()
        self.std_floor = stats.std_floor(std)
        device = self.mean.device
        self.mean = mean.float().to(device)
        self.std = std.clamp_min(self.std_floor).float().to(device)
        self.n_images = stats.n
        self.region = stats.lung_region().to(device) if self.kind == "healthy_lungs" else torch.zeros(0, device=device)
        self.stats = stats if leave_one_out else None
        self.leave_one_out_active = bool(leave_one_out)
        return self

    def end_leave_one_out(self) -> None:
        self.stats = None
        self.leave_one_out_active = False

    def forward(self, amap: torch.Tensor) -> torch.Tensor:
        if self.mean.numel() == 0:
            raise RuntimeError(
                "map_normalization 'healthy' has no healthy statistics: they are fitted by the calibration and read "
                "from calibration.json. Run the calibration (`python -m monai.bundle run calibration --config_file "
                "<bundle>/configs/train.json --map_normalization healthy`), or run with --map_normalization none."
            )
        if amap.shape[1:] != self.mean.shape:
            raise ValueError(
                "The healthy map statistics were fitted on maps of shape " + str(self.mean.shape) + " but this map "
                "has shape " + str(amap.shape[1:]) + ": run at the size the model was calibrated for, or re-run the "
                "calibration."
            )
        if self.leave_one_out_active:
            z = self.leave_one_out(amap)
        else:
            z = ((amap - self.mean) / self.std).clamp_min(0)
        if self.region.numel() > 0:
            z = z * self.region
        return z

    @torch.jit.unused
    def leave_one_out(self, amap):  # not annotated: TorchScript compiles only its signature (Tensor -> Tensor)
        """Calibration only: each map normalised with the statistics of the other calibration images."""
        return self.stats.leave_one_out(amap, self.std_floor)

    def state(self) -> dict[str, Any]:
        """JSON-ready statistics (what :meth:`load_state` reads)."""
        state = {
            "kind": self.kind,
            "n_images": int(self.n_images),
            "std_floor": float(self.std_floor),
            "shape": list(self.mean.shape),
            "mean": self.mean.cpu().flatten().tolist(),
            "std": self.std.cpu().flatten().tolist(),
        }
        if self.region.numel() > 0:
            state["lung_quantile"] = LUNG_QUANTILE
            state["region"] = [int(v) for v in self.region.cpu().flatten().tolist()]
        return state

    @staticmethod
    def kind_of(state: Mapping[str, Any] | None) -> str:
        """The ``map_normalization`` a calibration's stored statistics belong to (``"none"`` without any; files
        written before ``"healthy_lungs"`` existed hold no ``kind`` and are ``"healthy"``)."""
        return str(state.get("kind", "healthy")) if state else "none"

    def load_state(self, state: Mapping[str, Any], source: str = "the calibration") -> MapNormalizer:
        try:
            shape = [int(s) for s in state["shape"]]
            mean = torch.tensor([float(v) for v in state["mean"]], dtype=torch.float32).view(shape)
            std = torch.tensor([float(v) for v in state["std"]], dtype=torch.float32).view(shape)
            kind = self.kind_of(state)
            region = (
                torch.tensor([float(v) for v in state["region"]], dtype=torch.float32).view(shape)
                if kind == "healthy_lungs" else torch.zeros(0)
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{source}: map_normalization is damaged ({e}); re-run the calibration.") from e
        binary_region = bool(((region == 0) | (region == 1)).all())
        if kind not in MAP_NORMALIZATIONS[1:] or (kind == "healthy_lungs" and not binary_region):
            raise ValueError(f"{source}: map_normalization has kind {kind!r} or a lung region that is not 0/1; re-run "
                             "the calibration.")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"{source}: map_normalization holds non-finite or non-positive values; re-run the calibration.")
        device = self.mean.device
        self.mean, self.std, self.region, self.kind = mean.to(device), std.to(device), region.to(device), kind
        self.n_images = int(state.get("n_images", 0))
        self.std_floor = float(state.get("std_floor", 0.0))
        self.end_leave_one_out()
        return self
