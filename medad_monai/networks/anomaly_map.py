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

from medad_monai.engine.distributed import unwrap_network
from medad_monai.networks.map_normalization import MAP_NORMALIZATIONS, HealthyMapStatistics, MapNormalizer
from medad_monai.evaluation.scoring import (
    MAP_RESIDUALS,
    gaussian_kernel_1d,
    residual_error,
    separable_smooth,
    ssim_error,
)

__all__ = ["AnomalyMapNet", "MAP_RESIDUALS", "map_smoothing", "map_recipe", "fit_map_normalization", "follow_calibration"]


def map_smoothing(network: nn.Module) -> float:
    """The Gaussian sigma (px) with which ``network`` smooths its maps: an :class:`AnomalyMapNet`'s
    ``smooth_sigma`` (inside DDP/DataParallel too), 0 for any other network."""
    return float(getattr(unwrap_network(network), "smooth_sigma", 0.0))


class AnomalyMapNet(nn.Module):
    """Turns a reconstruction model into ``x -> anomaly map``.

    Every model it wraps offers one interface, so that the torch model, its loss and its map stay separate (the
    anomalib split): ``reconstruct(x) -> x_rec`` (MorphAEus: without the reversed warp that only its training loss
    uses; the PCA baseline: the healthy subspace projection), and the map is the per-pixel residual ``|x - x_rec|``
    (``residual="l1"``, MorphAEus' original) or its square (``"l2"``), averaged over channels. A model whose map is
    not that residual also offers ``predict_anomaly(x) -> (x_rec, map)`` (MemMC-MAE: deterministic multi-mask passes;
    the mean-image baseline's z-score), which is used instead.

    Optionally the map is smoothed with a Gaussian of standard deviation ``smooth_sigma`` pixels (the post-processing
    anomalib applies to its maps; :func:`medad_monai.evaluation.scoring.gaussian_smooth`'s kernel and replicate-padded
    filter). It happens inside the network, so calibration, evaluation, inference, export, MONAI Label and MONAI Deploy
    all see the same map. Neither paper smooths (default 0); smoothing averages out single-pixel texture residuals,
    which helps ``max``-type image scores and pixel thresholds.

    Two further steps, both off by default (the papers' maps) and on in the bundles' CPU demo configuration, where
    they were chosen on a development set of lesions on real validation radiographs (README, "Quality on real
    radiographs"):

    - ``map_residual="signed"`` smooths the *signed* residual ``x - x_rec`` (per channel, then ``|.|`` or its square,
      averaged over channels) instead of the residual's magnitude. Texture the model does not reproduce (ribs,
      vessels slightly out of place) leaves residuals of alternating sign that the Gaussian averages away, while a
      consolidation, an effusion or a lucency leaves one sign over its whole extent and stays. The map then always
      comes from the reconstruction, also for models with their own ``anomaly_map`` (MemMC-MAE: its multi-mask
      reconstruction). Needs ``smooth_sigma > 0`` to differ from ``"abs"``.
    - ``map_residual="ssim"`` is ``1 - SSIM(x, x_rec)`` (:func:`~medad_monai.evaluation.scoring.ssim_error`, the
      SSIM autoencoder's map), with ``smooth_sigma`` as the sigma of SSIM's Gaussian window (customary 1.5 px; it
      must be > 0) and no further smoothing. It scores differences of local contrast and structure, not of
      intensity alone. Also from the reconstruction for every model.
    - ``map_normalization="healthy"`` divides each pixel's deviation from the healthy mean by the healthy spread
      there (:class:`~medad_monai.networks.map_normalization.MapNormalizer`), with statistics fitted by the
      calibration and stored in ``calibration.json``, so that borders and other places where the model is always
      poor stop dominating the image score.

    Args:
        model: the trained network.
        residual: ``"l1"`` or ``"l2"``, used for models without ``predict_anomaly`` and for ``map_residual="signed"``.
        smooth_sigma: Gaussian standard deviation in pixels applied to the map; 0 (default) leaves it unchanged.
        map_residual: ``"abs"`` (default: smooth ``|x - x_rec|``, the papers' map when ``smooth_sigma`` is 0),
            ``"signed"`` (smooth ``x - x_rec``, then take its magnitude) or ``"ssim"`` (``1 - SSIM`` in a Gaussian
            window of sigma ``smooth_sigma``).
        map_normalization: ``"none"`` (default), ``"healthy"`` (per-pixel z-value against healthy calibration
            maps, negative values set to 0) or ``"healthy_lungs"`` (the same, then 0 outside the lung fields
            estimated from the healthy calibration images; radiographs only,
            :mod:`~medad_monai.networks.map_normalization`).

    Example::

        >>> from medad_monai.networks import MorphAEus
        >>> net = AnomalyMapNet(MorphAEus(spatial_size=(64, 64), channels=(16, 32, 64, 128, 256, 256))).eval()
        >>> net(torch.rand(2, 1, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(
        self,
        model: nn.Module,
        residual: str = "l1",
        smooth_sigma: float = 0.0,
        map_residual: str = "abs",
        map_normalization: str = "none",
    ) -> None:
        super().__init__()
        if residual not in ("l1", "l2"):
            raise ValueError(f"residual must be 'l1' or 'l2', got {residual!r}.")
        self.map_residual = "abs"
        self.set_map_residual(map_residual)
        if map_normalization not in MAP_NORMALIZATIONS:
            raise ValueError(f"map_normalization must be one of {MAP_NORMALIZATIONS}, got {map_normalization!r}.")
        self.normalizer: MapNormalizer | None = None
        if map_normalization != "none":
            self.normalizer = MapNormalizer(map_normalization)
        self.smooth_sigma = 0.0
        # not persistent: checkpoints stay plain state dicts of the wrapped model
        self.register_buffer("smooth_kernel", torch.ones(1), persistent=False)
        self.set_smooth_sigma(smooth_sigma)
        # DistributedDataParallel hides the wrapped model's methods
        self.model = unwrap_network(model)
        if not callable(getattr(self.model, "reconstruct", None)):
            raise TypeError(
                f"AnomalyMapNet wraps reconstruction networks: {type(self.model).__name__} has no reconstruct(x) -> "
                "x_rec (and, when its map is not the residual, predict_anomaly(x) -> (x_rec, map))."
            )
        self.residual = residual
        self.check_recipe()
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

    def set_map_residual(self, mode: str) -> None:
        """``"abs"``, ``"signed"`` or ``"ssim"`` (see the class docstring)."""
        if mode not in MAP_RESIDUALS:
            raise ValueError(f"map_residual must be one of {MAP_RESIDUALS}, got {mode!r}.")
        self.map_residual = mode

    def check_recipe(self) -> None:
        """Refuses a recipe that cannot make a map (``"ssim"`` without a window), naming the fix."""
        if self.map_residual == "ssim" and self.smooth_sigma <= 0:
            raise ValueError(
                "map_residual 'ssim' needs a window: map_sigma (smooth_sigma) must be > 0 (SSIM's customary 1.5 px), "
                "got 0; e.g. --map_residual ssim --map_sigma 1.5."
            )

    @property
    def map_normalization(self) -> str:
        return "none" if self.normalizer is None else self.normalizer.kind

    def set_map_normalization(self, state: dict | None, source: str = "the calibration") -> None:
        """Installs healthy statistics (``calibration.json`` ``map_normalization``), or removes the step (``None``)."""
        if not state:
            self.normalizer = None
            return
        device = self.smooth_kernel.device
        self.normalizer = MapNormalizer().to(device).load_state(state, source)

    def smooth(self, amap: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian smoothing of ``(B, C, H, W)`` maps with replicate padding (identity when sigma is 0)."""
        if self.smooth_sigma <= 0:
            return amap
        return separable_smooth(amap, [self.smooth_kernel, self.smooth_kernel])

    def _raw_predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if hasattr(model, "predict_anomaly"):
            return model.predict_anomaly(x)
        rec = model.reconstruct(x)
        return rec, residual_error(x, rec, self.residual)

    def unnormalized_predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, map)`` before the healthy normalisation (what the calibration fits it on)."""
        if self.map_residual == "ssim":
            self.check_recipe()
            rec = self.model.reconstruct(x)
            return rec, ssim_error(x.float(), rec.float(), [self.smooth_kernel, self.smooth_kernel])
        rec, amap = self._raw_predict(x)
        if self.map_residual == "signed":
            signed = self.smooth((x - rec).float())
            amap = signed.abs() if self.residual == "l1" else signed * signed
            return rec, amap.mean(dim=1, keepdim=True)
        return rec, self.smooth(amap)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(reconstruction, anomaly_map)``; the reconstruction has the input's shape."""
        rec, amap = self.unnormalized_predict(x)
        if self.normalizer is not None:
            amap = self.normalizer(amap)
        return rec, amap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)[1]


