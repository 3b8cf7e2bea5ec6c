"""What a request to the MONAI Label app may ask for: request checks that keep data out of code, files and paths.

MONAI Label hands request values straight to places that execute or open them: a ``bundle_overrides`` value
starting with ``$`` reaches ``monai.bundle.run``, which evaluates it as Python; an image id or a file name becomes a
path joined to the studies folder; a path that exists on the server is read as the image. Every check of the app
lives here, with no ``monailabel`` import, so it is unit-tested in the core environment and used by
:mod:`medad_monai.apps.label.main` (profiles, inference), :mod:`medad_monai.apps.label.train` (training requests) and
:mod:`medad_monai.apps.label.datastore` (uploads, deletes).

The rules (docs/monailabel.md, "Security"):

- **Requests carry data, never code.** Training requests are checked against :data:`TRAIN_REQUEST_KEYS` and
  ``bundle_overrides`` against :data:`TRAIN_OVERRIDES` (an allow-list of plain settings with their types and ranges);
  any string that MONAI's config parser would evaluate or resolve (``$`` expressions, ``@`` references, ``%``
  macros, ``#`` paths) is refused, as is any key not on the lists. Inference parameters follow
  :data:`INFER_REQUEST_KEYS`.
- **Names are names.** Image ids, label tags and uploaded file names are checked with :func:`check_new_id` /
  :func:`check_upload_name` (no separators, no ``..``, no absolute paths, known image extensions only).
- **Client mistakes are 4xx.** Every refusal is a :class:`ClientError` (a FastAPI ``HTTPException`` where FastAPI
  is installed) with a one-line reason and no server path.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from medad_monai.data.readers import SUPPORTED_EXTENSIONS
from medad_monai.evaluation.scoring import SCORE_METHODS

try:  # the label environment has FastAPI (MONAI Label's server); the core environment tests these checks without it
    from fastapi import HTTPException as _HTTPBase
except ImportError:  # pragma: no cover - exercised in the core environment
    _HTTPBase = Exception

__all__ = [
    "ClientError",
    "PROFILES",
    "TRAIN_REQUEST_KEYS",
    "TRAIN_OVERRIDES",
    "INFER_REQUEST_KEYS",
    "RESULT_EXTENSIONS",
    "UPLOAD_EXTENSIONS",
    "DEFAULT_MIN_CALIBRATION_IMAGES",
    "DEFAULT_MAX_UPLOAD_MB",
    "is_config_syntax",
    "check_new_id",
    "check_lookup_id",
    "check_upload_name",
    "check_result_extension",
    "check_train_request",
    "check_infer_request",
    "is_fresh_upload",
    "is_inside",
]

#: ``--conf profile`` values: what the server lets clients do (docs/monailabel.md, "Security").
PROFILES = {
    "inference": "inference only; the datastore is read-only and the trainers are off (default)",
    "annotate": "inference, checked image/label uploads and deletes; trainers off",
    "train": "as annotate, plus training through POST /train (publishing the result needs publish_trained_model)",
}

#: fewer healthy validation images than this cannot calibrate a 5 % false-positive threshold: the 95th percentile of
#: fewer than 20 scores is simply their maximum (``--conf min_calibration_images`` changes it).
DEFAULT_MIN_CALIBRATION_IMAGES = 20
#: largest accepted upload (``--conf max_upload_mb``); a radiograph is a few MB, a 16-bit 4k x 4k DICOM 32 MB.
DEFAULT_MAX_UPLOAD_MB = 64.0

#: extensions an uploaded image or label may have: what :func:`medad_monai.data.load_image` reads.
UPLOAD_EXTENSIONS = tuple(sorted(set(SUPPORTED_EXTENSIONS), key=lambda e: (-len(e), e)))
#: heatmap file types the infer task writes (``result_extension``).
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]{1,2})?)$")
_MODEL_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.pt$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# NamedTemporaryFile names: "tmp" + 8 characters of tempfile's alphabet, then the upload's own suffix
_UPLOAD_TEMP = re.compile(r"^tmp[a-z0-9_]{8}(\.[A-Za-z0-9]{1,8}){0,2}$")
#: seconds an uploaded file (MONAI Label writes it to the temp folder just before the inference) counts as fresh.
UPLOAD_MAX_AGE_S = 600.0


class ClientError(_HTTPBase):
    """A request the server refuses: ``status_code`` (4xx) and a one-line ``detail`` without server paths.

    A FastAPI ``HTTPException`` in the label environment, so MONAI Label's server answers with that status wherever
    in a request it is raised.
    """

    def __init__(self, status_code: int, detail: str) -> None:
        if _HTTPBase is Exception:
            super().__init__(detail)
        else:
            super().__init__(status_code=status_code, detail=detail)
        self.status_code = status_code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


# ---------------------------------------------------------------------------------------------------------------------
# strings that a MONAI config would execute


def is_config_syntax(value: str) -> bool:
    """Whether MONAI's ``ConfigParser`` would evaluate or resolve ``value`` (``$`` expression, ``@`` reference,
    ``%`` macro, ``#`` id path) rather than keep it as text."""
    return value.startswith(("$", "@", "%")) or "@" in value or "#" in value


