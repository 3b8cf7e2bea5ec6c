"""MONAI Label training task for the unsupervised anomaly bundles: every (normal) image of the datastore, no labels.

MONAI Label's ``BundleTrainTask`` trains on ``datastore.datalist()``, i.e. only on images that carry a final label,
as ``{"image", "label"}`` pairs. The anomaly models learn from unlabelled healthy images, so
:class:`UnsupervisedBundleTrainTask` lists every image instead. In this app a final label can only be a drawn
anomaly, so images that have one are left out by default (request ``exclude_labeled``; our choice).

The bundle's own ``configs/train.json`` runs (run id ``run``: train, then calibrate on the validation split); MONAI
Label overrides ``train#dataset#data``, ``validate#dataset#data``, ``train#trainer#max_epochs``, ``device`` and
``bundle_root``. The validation split must not be empty: it drives model selection (validation loss) and the
healthy-data calibration that sets the thresholds served by :class:`~medad_monai.label.infer.AnomalyBundleInferTask`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import monai.bundle
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

from .infer import resolve_image_path

__all__ = ["UnsupervisedBundleTrainTask"]

logger = logging.getLogger(__name__)


class UnsupervisedBundleTrainTask(BundleTrainTask):
    """Trains an anomaly bundle on all unlabelled datastore images through the bundle's ``train.json``.

    Request options on top of ``BundleTrainTask``'s (``max_epochs``, ``val_split``, ``pretrained``, ``device``):

    - ``exclude_labeled`` (default true): leave out images with a final label (annotated anomalies);
    - ``bundle_overrides``: a dict of extra ``train.json`` overrides, e.g. ``{"batch_size": 8, "warmup_epochs": 0}``.

    ``max_epochs`` also overrides the config's top-level ``max_epochs``, which the learning-rate schedule reads.

    Args:
        path: the bundle folder.
        conf: the server's ``--conf`` values.
        kwargs: passed to ``BundleTrainTask``.
    """

    def __init__(self, path: str, conf: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(path, conf or {}, **kwargs)
        self._request: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        c = super().config()
        # checkpoint_*.pt files of resumable training are not models to pick from
        c["model_filename"] = [f for f in c.get("model_filename", []) if not f.startswith("checkpoint_")]
        c["val_split"] = 0.2
        c["exclude_labeled"] = True
        c["multi_gpu"] = False
        return c

    def _fetch_datalist(self, request, datastore: Datastore) -> list[dict[str, str]]:
        ids = list(datastore.list_images())
        if strtobool(str(request.get("exclude_labeled", True))):
            labeled = set(datastore.get_labeled_images(label_tag=DefaultLabelTag.FINAL))
            if labeled:
                logger.info("Leaving out %d image(s) with a final label (annotated anomalies).", len(labeled))
            ids = [i for i in ids if i not in labeled]
        if not ids:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                "No unlabelled images in the datastore to train the anomaly model on (it learns from healthy images).",
            )
        return [{"image": resolve_image_path(datastore.get_image_uri(i))} for i in sorted(ids)]

    def _partition_datalist(self, datalist, request, shuffle=False):
        val_split = float(request.get("val_split", 0.2))
        if not 0.0 < val_split < 1.0:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"val_split must be in (0, 1), got {val_split}: the healthy validation images select the model and "
                "calibrate its thresholds (the bundle's default validation list would be its demo data).",
            )
        train, val = super()._partition_datalist(datalist, request, shuffle=shuffle)
        if not train or not val:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"{len(datalist)} image(s) with val_split={val_split} leave {len(train)} for training and "
                f"{len(val or [])} for validation; both need at least one.",
            )
        return train, val

    def __call__(self, request, datastore: Datastore):
        self._request = dict(request)
        try:
            return super().__call__(request, datastore)
        finally:
            self._request = {}

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        overrides["max_epochs"] = overrides[self.const.key_train_trainer_max_epochs()]
        overrides["progress_bar"] = False
        extra = self._request.get("bundle_overrides") or {}
        if not isinstance(extra, dict):
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, f"bundle_overrides must be a JSON object, got {extra!r}."
            )
        overrides.update(extra)
        os.makedirs(os.path.join(self.bundle_path, "models"), exist_ok=True)
        return overrides

    def run_single_gpu(self, request, overrides):
        # logging_file=False: the bundle's logging.conf would reconfigure the server's own loggers
        monai.bundle.run(
            run_id=request.get("run_id") or "run",
            meta_file=self.bundle_metadata_path,
            config_file=self.bundle_config_path,
            logging_file=False,
            **overrides,
        )
