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

__all__ = ["AnomalyMapNet"]


class AnomalyMapNet(nn.Module):
    """Turns a reconstruction model into ``x -> anomaly map``.

    How the map is made depends on what the model offers, so that the torch model, its loss and its map stay separate
    (the anomalib split):

    - a model with ``predict_anomaly(x) -> (reconstruction, map)`` is asked for both at once;
    - a model with ``anomaly_map(x)`` (MemMC-MAE: deterministic multi-mask passes, the mean-image baseline) is asked
      for its map, and for ``reconstruct(x)`` when it has one;
    - any other model is called, the first output is the reconstruction, and the map is the per-pixel residual
      ``|x - x_rec|`` (``residual="l1"``, MorphAEus' original) or its square (``"l2"``), averaged over channels.

    Args:
        model: the trained network.
        residual: ``"l1"`` or ``"l2"``, used only for models without ``anomaly_map``.

    Example::

        >>> from medad_monai.networks import MorphAEus
        >>> net = AnomalyMapNet(MorphAEus(spatial_size=(64, 64), channels=(16, 32, 64, 128, 256, 256))).eval()
        >>> net(torch.rand(2, 1, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(self, model: nn.Module, residual: str = "l1") -> None:
        super().__init__()
        if residual not in ("l1", "l2"):
            raise ValueError(f"residual must be 'l1' or 'l2', got {residual!r}.")
        # DistributedDataParallel hides the wrapped model's methods
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.residual = residual
        self._register_load_state_dict_pre_hook(self._accept_unwrapped_keys)

    @staticmethod
    def _accept_unwrapped_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        inner = prefix + "model."
        for key in list(state_dict.keys()):
            if key.startswith(prefix) and not key.startswith(inner):
                state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)

    def _residual(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        diff = x - rec
        err = diff.abs() if self.residual == "l1" else diff * diff
        return err.mean(dim=1, keepdim=True)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(reconstruction, anomaly_map)``; the reconstruction has the input's shape."""
        model = self.model
        if hasattr(model, "predict_anomaly"):
            return model.predict_anomaly(x)
        if hasattr(model, "anomaly_map"):
            amap = model.anomaly_map(x)
            rec = model.reconstruct(x) if hasattr(model, "reconstruct") else torch.zeros_like(x)
            return rec, amap
        out = model(x)
        rec = out[0] if isinstance(out, (tuple, list)) else out
        return rec, self._residual(x, rec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)[1]
