"""Ignite/MONAI engine glue shared by both bundles.

Training uses MONAI's ``SupervisedTrainer`` unchanged: :func:`prepare_image_batch` makes the image its own target,
so a method's loss is simply ``loss(network_output, image)``. Validation uses ``SupervisedEvaluator`` with
:class:`ValidationCriterion` as the key metric (a label-free criterion, e.g. MorphAEus' healthy reconstruction MSE).
Calibration, evaluation and inference all run :class:`AnomalyEvaluator`, which produces the anomalib-style output
contract (``pred_score``, ``pred_label``, ``anomaly_map``, ``pred_mask``) that the handlers consume.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer

from medad_monai.engine.bundle_utils import SKIPPED_KEY, check_amp_device
from medad_monai.evaluation.calibration import Calibration
from medad_monai.engine.distributed import unwrap_network  # re-exported: its home is medad_monai.engine.distributed
from medad_monai.evaluation.predictor import AnomalyPredictor

__all__ = [
    "prepare_image_batch",
    "ValidationCriterion",
    "AnomalyEvaluator",
    "AmpInferer",
    "unwrap_network",
]


def prepare_image_batch(batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for reconstruction training: returns ``(image, image)``; labels are never used."""
    image = batchdata["image"]
    if isinstance(image, torch.Tensor):
        image = image.to(device=device, non_blocking=non_blocking, **kwargs)
    return image, image


