"""The MONAI Label app serving the medad-monai anomaly bundles (MemMC-MAE, MorphAEus).

MONAI Label loads an app from ``<app_dir>/main.py``; ``python -m medad_monai.apps.label init <app_dir> <bundle>...``
writes one that imports :class:`MedADApp` and links the bundles into ``<app_dir>/model/<name>/``. Then::

    monailabel start_server --app <app_dir> --studies <images folder | http://host:port/dicom-web> \\
        [--conf models memmc_mae,morphaeus] --host 127.0.0.1 --port 8000

Bundles are found only in ``<app_dir>/model/`` (nothing is downloaded: the app does not use the model-zoo lookup and
has no SAM2 task, so ``--conf zoo_source`` and ``--conf sam2`` are not needed). Each bundle becomes an infer task
(:class:`~medad_monai.apps.label.infer.AnomalyBundleInferTask`) and a train task
(:class:`~medad_monai.apps.label.train.UnsupervisedBundleTrainTask`) named after its folder.

``--conf`` keys read here (docs/monailabel.md, "Security"):

- ``profile``: ``inference`` (default: read-only datastore, no trainers), ``annotate`` (checked uploads, labels and
  deletes) or ``train`` (as annotate, plus ``POST /train``);
- ``publish_trained_model`` (``train`` profile): let a finished training replace the served model (default false:
  each run is kept in ``models/candidates/``);
- ``min_calibration_images``: fewest healthy validation images a training may calibrate on (default 20);
- ``max_upload_mb``: largest accepted upload (default 64);
- ``models`` (comma-separated folder names; default every bundle in ``model/``), ``skip_trainers`` (``true`` turns
  the trainers off in any profile), ``preload`` (load the networks at start).

Every request is checked before it reaches a bundle config, a path or a file (:mod:`medad_monai.apps.label.security`);
client mistakes are answered with 4xx and a one-line reason.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import torch
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

import medad_monai

from .datastore import CheckedLocalDatastore
from .infer import AnomalyBundleInferTask
from .security import (
    DEFAULT_MAX_UPLOAD_MB,
    PROFILES,
    ClientError,
    check_infer_request,
    check_lookup_id,
    is_fresh_upload,
    is_inside,
)
from .train import UnsupervisedBundleTrainTask

__all__ = ["MedADApp", "find_bundles", "install_server_guards", "EXTRA_IMAGE_PATTERNS", "LOOPBACK_HOSTS"]

logger = logging.getLogger(__name__)

#: files the local datastore lists on top of MONAI Label's defaults (DICOM and .jpeg radiographs).
EXTRA_IMAGE_PATTERNS = ("*.dcm", "*.dicom", "*.jpeg")
#: ``--host`` values that keep the server on this machine.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


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
            f"medad_monai.apps.label: no bundle {missing or ''} in {model_dir} (found: {sorted(found) or 'none'}). Link "
            "bundles there with `python -m medad_monai.apps.label init <app_dir> bundles/memmc_mae bundles/morphaeus`."
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
        self.profile = str(conf.get("profile", "inference")).strip().lower()
        if self.profile not in PROFILES:
            raise ValueError(
                f"medad_monai.apps.label: --conf profile {self.profile!r} is not one of {sorted(PROFILES)} "
                f"({'; '.join(f'{k}: {v}' for k, v in PROFILES.items())})."
            )
        self.max_upload_mb = float(conf.get("max_upload_mb", DEFAULT_MAX_UPLOAD_MB))
        self.model_dir = os.path.join(app_dir, "model")
        self.bundles = find_bundles(self.model_dir, conf.get("models"))
        logger.info("medad-monai bundles: %s; profile: %s (%s)", sorted(self.bundles), self.profile,
                    PROFILES[self.profile])
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
        install_server_guards()
        _warn_if_exposed()

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        extensions = list(settings.MONAI_LABEL_DATASTORE_FILE_EXT)
        extensions += [e for e in EXTRA_IMAGE_PATTERNS if e not in extensions]
        return CheckedLocalDatastore(
            self.studies,
            writable=self.profile in ("annotate", "train") and not settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            max_upload_mb=self.max_upload_mb,
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
        if self.profile != "train" or strtobool(self.conf.get("skip_trainers", "false")):
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
        # names and versions only: absolute server paths are nobody's business
        meta["bundles"] = {n: t.version for n, t in self._infers.items()}
        meta["profile"] = self.profile
        return meta

    # -- requests ------------------------------------------------------------------------------------------------------
    def infer(self, request, datastore=None):
        """Checks the request (model, parameters, image) and runs MONAI Label's inference on it.

        The image must be an id of the datastore, an image uploaded with this request, or a session's image; paths
        naming anything else on the server are refused (404), as are unknown models (404), models without weights
        (409) and bad parameters (400). Results are never saved into the datastore.
        """
        model = request.get("model")
        task = self._infers.get(model) if isinstance(model, str) else None
        if task is None:
            raise ClientError(404, f"unknown model {str(model)[:60]!r}; this server serves {sorted(self._infers)}.")
        if not task.is_valid():
            raise ClientError(
                409, f"{model} has no trained weights yet (models/model.pt); train it first (POST /train/{model})."
            )
        checked = check_infer_request(request, cuda_available=torch.cuda.is_available())
        datastore = datastore if datastore else self.datastore()
        checked["image"] = self.resolve_request_image(request.get("image"), datastore)
        return super().infer(checked, datastore)

    def resolve_request_image(self, image: Any, datastore: Datastore) -> str:
        """The file an inference request may read for ``image`` (see :meth:`infer`).

        Raises:
            ClientError: 400 no image given; 404 not a datastore id, upload or session image.
        """
        if not isinstance(image, str) or not image:
            raise ClientError(400, "image: give the id of a datastore image (or upload the image with the request).")
        if os.path.isabs(image):
            sessions = self.sessions()
            session_dir = getattr(sessions, "store_path", None) if sessions is not None else None
            if is_fresh_upload(image) or (session_dir and is_inside(image, session_dir) and os.path.exists(image)):
                return image
            raise ClientError(
                404, "image: paths on the server are not accepted; give the id of a datastore image (GET /datastore/)."
            )
        image = check_lookup_id(image)
        try:
            uri = datastore.get_image_uri(image)
        except Exception as e:  # noqa: BLE001 - a datastore (e.g. DICOMweb) failing to find it
            logger.info("image %r not found in the datastore: %s", image[:80], e)
            uri = ""
        if not uri or not os.path.exists(uri):
            raise ClientError(404, f"image {image[:80]!r} is not in the datastore.")
        return uri

    def next_sample(self, request):
        res = super().next_sample(request)
        res.pop("path", None)  # an absolute server path; clients fetch the image by its id
        return res

    def batch_infer(self, request, datastore=None):
        raise ClientError(
            403,
            "batch inference through the server is off: run the bundle's inference.json on a folder instead "
            "(python -m monai.bundle run --config_file <bundle>/configs/inference.json --input_dir ...).",
        )

    def check_task_request(self, method: str, request: dict[str, Any]) -> None:
        """Refuses a queued task's request before MONAI Label starts it (called by :func:`install_server_guards`)."""
        if method == "batch_infer":
            self.batch_infer(request)
        if method != "train":
            return
        if not self._trainers:
            raise ClientError(
                403,
                f"training through the server is off (profile {self.profile!r}); start it with --conf profile train.",
            )
        model = request.get("model")
        task = self._trainers.get(model) if isinstance(model, str) else None
        if task is None:
            raise ClientError(404, f"unknown model {str(model)[:60]!r}; trainers: {sorted(self._trainers)}.")
        task.check_request(request, self.datastore())

    def train(self, request):
        self.check_task_request("train", dict(request))
        return super().train(request)