def map_recipe(network: nn.Module) -> dict:
    """How ``network`` turns a reconstruction into the map thresholds are fitted on: ``map_sigma``, ``map_residual``
    and ``map_normalization`` (``"abs"``/``"none"`` for networks that are not an :class:`AnomalyMapNet`)."""
    net = unwrap_network(network)
    return {
        "map_sigma": map_smoothing(net),
        "map_residual": str(getattr(net, "map_residual", "abs")),
        "map_normalization": str(getattr(net, "map_normalization", "none")),
    }


def fit_map_normalization(network: nn.Module, images, leave_one_out: bool = True, autocast=None) -> int:
    """Fits the healthy statistics of an :class:`AnomalyMapNet` with ``map_normalization="healthy"`` on healthy
    images (the calibration list), summed over every process of a distributed run.

    Args:
        network: the (possibly DDP-wrapped) :class:`AnomalyMapNet`; a network without the step is left alone.
        images: iterable of ``(B, C, H, W)`` image batches on the network's device.
        leave_one_out: normalise the images passed next (the same ones, for their thresholds) each with the
            statistics of the others; :meth:`MapNormalizer.end_leave_one_out` ends it.
        autocast: optional callable returning the context manager the maps are computed in (mixed precision).

    Returns:
        the number of images fitted on (0 when the network has no healthy normalisation).
    """
    import contextlib

    net = unwrap_network(network)
    if getattr(net, "normalizer", None) is None:
        return 0
    stats = HealthyMapStatistics()
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for x in images:
                with autocast() if autocast is not None else contextlib.nullcontext():
                    amap = net.unnormalized_predict(x)[1]
                stats.update(amap.float(), x if net.normalizer.kind == "healthy_lungs" else None)
    finally:
        net.train(was_training)
    stats.all_reduce()
    net.normalizer.fit(stats, leave_one_out=leave_one_out)
    return stats.n