def _no_config_syntax(value: Any, where: str) -> None:
    if isinstance(value, str) and is_config_syntax(value):
        raise ClientError(
            400,
            f"{where}: {value[:60]!r} looks like a MONAI config expression or reference ($, @, %, #); request values "
            "are data only.",
        )
    if isinstance(value, Mapping):
        for k, v in value.items():
            _no_config_syntax(str(k), where)
            _no_config_syntax(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _no_config_syntax(v, where)


# ---------------------------------------------------------------------------------------------------------------------
# typed values


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ClientError(400, f"{key} must be true or false, got {value!r}.")


def _as_number(value: Any, key: str, kind: type, low: float | None, high: float | None, open_low: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ClientError(400, f"{key} must be a number, got {value!r}.")
    try:
        number = float(value)
    except ValueError:
        raise ClientError(400, f"{key} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ClientError(400, f"{key} must be finite, got {value!r}.")
    if kind is int:
        if number != int(number):
            raise ClientError(400, f"{key} must be a whole number, got {value!r}.")
        number = int(number)
    too_low = low is not None and (number <= low if open_low else number < low)
    if too_low or (high is not None and number > high):
        lo = "" if low is None else f"{'>' if open_low else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        raise ClientError(400, f"{key} must be {' and '.join(s for s in (lo, hi) if s)}, got {value!r}.")
    return number


def _first(value: Any) -> Any:
    """MONAI Label's config lists the choices; clients send the list back or its chosen first element."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


# ---------------------------------------------------------------------------------------------------------------------
# names and paths


def check_new_id(value: Any, what: str = "image id") -> str:
    """A name that becomes a file name in the studies folder: letters, digits, ``_ . -``, at most 128 characters,
    starting with a letter or digit (so no separators, no ``..``, no absolute path, no hidden file)."""
    if not isinstance(value, str) or not _SAFE_ID.match(value) or ".." in value:
        raise ClientError(
            400,
            f"{what} {str(value)[:80]!r} is not allowed: use letters, digits, '_', '.', '-' (at most 128, starting "
            "with a letter or digit; no path separators or '..').",
        )
    return value


def check_lookup_id(value: Any, what: str = "image") -> str:
    """An id to look up in the datastore: any non-empty text without path separators, NUL or a leading ``.``."""
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise ClientError(400, f"{what} must be a datastore id, got {str(value)[:80]!r}.")
    if value.startswith(".") or "/" in value or "\\" in value or "\0" in value:
        raise ClientError(404, f"{what} {value[:80]!r} is not an id of this server's datastore.")
    return value


def upload_extension(name: str) -> str | None:
    """The supported image extension ``name`` ends with (``.nii.gz`` before ``.gz``), else ``None``."""
    lower = name.lower()
    return next((e for e in UPLOAD_EXTENSIONS if lower.endswith(e)), None)


def check_upload_name(path: str, what: str = "uploaded file") -> str:
    """The extension of an uploaded file (MONAI Label keeps the client's suffixes), refused unless it is an image
    type :func:`medad_monai.data.load_image` reads."""
    ext = upload_extension(os.path.basename(str(path)))
    if ext is None:
        raise ClientError(
            415,
            f"{what}: file type {''.join(os.path.splitext(os.path.basename(str(path)))[1:])!r} is not accepted; "
            f"images only ({', '.join(UPLOAD_EXTENSIONS)}).",
        )
    return ext


def check_result_extension(value: Any) -> str:
    """``result_extension`` of an inference request: one of :data:`RESULT_EXTENSIONS` (default ``.nii.gz``)."""
    value = _first(value)
    if value in (None, ""):
        return RESULT_EXTENSIONS[0]
    ext = str(value).lower()
    ext = ext if ext.startswith(".") else "." + ext
    if ext not in RESULT_EXTENSIONS:
        raise ClientError(400, f"result_extension must be one of {list(RESULT_EXTENSIONS)}, got {str(value)[:40]!r}.")
    return ext


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` (links resolved) lies inside ``folder`` (links resolved)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def is_fresh_upload(path: str | os.PathLike, max_age_s: float = UPLOAD_MAX_AGE_S) -> bool:
    """Whether ``path`` is a file MONAI Label's ``/infer`` endpoint has just written for an uploaded image: a regular
    file (not a link) named like ``tempfile.NamedTemporaryFile`` directly in the temp folder, modified within
    ``max_age_s`` seconds. Anything else a request names by path is refused."""
    path = os.fspath(path)
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(tempfile.gettempdir()):
        return False
    if not _UPLOAD_TEMP.match(os.path.basename(path)):
        return False
    return time.time() - os.stat(path).st_mtime <= max_age_s


# ---------------------------------------------------------------------------------------------------------------------
# training requests

#: settings of a bundle's ``train.json`` a training request may change (``bundle_overrides``), with type and range;
#: a key is accepted only where the bundle's own ``train.json`` has it.
TRAIN_OVERRIDES: dict[str, tuple[type, float | None, float | None]] = {
    "batch_size": (int, 1, 4096),
    "learning_rate": (float, 0.0, 1.0),
    "base_learning_rate": (float, 0.0, 1.0),
    "weight_decay": (float, 0.0, 1.0),
    "warmup_epochs": (int, 0, 100000),
    "val_interval": (int, 1, 100000),
    "early_stop_patience": (int, 1, 100000),
    "num_workers": (int, 0, 64),
    "cache_rate": (float, 0.0, 1.0),
    "seed": (int, 0, 2**31 - 1),
    "percentile": (float, 0.0, 100.0),
    "map_sigma": (float, 0.0, 64.0),
    "image_fpr": (float, 0.0, 0.5),
    "pixel_fpr": (float, 0.0, 0.5),
    "score_method": (str, None, None),
}
_OPEN_LOW = {"learning_rate", "base_learning_rate", "image_fpr", "pixel_fpr"}
_CHOICES = {"score_method": SCORE_METHODS}

#: keys a training request may hold: what MONAI Label's clients send (the trainer's ``config()``, with the server's
#: ``model`` and ``bundle_path``) plus ours. Values are checked by :func:`check_train_request`.
TRAIN_REQUEST_KEYS = (
    "model",
    "bundle_path",
    "max_epochs",
    "val_split",
    "device",
    "pretrained",
    "multi_gpu",
    "force_multi_gpu",
    "gpus",
    "tracking",
    "tracking_uri",
    "tracking_experiment_name",
    "tracking_run_name",
    "run_id",
    "model_filename",
    "exclude_labeled",
    "bundle_overrides",
)
MAX_EPOCHS_LIMIT = 100000


def check_train_request(
    request: Mapping[str, Any],
    bundle_settings: Mapping[str, Any],
    model_files: list[str] | tuple[str, ...] = ("model.pt",),
    cuda_available: bool = False,
    bundle_path: str | None = None,
) -> dict[str, Any]:
    """The checked, typed settings of a training request, or :class:`ClientError` 400 naming the first bad value.

    Args:
        request: the request as MONAI Label merged it (trainer config, then the client's JSON).
        bundle_settings: the bundle's ``train.json`` top-level items (``bundle_overrides`` keys must be among them).
        model_files: ``*.pt`` files of the bundle's ``models/`` that ``model_filename`` may name.
        cuda_available: whether ``device`` may be CUDA.
        bundle_path: the task's bundle folder. MONAI Label sets ``bundle_path`` in the request itself and puts it on
            the ``PYTHONPATH`` of a queued run; a different value (sent by a client) is refused.

    Returns:
        ``{"max_epochs", "val_split", "device", "pretrained", "model_filename", "exclude_labeled", "overrides"}``,
        ``overrides`` being the checked ``bundle_overrides`` (plain ints, floats and strings).
    """
    if not isinstance(request, Mapping):
        raise ClientError(400, f"the training request must be a JSON object, got {type(request).__name__}.")
    unknown = sorted(str(k) for k in request if k not in TRAIN_REQUEST_KEYS)
    if unknown:
        raise ClientError(400, f"unknown training parameter(s) {unknown}; accepted: {list(TRAIN_REQUEST_KEYS[2:])}.")
    sent_path = request.get("bundle_path")
    if sent_path is not None and (
        bundle_path is None or os.path.realpath(str(sent_path)) != os.path.realpath(bundle_path)
    ):
        raise ClientError(400, "bundle_path is set by the server, not by a request.")
    for key, value in request.items():
        if key != "bundle_path":  # the server's own (checked above)
            _no_config_syntax(value, key)

    out: dict[str, Any] = {
        "max_epochs": _as_number(request.get("max_epochs", 50), "max_epochs", int, 1, MAX_EPOCHS_LIMIT),
        "val_split": _as_number(request.get("val_split", 0.2), "val_split", float, 0.0, 0.99, open_low=True),
        "pretrained": _as_bool(request.get("pretrained", True), "pretrained"),
        "exclude_labeled": _as_bool(request.get("exclude_labeled", True), "exclude_labeled"),
    }
    device = _first(request.get("device")) or ("cuda" if cuda_available else "cpu")
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ClientError(400, f"device must be 'cpu', 'cuda' or 'cuda:N', got {str(device)[:40]!r}.")
    out["device"] = device if cuda_available or not device.startswith("cuda") else "cpu"  # as MONAI Label does
    for key in ("multi_gpu", "force_multi_gpu"):
        if _as_bool(request.get(key, False), key):
            raise ClientError(
                400,
                f"{key}=true is not supported through MONAI Label; train on several GPUs with torchrun and the "
                "bundle's multi_gpu_train.json (README).",
            )
    gpus = _first(request.get("gpus", "all"))
    if not (gpus in ("all", "") or (isinstance(gpus, str) and re.fullmatch(r"[0-9]{1,2}(,[0-9]{1,2})*", gpus))):
        raise ClientError(400, f"gpus must be 'all' or a comma-separated list of GPU indices, got {str(gpus)[:40]!r}.")
    tracking = _first(request.get("tracking", "None"))
    if tracking not in (None, "", "None", "none"):
        raise ClientError(
            400,
            f"tracking={str(tracking)[:40]!r}: experiment tracking is off for training through the server; track "
            "with the bundle CLI (--tracking configs/mlflow_tracking.json).",
        )
    for key in ("tracking_experiment_name", "tracking_run_name", "tracking_uri"):
        if not isinstance(request.get(key, ""), (str, type(None))):
            raise ClientError(400, f"{key} must be text, got {request.get(key)!r}.")
    run_id = request.get("run_id") or "run"
    if run_id != "run":
        raise ClientError(400, f"run_id must be 'run' (train, then calibrate), got {str(run_id)[:40]!r}.")
    model_file = _first(request.get("model_filename")) or "model.pt"
    if not isinstance(model_file, str) or not _MODEL_FILE.match(model_file) or model_file.startswith("checkpoint_"):
        raise ClientError(400, f"model_filename must be a .pt file name of the bundle's models/, got {model_file!r}.")
    if out["pretrained"] and model_file != "model.pt" and model_file not in model_files:
        raise ClientError(400, f"model_filename {model_file!r} is not in the bundle's models/ ({list(model_files)}).")
    out["model_filename"] = model_file

    extra = request.get("bundle_overrides") or {}
    if not isinstance(extra, Mapping):
        raise ClientError(400, f"bundle_overrides must be a JSON object, got {str(extra)[:60]!r}.")
    overrides: dict[str, Any] = {}
    for key, value in extra.items():
        if key not in TRAIN_OVERRIDES:
            raise ClientError(
                400, f"bundle_overrides: {str(key)[:40]!r} may not be changed by a request; allowed: "
                f"{sorted(k for k in TRAIN_OVERRIDES if k in bundle_settings)}."
            )
        if key not in bundle_settings:
            raise ClientError(400, f"bundle_overrides: this bundle's train.json has no setting {key!r}.")
        kind, low, high = TRAIN_OVERRIDES[key]
        if kind is str:
            if not isinstance(value, str) or value not in _CHOICES[key]:
                raise ClientError(400, f"bundle_overrides: {key} must be one of {list(_CHOICES[key])}, got {value!r}.")
            overrides[key] = value
        else:
            overrides[key] = _as_number(value, f"bundle_overrides.{key}", kind, low, high, open_low=key in _OPEN_LOW)
    out["overrides"] = overrides
    return out


# ---------------------------------------------------------------------------------------------------------------------
# inference requests

#: keys an inference request may hold (the endpoint's ``model``/``image``/``label``, the task's config, and what
#: MONAI Label's clients add). ``save_label`` is accepted but results are never written into the datastore.
INFER_REQUEST_KEYS = (
    "model",
    "image",
    "label",
    "heatmap",
    "result_extension",
    "result_dtype",
    "device",
    "logging",
    "client_id",
    "label_tag",
    "save_label",
    "model_filename",
    "description",
    "result_compress",
    "timeout",
)


def check_infer_request(request: Mapping[str, Any], cuda_available: bool = False) -> dict[str, Any]:
    """Checks an inference request's parameters (not its image: see :meth:`MedADApp.infer
    <medad_monai.apps.label.main.MedADApp.infer>`); returns a copy with ``device`` and ``result_extension`` normalised.

    Raises:
        ClientError: 400 for an unknown key, config syntax, or a bad device, log level, extension or model file.
    """
    if not isinstance(request, Mapping):
        raise ClientError(400, f"the inference parameters must be a JSON object, got {type(request).__name__}.")
    unknown = sorted(str(k) for k in request if k not in INFER_REQUEST_KEYS)
    if unknown:
        raise ClientError(
            400, f"unknown inference parameter(s) {unknown}; accepted: {list(INFER_REQUEST_KEYS[3:13])}."
        )
    out = dict(request)
    for key, value in request.items():
        if key not in ("image", "label"):  # checked as datastore ids / upload paths by the app
            _no_config_syntax(value, key)
    device = _first(request.get("device")) or ("cuda" if cuda_available else "cpu")
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ClientError(400, f"device must be 'cpu', 'cuda' or 'cuda:N', got {str(device)[:40]!r}.")
    out["device"] = device if cuda_available or not device.startswith("cuda") else "cpu"
    level = request.get("logging", "INFO")
    if not isinstance(level, str) or level.upper() not in _LOG_LEVELS:
        raise ClientError(400, f"logging must be one of {list(_LOG_LEVELS)}, got {str(level)[:40]!r}.")
    out["result_extension"] = check_result_extension(request.get("result_extension"))
    model_file = _first(request.get("model_filename")) or "model.pt"
    if model_file != "model.pt":
        raise ClientError(400, f"model_filename: this server serves models/model.pt only, got {str(model_file)[:60]!r}.")
    out.pop("model_filename", None)
    if "timeout" in request:
        out["timeout"] = _as_number(request["timeout"], "timeout", float, 0.0, 3600.0, open_low=True)
    out["save_label"] = False
    return out