def install_server_guards() -> None:
    """Makes MONAI Label's server (``monailabel.app``, when it runs in this process) answer client mistakes with 4xx.

    - Training (and batch inference) requests go through :meth:`MedADApp.check_task_request` before MONAI Label
      queues them: for ``run_sync=false`` the run itself happens in another process, whose failure the client would
      otherwise only see later in ``GET /train/``. (``AsyncTask.run`` of monailabel 0.8.5 is wrapped.)
    - Malformed JSON in a request's ``params`` is 400, and MONAI Label's own ``INVALID_INPUT`` errors are 400.

    A no-op outside the server (the training subprocess, tests building the app directly).
    """
    server = sys.modules.get("monailabel.app")
    fastapi_app = getattr(server, "app", None)
    if fastapi_app is None:
        return
    from monailabel.interfaces.utils.app import app_instance
    from monailabel.utils.async_tasks.task import AsyncTask

    if not getattr(AsyncTask.run, "medad_guard", False):
        original = AsyncTask.run

        def run(method, request=None, params=None, force_sync=False, enqueue=False):
            merged = {**(request or {}), **(params or {})}
            check = getattr(app_instance(), "check_task_request", None)
            if check is not None:
                check(method, merged)
            return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

        run.medad_guard = True
        AsyncTask.run = staticmethod(run)

    if not getattr(fastapi_app.state, "medad_guards", False):
        from fastapi.responses import JSONResponse

        _turn_off_endpoints()
        if settings.MONAI_LABEL_AUTH_ENABLE:
            _fix_token_decoding()

        async def bad_json(_request, exc):
            return JSONResponse(status_code=400, content={"detail": f"params is not valid JSON: {exc}"})

        async def monailabel_error(_request, exc):
            status = 400 if exc.error == MONAILabelError.INVALID_INPUT else 500
            return JSONResponse(status_code=status, content={"detail": f"{exc.error.name}: {exc.msg}"})

        fastapi_app.add_exception_handler(json.JSONDecodeError, bad_json)
        fastapi_app.add_exception_handler(MONAILabelException, monailabel_error)
        fastapi_app.state.medad_guards = True
        # Starlette built its middleware stack (which copies the handlers) before the app was created at start-up;
        # dropping it makes the next request build it again with these handlers
        fastapi_app.middleware_stack = None