def follow_calibration(network: nn.Module, calibration, source: str, adopt: bool, what: str = "this run") -> nn.Module:
    """Makes ``network`` compute the maps ``calibration``'s thresholds were fitted on, or refuses.

    The one place where a map recipe (``map_sigma``, ``map_residual``, ``map_normalization`` and its healthy
    statistics) meets a calibration. Bundle evaluation, inference and export refuse a difference (``adopt=False``:
    the user asked for one recipe and the thresholds mean something only for another); the Deploy and Label apps
    serve a bundle as calibrated (``adopt=True``: the calibration's recipe is used, with a warning naming both). In
    both cases the healthy statistics are installed from the calibration.

    Raises:
        ValueError: ``adopt=False`` and the recipe differs, naming both values and the fixing options.
    """
    import logging

    net = unwrap_network(network)
    if calibration is None or not isinstance(net, AnomalyMapNet):
        return network
    ours = map_recipe(net)
    theirs = {
        "map_sigma": calibration.map_sigma,
        "map_residual": calibration.map_residual,
        "map_normalization": MapNormalizer.kind_of(calibration.map_normalization),
    }
    differ = [k for k in ours if (not calibration.fits_map_sigma(ours[k]) if k == "map_sigma" else ours[k] != theirs[k])]
    if differ:
        pairs = ", ".join(f"{k}={ours[k]!r} (calibration: {theirs[k]!r})" for k in differ)
        if not adopt:

            def flags(recipe: dict) -> str:
                return " ".join(f"--{k} {recipe[k]:g}" if k == "map_sigma" else f"--{k} {recipe[k]}" for k in differ)

            raise ValueError(
                f"{source} was fitted on other anomaly maps than {what} computes: {pairs}, so its thresholds would "
                f"be meaningless. Run with {flags(theirs)}, or re-run the calibration with these settings (`python -m "
                f"monai.bundle run calibration --config_file <bundle>/configs/train.json {flags(ours)}`) (or, for a "
                "bundle evaluation, `run recalibrate` instead of `run`: re-fits the thresholds on the validation list "
                "with these settings, then evaluates)."
            )
        logging.getLogger("medad_monai").warning(
            "%s asks for %s; using the calibration's, since its thresholds only mean something for those maps.",
            what,
            pairs,
        )
        net.set_smooth_sigma(theirs["map_sigma"])
        net.set_map_residual(theirs["map_residual"])
        net.check_recipe()
    net.set_map_normalization(calibration.map_normalization or None, source)
    return network
