"""A single-tensor inference wrapper shared by every method.

MONAI's tools (``verify_net_in_out``, ``ckpt_export``), MONAI Label and MONAI Deploy expect ``network_def`` to return
one tensor. The training networks return tuples (MorphAEus) or patch predictions plus a mask (MemMC-MAE), so the
inference configs wrap them in :class:`AnomalyMapNet`, whose ``forward`` returns only the anomaly map and whose
``predict`` also returns the reconstruction for writers and viewers.

The wrapper's state dict accepts the wrapped model's keys unchanged, so the ``models/model.pt`` written by training
(a plain state dict of the training network) loads into either of them.
"""

from __future__ import annotations

import torch
from torch import nn

from medad_monai.distributed import unwrap_network
from medad_monai.scoring import gaussian_kernel_1d, residual_error, separable_smooth

__all__ = ["AnomalyMapNet", "map_smoothing"]


def map_smoothing(network: nn.Module) -> float:
    """The Gaussian sigma (px) with which ``network`` smooths its maps: an :class:`AnomalyMapNet`'s
    ``smooth_sigma`` (inside DDP/DataParallel too), 0 for any other network."""
    return float(getattr(unwrap_network(network), "smooth_sigma", 0.0))


class AnomalyMapNet(nn.Module):
    """Turns a reconstruction model into ``x -> anomaly map``.

    How the map is made depends on what the model offers, so that the torch model, its loss and its map stay separate
    (the anomalib split):

    - a model with ``predict_anomaly(x) -> (reconstruction, map)`` is asked for both at once;
    - a model with ``anomaly_map(x)`` (MemMC-MAE: deterministic multi-mask passes, the mean-image baseline) is asked
      for its map, and for ``reconstruct(x)`` when it has one;
    - any other model gives the reconstruction, by ``reconstruct(x)`` when it has one (MorphAEus: without the
      reversed warp that only its training loss uses), else as the first output of a call, and the map is the
      per-pixel residual ``|x - x_rec|`` (``residual="l1"``, MorphAEus' original) or its square (``"l2"``), averaged
      over channels.

    Optionally the map is smoothed with a Gaussian of standard deviation ``smooth_sigma`` pixels (the post-processing
    anomalib applies to its maps; :func:`medad_monai.scoring.gaussian_smooth`'s kernel and replicate-padded filter).
    It happens inside the network, so calibration, evaluation, inference, export, MONAI Label and MONAI Deploy all see
    the same map. Neither paper smooths (default 0); smoothing averages out single-pixel texture residuals, which
    helps ``max``-type image scores and pixel thresholds.

    Args:
        model: the trained network.
        residual: ``"l1"`` or ``"l2"``, used only for models without ``anomaly_map``.
        smooth_sigma: Gaussian standard deviation in pixels applied to the map; 0 (default) leaves it unchanged.

    Example::

        >>> from medad_monai.networks import MorphAEus
        >>> net = AnomalyMapNet(MorphAEus(spatial_size=(64, 64), channels=(16, 32, 64, 128, 256, 256))).eval()
        >>> net(torch.rand(2, 1, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(self, model: nn.Module, residual: str = "l1", smooth_sigma: float = 0.0) -> None:
        super().__init__()
        if residual not in ("l1", "l2"):
            raise ValueError(f"residual must be 'l1' or 'l2', got {residual!r}.")
        self.smooth_sigma = 0.0
        # not persistent: checkpoints stay plain state dicts of the wrapped model
        self.register_buffer("smooth_kernel", torch.ones(1), persistent=False)
        self.set_smooth_sigma(smooth_sigma)
        # DistributedDataParallel hides the wrapped model's methods
        self.model = unwrap_network(model)
        self.residual = residual
        self._register_load_state_dict_pre_hook(self._accept_unwrapped_keys)

    @staticmethod
    def _accept_unwrapped_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        inner = prefix + "model."
        for key in list(state_dict.keys()):
            if key.startswith(prefix) and not key.startswith(inner):
                state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)

    def set_smooth_sigma(self, sigma: float) -> None:
        """Sets the map smoothing (e.g. to the one a calibration was fitted with); 0 turns it off."""
        sigma = float(sigma)
        if not sigma >= 0:
            raise ValueError(f"smooth_sigma must be >= 0 (pixels), got {sigma}.")
        self.smooth_sigma = sigma
        self.smooth_kernel = gaussian_kernel_1d(sigma, truncated=4.0).to(self.smooth_kernel.device)

    def smooth(self, amap: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian smoothing of ``(B, C, H, W)`` maps with replicate padding (identity when sigma is 0)."""
        if self.smooth_sigma <= 0:
            return amap
        return separable_smooth(amap, [self.smooth_kernel, self.smooth_kernel])

    def _raw_predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if hasattr(model, "predict_anomaly"):
            return model.predict_anomaly(x)
        if hasattr(model, "anomaly_map"):
            amap = model.anomaly_map(x)
            rec = model.reconstruct(x) if hasattr(model, "reconstruct") else torch.zeros_like(x)
            return rec, amap
        if hasattr(model, "reconstruct"):
            rec = model.reconstruct(x)
        else:
            out = model(x)
            rec = out[0] if isinstance(out, (tuple, list)) else out
        return rec, residual_error(x, rec, self.residual)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(reconstruction, anomaly_map)``; the reconstruction has the input's shape."""
        rec, amap = self._raw_predict(x)
        return rec, self.smooth(amap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)[1]