def _turn_off_endpoints() -> None:
    """The served weights change only through a checked training run (or a person on the server): MONAI Label's
    weight upload and delete answer 403; without authentication, so do the weight and log downloads (the log holds
    server paths). The endpoint modules' functions are replaced, so the routes answer with the reason."""
    from monailabel.endpoints import logs as logs_endpoint
    from monailabel.endpoints import model as model_endpoint

    def refuse(what: str):
        def refused(*args: Any, **kwargs: Any):
            raise ClientError(
                403,
                f"{what} is turned off on this server: the served model changes only through training with --conf "
                "profile train (docs/monailabel.md, \"Security\").",
            )

        return refused

    model_endpoint.update_model = refuse("uploading model weights")
    model_endpoint.delete_model = refuse("deleting model weights")
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        model_endpoint.download_model = refuse("downloading model weights without authentication")
        logs_endpoint.get_logs = refuse("reading the server log without authentication")


class _JWTWithAlgorithms:
    """``jwt`` as MONAI Label's auth module uses it, with the signature algorithms PyJWT 2 requires."""

    def __init__(self, module: Any, algorithms: tuple[str, ...] = ("RS256",)) -> None:
        self.module, self.algorithms = module, algorithms

    def decode(self, token: str, key: str, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("algorithms", list(self.algorithms))
        return self.module.decode(token, key, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def _fix_token_decoding() -> None:
    """MONAI Label 0.8.5 requires PyJWT >= 2.8 but calls ``jwt.decode`` without ``algorithms``, which PyJWT 2 refuses:
    with ``MONAI_LABEL_AUTH_ENABLE=true`` every token, valid or not, is answered 401. The app passes RS256 (what
    Keycloak signs with; MONAI Label fetches the realm's RSA public key), so authentication works as documented."""
    from monailabel.endpoints.user import auth

    if not isinstance(auth.jwt, _JWTWithAlgorithms):
        auth.jwt = _JWTWithAlgorithms(auth.jwt)


def _warn_if_exposed() -> None:
    """Warns when the server listens beyond this machine without MONAI Label's authentication."""
    if "monailabel.app" not in sys.modules or settings.MONAI_LABEL_AUTH_ENABLE:
        return
    argv = sys.argv
    host = argv[argv.index("--host") + 1] if "--host" in argv[:-1] else "0.0.0.0"  # MONAI Label's default
    if host not in LOOPBACK_HOSTS:
        logger.warning(
            "medad-monai: the server listens on %s WITHOUT authentication: anyone who reaches this machine can use "
            "it. Bind it with --host 127.0.0.1 or turn MONAI Label's authentication on (docs/monailabel.md, "
            "\"Security\").",
            host,
        )
