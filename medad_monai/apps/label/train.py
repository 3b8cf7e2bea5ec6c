"""MONAI Label training task for the unsupervised anomaly bundles: every (normal) image of the datastore, no labels.

MONAI Label's ``BundleTrainTask`` trains on ``datastore.datalist()``, i.e. only on images that carry a final label,
as ``{"image", "label"}`` pairs. The anomaly models learn from unlabelled healthy images, so
:class:`UnsupervisedBundleTrainTask` lists every image instead. In this app a final label can only be a drawn
anomaly, so images that have one are left out by default (request ``exclude_labeled``; our choice).

The bundle's own ``configs/train.json`` runs (run id ``run``: train, then calibrate on the validation split) with
overrides this task builds itself from a checked request (:func:`~medad_monai.apps.label.security.check_train_request`):
nothing a client sends reaches MONAI's config parser as text it could evaluate, and ``bundle_overrides`` is an
allow-list of plain settings. The validation split must hold at least ``min_calibration_images`` healthy images: it
drives model selection (validation loss) and the healthy-data calibration that sets the served thresholds.

Each run writes into its own folder ``<bundle>/models/candidates/<UTC time>/`` (``ckpt_dir``). The served
``models/model.pt`` and ``models/calibration.json`` are replaced only when the server runs with
``--conf publish_trained_model true`` and the calibration was fitted on enough images; otherwise the candidate stays
for a person to check and copy (docs/monailabel.md, "Security").
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import shutil
import time
from typing import Any

import monai.bundle
import torch
from monai.data import partition_dataset
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

from medad_monai.evaluation.calibration import Calibration
from medad_monai.evaluation.predictor import override_config_files

from .infer import resolve_image_path
from .security import DEFAULT_MIN_CALIBRATION_IMAGES, ClientError, check_train_request

__all__ = ["UnsupervisedBundleTrainTask", "CANDIDATES_DIR"]

logger = logging.getLogger(__name__)

#: sub-folder of the bundle's ``models/`` that holds each training run of the server.
CANDIDATES_DIR = "candidates"


class UnsupervisedBundleTrainTask(BundleTrainTask):
    """Trains an anomaly bundle on all unlabelled datastore images through the bundle's ``train.json``.

    Request options (checked by :func:`~medad_monai.apps.label.security.check_train_request`): ``max_epochs``,
    ``val_split``, ``device``, ``pretrained`` (start from ``models/model.pt``), ``exclude_labeled`` (default true:
    leave out images with a final label, i.e. annotated anomalies) and ``bundle_overrides`` (allow-listed
    ``train.json`` settings, e.g. ``{"batch_size": 8, "warmup_epochs": 0}``). ``max_epochs`` also sets the
    config's top-level ``max_epochs``, which the learning-rate schedule reads.

    Args:
        path: the bundle folder.
        conf: the server's ``--conf`` values: ``publish_trained_model`` (replace the served model after a
            successful run; default false), ``min_calibration_images`` (default
            :data:`~medad_monai.apps.label.security.DEFAULT_MIN_CALIBRATION_IMAGES`) and ``bundle_configs`` (the
            bundle's override files, comma-separated, default ``$MEDAD_BUNDLE_CONFIGS``): merged over ``train.json``
            as the infer task merges them over ``inference.json``, so a model trained here is the one it serves.
        kwargs: passed to ``BundleTrainTask``.
    """

    def __init__(self, path: str, conf: dict[str, str] | None = None, **kwargs: Any) -> None:
        conf = conf or {}
        super().__init__(path, conf, **kwargs)
        self.name = os.path.basename(os.path.normpath(path))
        self.publish = strtobool(conf.get("publish_trained_model", "false"))
        self.min_calibration_images = int(conf.get("min_calibration_images", DEFAULT_MIN_CALIBRATION_IMAGES))
        # the served network is inference.json + these files (AnomalyBundleInferTask): train the same network
        self.override_files = [str(f) for f in override_config_files(path, conf.get("bundle_configs"))]

    def config(self) -> dict[str, Any]:
        c = super().config()
        # checkpoint_*.pt files of resumable training are not models to pick from
        c["model_filename"] = [f for f in c.get("model_filename", []) if not f.startswith("checkpoint_")]
        c["val_split"] = 0.2
        c["exclude_labeled"] = True
        c["multi_gpu"] = False
        c["tracking"] = "None"
        c["tracking_uri"] = ""
        return c

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["publishes_trained_model"] = bool(self.publish)
        i["min_calibration_images"] = self.min_calibration_images
        return i

    # -- request ---------------------------------------------------------------------------------------------------
    def _models_dir(self) -> str:
        return os.path.join(self.bundle_path, "models")

    def check_request(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """The checked request (see :func:`~medad_monai.apps.label.security.check_train_request`), refused with
        :class:`~medad_monai.apps.label.security.ClientError` 400 when its validation split would hold fewer than
        ``min_calibration_images`` images. Called by the server before a training is queued, and again by the run."""
        model_files = [os.path.basename(p) for p in glob.glob(os.path.join(self._models_dir(), "*.pt"))]
        checked = check_train_request(
            request,
            self.bundle_config.config,
            model_files=model_files,
            cuda_available=torch.cuda.is_available(),
            bundle_path=self.bundle_path,
        )
        n_images = len(self._image_ids(checked, datastore))
        n_val = len(partition_dataset(list(range(n_images)), ratios=[1 - checked["val_split"], checked["val_split"]])[1])
        if n_images - n_val < 1 or n_val < self.min_calibration_images:
            raise ClientError(
                400,
                f"{n_images} training image(s) with val_split={checked['val_split']:g} leave {n_images - n_val} for "
                f"training and {n_val} healthy image(s) for validation and calibration; at least 1 and "
                f"{self.min_calibration_images} are needed (add healthy images, raise val_split, or lower "
                "--conf min_calibration_images, documented in docs/monailabel.md).",
            )
        return checked

    def _image_ids(self, checked: dict[str, Any], datastore: Datastore) -> list[str]:
        ids = list(datastore.list_images())
        if checked["exclude_labeled"]:
            labeled = set(datastore.get_labeled_images(label_tag=DefaultLabelTag.FINAL))
            ids = [i for i in ids if i not in labeled]
        return sorted(ids)

    def _fetch_datalist(self, checked: dict[str, Any], datastore: Datastore) -> list[dict[str, str]]:
        ids = self._image_ids(checked, datastore)
        if not ids:
            raise ClientError(
                400, "No unlabelled images in the datastore to train the anomaly model on (it learns from healthy images)."
            )
        datalist = []
        for i in ids:
            path = resolve_image_path(datastore.get_image_uri(i))
            if not os.path.isabs(path):  # a relative text could be read as a config expression; never the case here
                raise ClientError(400, f"image {i!r} does not resolve to a file of the datastore.")
            datalist.append({"image": path})
        return datalist

    # -- run ---------------------------------------------------------------------------------------------------------
    def __call__(self, request, datastore: Datastore):
        checked = self.check_request(dict(request), datastore)
        datalist = self._fetch_datalist(checked, datastore)
        val_split = checked["val_split"]
        train_ds, val_ds = partition_dataset(datalist, ratios=[1 - val_split, val_split], shuffle=False)
        logger.info("%s: %d training and %d validation images", self.name, len(train_ds), len(val_ds))

        run_dir = os.path.join(self._models_dir(), CANDIDATES_DIR, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        run_dir = _unique(run_dir)
        os.makedirs(run_dir)
        handlers = copy.deepcopy(self.bundle_config.get(self.const.key_train_handlers(), []))
        served = os.path.join(self._models_dir(), checked["model_filename"])
        if checked["pretrained"] and os.path.isfile(served):
            self._load_checkpoint(served, True, handlers)  # MONAI's CheckpointLoader, weights_only=True
        overrides: dict[str, Any] = {
            **checked["overrides"],
            self.const.key_bundle_root(): self.bundle_path,
            "ckpt_dir": run_dir,
            self.const.key_train_trainer_max_epochs(): checked["max_epochs"],
            "max_epochs": checked["max_epochs"],
            self.const.key_train_dataset_data(): train_ds,
            # the healthy validation images: the calibration's own dataset, which training's validation loss shares
            # (train.json: validate#dataset is @calibrate#dataset, so evaluate.json cannot redirect the calibration)
            "calibrate#dataset#data": val_ds,
            self.const.key_train_handlers(): handlers,
            self.const.key_device(): torch.device(checked["device"]),
            "progress_bar": False,
            "resume": False,
        }
        os.makedirs(self._models_dir(), exist_ok=True)
        # logging_file=False: the bundle's logging.conf would reconfigure the server's own loggers
        monai.bundle.run(
            run_id="run",
            meta_file=self.bundle_metadata_path,
            config_file=[self.bundle_config_path, *self.override_files],
            logging_file=False,
            **overrides,
        )
        return self._finish(run_dir)

    def _finish(self, run_dir: str) -> dict[str, Any]:
        """Publishes the run's ``model.pt`` and ``calibration.json`` when allowed, else keeps them as a candidate."""
        rel = os.path.relpath(run_dir, self.bundle_path)
        model, cal_file = os.path.join(run_dir, "model.pt"), os.path.join(run_dir, "calibration.json")
        if not (os.path.isfile(model) and os.path.isfile(cal_file)):
            raise RuntimeError(f"{self.name}: the run ended without model.pt and calibration.json in {rel}.")
        n_images = Calibration.load(cal_file).n_images
        result = {"model": self.name, "candidate": rel, "calibration_images": n_images, "published": False}
        if n_images < self.min_calibration_images:
            raise ClientError(
                422,
                f"{self.name}: the calibration was fitted on {n_images} healthy image(s), fewer than "
                f"{self.min_calibration_images}; the served model is unchanged (run kept in {rel}).",
            )
        if not self.publish:
            logger.info(
                "%s: trained model kept in %s; the served model is unchanged (publish by copying model.pt and "
                "calibration.json into models/, or start the server with --conf publish_trained_model true).",
                self.name,
                rel,
            )
            return result
        for name in ("model.pt", "calibration.json"):  # same file system: each replace is atomic
            os.replace(os.path.join(run_dir, name), os.path.join(self._models_dir(), name))
        shutil.rmtree(run_dir, ignore_errors=True)
        logger.info("%s: published the trained model and its calibration (%d healthy images).", self.name, n_images)
        return {**result, "candidate": None, "published": True}


def _unique(path: str) -> str:
    out, n = path, 1
    while os.path.exists(out):
        n += 1
        out = f"{path}-{n}"
    return out