def _float32(out):
    """``out`` with its half/bfloat16 tensors cast to float32 (in tuples, named tuples, lists and dicts too)."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.element_size() < 4 else out
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_float32(o) for o in out))
    if isinstance(out, (tuple, list)):
        return type(out)(_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    return out


class AmpInferer(SimpleInferer):
    """``SimpleInferer`` that runs the network under ``torch.autocast(<input's device>, dtype)`` and returns float32
    outputs (``--amp bf16``/``fp16``, see :func:`medad_monai.engine.bundle_utils.amp_inferer`).

    MONAI 1.6's engines autocast with ``torch.autocast("cuda", **amp_kwargs)`` only, which is disabled on a CPU; this
    inferer makes the forward pass mixed precision on any device (on a GPU it nests inside MONAI's autocast, same
    dtype). The float32 outputs keep losses and validation criteria in float32 whatever the device.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(inputs.device.type, dtype=self.dtype):
            out = super().__call__(inputs, network, *args, **kwargs)
        return _float32(out)


class ValidationCriterion(Metric):
    """Batch-size-weighted mean of ``criterion(pred, image)`` over an epoch, reduced across ranks.

    Lower is better: pair it with ``metric_cmp_fn`` "less than" and ``key_metric_negative_sign=True`` in
    ``CheckpointSaver``.

    Args:
        criterion: ``(network_output, image) -> scalar tensor`` (a batch mean).
        output_transform: maps the engine output to ``(pred, image)``.
    """

    def __init__(
        self,
        criterion: Callable[[Any, torch.Tensor], torch.Tensor],
        output_transform: Callable = lambda out: (out["pred"], out["image"]),
        device: str | torch.device = "cpu",
    ) -> None:
        self.criterion = criterion
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = 0

    @reinit__is_reduced
    def update(self, output) -> None:
        pred, image = output
        value = self.criterion(pred, image).detach()
        n = image.shape[0]
        self._sum += value.to(self._device, torch.float64) * n
        self._count += n

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if self._count == 0:
            raise NotComputableError("ValidationCriterion needs at least one batch before compute().")
        return float(self._sum.item() / self._count)


class AnomalyEvaluator(SupervisedEvaluator):
    """Runs an anomaly-map network over a loader and fills ``engine.state.output`` with the output contract.

    ``network`` must offer ``predict(x) -> (reconstruction, anomaly_map)`` (see
    :class:`medad_monai.networks.AnomalyMapNet`). Each iteration's output is a dict of batched values:
    ``image, reconstruction, anomaly_map, pred_score, pred_label, pred_mask, label, mask, has_mask, image_path``.
    Labels and masks are decided by the calibration's thresholds (``-1``/all-zero when no calibration is given).

    Args:
        device: torch device.
        val_data_loader: loader yielding dicts from :func:`medad_monai.data.anomaly_transforms`.
        network: an :class:`~medad_monai.networks.AnomalyMapNet`.
        score_method: image score aggregation of the map: ``"mean"`` (MorphAEus' paper), ``"max"``, ``"topk"``,
            ``"percentile"``.
        percentile: used by ``"topk"`` and ``"percentile"``.
        calibration: a :class:`~medad_monai.evaluation.calibration.Calibration`, a path to its JSON, or ``None``.
        strict: fail at the first item the loader could not read (``--strict True``); by default such items are
            skipped, logged with the reason, and listed in ``engine.state.skipped_items`` (``{"image", "reason"}``),
            which the handlers write to ``skipped.csv`` and ``metrics.json``.
        bundle: this bundle's identity (``$medad_monai.evaluation.model_record.bundle_identity(@bundle_root)`` in the
            configs); a calibration recording another bundle is refused.
        kwargs: passed to ``SupervisedEvaluator`` (e.g. ``val_handlers``, ``epoch_length``). With ``amp=True`` the
            network predicts under ``torch.autocast(<batch's device>, **amp_kwargs)`` (``--amp bf16``/``fp16``, see
            :func:`medad_monai.engine.bundle_utils.amp_settings`) and the reconstruction and map come back as float32.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader,
        network: torch.nn.Module,
        score_method: str = "mean",
        percentile: float = 99.0,
        calibration: Calibration | str | None = None,
        strict: bool = False,
        bundle: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(device=torch.device(device), val_data_loader=val_data_loader, network=network, decollate=False, **kwargs)
        self.strict = bool(strict)
        if self.amp:  # autocast's default dtype when amp_kwargs names none: float16 on CUDA, bfloat16 on CPU
            device = self.state.device
            check_amp_device(self.amp_kwargs.get("dtype", torch.get_autocast_dtype(device.type)), device)
        self.add_event_handler(Events.STARTED, _reset_skipped)
        # the one predictor (medad_monai.evaluation.predictor): checks the run against the calibration's record
        # (network, input size, score and map recipes; refused when they differ) and decides labels and masks
        self.predictor = AnomalyPredictor(network, calibration, score_method, percentile, follow=False, bundle=bundle)

    @property
    def calibration(self) -> Calibration | None:
        """The predictor's calibration (``None``: scores and maps only), read by the metrics and writer handlers."""
        return self.predictor.calibration

    def autocast(self, device_type: str):
        """The context the network predicts in: ``torch.autocast`` with the run's ``amp_kwargs`` under ``--amp``."""
        return torch.autocast(device_type, **self.amp_kwargs) if self.amp else contextlib.nullcontext()

    def _iteration(self, engine: AnomalyEvaluator, batchdata: dict) -> dict:
        skipped = batchdata.pop(SKIPPED_KEY, None) if isinstance(batchdata, dict) else None
        if skipped:  # unreadable items, reported by SkipBadItemsDataset (possibly in a worker process)
            if self.strict:
                first = skipped[0]
                raise RuntimeError(
                    f"--strict True: {len(skipped)} item(s) of this batch could not be read, first {first['image']}: "
                    f"{first['reason']}. Fix or remove them, or run without --strict to skip and report them."
                )
            engine.state.skipped_items.extend(skipped)
        if not batchdata or "image" not in batchdata:  # every item of this batch was unreadable
            engine.state.output = None
            return None
        x = batchdata["image"].to(engine.state.device, non_blocking=engine.non_blocking)
        with engine.mode(engine.network):
            rec, out = self.predictor.predict(x, self.autocast(x.device.type))
        n = x.shape[0]
        label = batchdata.get("label")
        label = torch.as_tensor(label).view(-1).long() if label is not None else torch.full((n,), -1, dtype=torch.long)
        mask = batchdata.get("mask")
        has_mask = batchdata.get("has_mask")
        paths = batchdata.get("image_path")
        if paths is None:
            paths = [f"image_{engine.state.iteration:05d}_{i}" for i in range(n)]
        engine.state.output = {
            "image": x,
            "reconstruction": rec,
            **out.to_dict(),
            "label": label,
            "mask": mask,
            "has_mask": torch.as_tensor(has_mask).view(-1).bool() if has_mask is not None else torch.zeros(n, dtype=torch.bool),
            "image_path": [str(p) for p in paths],
        }
        return engine.state.output


def _reset_skipped(engine) -> None:
    engine.state.skipped_items = []


def first_existing(paths: Sequence[str]) -> str | None:
    """The first path that exists, else ``None`` (used for optional files such as a calibration)."""
    for p in paths:
        if p and os.path.exists(p):
            return p
    return None


def weight_decay_groups(network: torch.nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """Optimizer parameter groups without weight decay on biases, norms, embeddings' fixed tables and memory slots.

    MAE's recipe (``timm``'s ``add_weight_decay``): 1-D parameters (biases, LayerNorm) get no decay. Memory slots and
    the mask/cls tokens are learned patterns, not weights to shrink, so they are excluded too.
    """
    decay, no_decay = [], []
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "memory" in name or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
