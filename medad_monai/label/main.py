"""The MONAI Label app serving the medad-monai anomaly bundles (MemMC-MAE, MorphAEus).

MONAI Label loads an app from ``<app_dir>/main.py``; ``python -m medad_monai.label init <app_dir> <bundle>...`` writes
one that imports :class:`MedADApp` and links the bundles into ``<app_dir>/model/<name>/``. Then::

    monailabel start_server --app <app_dir> --studies <images folder | http://host:port/dicom-web> \\
        [--conf models memmc_mae,morphaeus] --host 127.0.0.1 --port 8000

Bundles are found only in ``<app_dir>/model/`` (nothing is downloaded: the app does not use the model-zoo lookup and
has no SAM2 task, so ``--conf zoo_source`` and ``--conf sam2`` are not needed). Each bundle becomes an infer task
(:class:`~medad_monai.label.infer.AnomalyBundleInferTask`) and a train task
(:class:`~medad_monai.label.train.UnsupervisedBundleTrainTask`) named after its folder.

``--conf`` keys read here: ``models`` (comma-separated folder names; default every bundle in ``model/``),
``skip_trainers`` (``true`` to serve inference only), ``preload`` (load the networks at start).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

import medad_monai

from .infer import AnomalyBundleInferTask
from .train import UnsupervisedBundleTrainTask

__all__ = ["MedADApp", "find_bundles", "EXTRA_IMAGE_PATTERNS"]

logger = logging.getLogger(__name__)

#: files the local datastore lists on top of MONAI Label's defaults (DICOM and .jpeg radiographs).
EXTRA_IMAGE_PATTERNS = ("*.dcm", "*.dicom", "*.jpeg")


def find_bundles(model_dir: str, names: str | None = None) -> dict[str, str]:
    """``{name: folder}`` of the bundles in ``model_dir``: each sub-folder with ``configs/inference.json``.

    Args:
        model_dir: ``<app_dir>/model``.
        names: comma-separated folder names to serve (``--conf models``); ``None``/empty serves all.

    Raises:
        FileNotFoundError: a requested name has no bundle there, or there are no bundles at all.
    """
    found = {}
    if os.path.isdir(model_dir):
        for n in sorted(os.listdir(model_dir)):
            if os.path.isfile(os.path.join(model_dir, n, "configs", "inference.json")):
                found[n] = os.path.join(model_dir, n)
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    missing = [n for n in wanted if n not in found]
    if missing or not found:
        raise FileNotFoundError(
            f"medad_monai.label: no bundle {missing or ''} in {model_dir} (found: {sorted(found) or 'none'}). Link "
            "bundles there with `python -m medad_monai.label init <app_dir> bundles/memmc_mae bundles/morphaeus`."
        )
    return {n: found[n] for n in wanted} if wanted else found


class MedADApp(MONAILabelApp):
    """MONAI Label app: one anomaly infer task and one unsupervised train task per bundle in ``<app_dir>/model``.

    Args:
        app_dir: the app folder (holds ``main.py`` and ``model/<bundle>/``).
        studies: a local folder of images (PNG/JPEG/DICOM/NIfTI) or a DICOMweb URL.
        conf: the server's ``--conf`` key/value pairs (see the module docstring).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.model_dir = os.path.join(app_dir, "model")
        self.bundles = find_bundles(self.model_dir, conf.get("models"))
        logger.info("medad-monai bundles: %s", self.bundles)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"medad-monai anomaly detection ({medad_monai.__version__})",
            description="Unsupervised anomaly detection (MemMC-MAE, MorphAEus): anomaly heatmap, image score and "
            "calibrated label",
            version=str(medad_monai.__version__),
            labels={"anomaly": 1},
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        extensions = list(settings.MONAI_LABEL_DATASTORE_FILE_EXT)
        extensions += [e for e in EXTRA_IMAGE_PATTERNS if e not in extensions]
        return LocalDatastore(
            self.studies,
            extensions=extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _init_dicomweb_datastore(self) -> Datastore:
        # MONAI Label converts each DICOMweb series to NIfTI through ITK by default: x becomes the first NIfTI axis (our
        # reader would see the image transposed) and the VOI LUT window and MONOCHROME1 inversion that
        # medad_monai.data.load_image applies are lost. The datastore therefore hands over the downloaded DICOM
        # folder, and AnomalyBundleInferTask reads the instance exactly as the bundle reads a DICOM file.
        saved = settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI
        settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI = False
        try:
            return super()._init_dicomweb_datastore()
        finally:
            settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI = saved

    def _download_dcmqi_tools(self) -> None:
        # The stock app fetches dcmqi from GitHub at start for DICOM-SEG results; this app returns heatmaps (no
        # DICOM SEG) and must start offline.
        logger.info("medad-monai app: dcmqi not needed (no DICOM SEG output); skipping its download.")

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.bundles.items():
            task = AnomalyBundleInferTask(path, self.conf, name=name)
            if not task.is_valid():
                logger.warning("%s: no models/model.pt yet; it is served once trained (POST /train/%s).", name, name)
            infers[name] = task
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        trainers: dict[str, TrainTask] = {}
        for name, path in self.bundles.items():
            if os.path.isfile(os.path.join(path, "configs", "train.json")):
                trainers[name] = UnsupervisedBundleTrainTask(path, self.conf)
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["bundles"] = dict(self.bundles)
        return meta
