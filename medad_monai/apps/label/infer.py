"""MONAI Label inference task that serves an anomaly-detection bundle: heatmap image plus image score and label.

The bundle's ``configs/inference.json`` gives the network (``network_def``, an
:class:`~medad_monai.networks.AnomalyMapNet` that returns one ``(B, 1, H, W)`` map), the preprocessing and the inferer,
exactly as ``python -m monai.bundle run`` uses them; ``models/model.pt`` gives the weights and
``models/calibration.json`` (written by the bundle's ``calibration`` step) the thresholds.

What one request returns (MONAI Label's ``/infer/<model>``):

- an image file, the **heatmap**, resized back to the input's size (bilinear, ``align_corners=False``; our choice,
  the map is continuous). Request parameter ``heatmap``:

  - ``"raw"`` (default): the anomaly map as float32, in the model's units (never normalised per image);
  - ``"display"``: the calibration's dataset-level display normalisation
    (:meth:`~medad_monai.evaluation.calibration.Calibration.normalize_map`, the pixel threshold maps to 0.5) as uint8
    0..255;
  - ``"mask"``: uint8, 1 where the map is above the calibrated pixel threshold, else 0.

  The file type follows ``result_extension`` (default ``.nii.gz``). PNG only holds integers, so ``.png`` needs
  ``"display"`` or ``"mask"``. The image is written with ITK like every MONAI Label result, with x along the
  columns of the input, so it overlays the input in 3D Slicer (ITK reads the PNG/DICOM input the same way).
- JSON ``params`` with ``anomaly_score`` (the :func:`~medad_monai.evaluation.scoring.aggregate_score` of the map at the
  network's resolution, as the bundle's evaluator computes it), ``anomaly_label`` (1 anomalous, 0 normal, -1 when the
  bundle has no calibration), ``anomaly_class`` (``"anomalous"``/``"normal"``/``"uncalibrated"``),
  ``normalized_score`` (:meth:`~medad_monai.evaluation.calibration.Calibration.normalize_score`), the thresholds and the
  score settings used.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, SaveImaged
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask
from monailabel.utils.others.generic import strtobool

from medad_monai.evaluation.calibration import Calibration
from medad_monai.data.readers import DICOM_EXTENSIONS, ImageReadError
from medad_monai.data.transforms import LoadAnomalyImaged
from medad_monai.evaluation.model_record import bundle_identity
from medad_monai.evaluation.predictor import AnomalyPredictor, BundleLoadError, bundle_parser, load_weights
from medad_monai.evaluation.scoring import to_tensor

from .security import ClientError, check_result_extension

__all__ = [
    "HEATMAP_MODES",
    "resolve_image_path",
    "ResolveImagePathd",
    "RecordSpatialShaped",
    "AnomalyResultd",
    "AnomalyBundleInferTask",
]

logger = logging.getLogger(__name__)

#: values of the ``heatmap`` request parameter (the first is the default).
HEATMAP_MODES = ("raw", "display", "mask")
#: key under which :class:`RecordSpatialShaped` keeps the loaded image's ``(H, W)``.
ORIGINAL_SHAPE_KEY = "image_original_shape"
_INTEGER_ONLY_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def _is_dicom_file(path: str) -> bool:
    if path.lower().endswith(DICOM_EXTENSIONS):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _single_dicom_in(folder: str) -> str | None:
    files = sorted(
        os.path.join(folder, n)
        for n in os.listdir(folder)
        if not n.startswith(".") and _is_dicom_file(os.path.join(folder, n))
    )
    if not files:
        return None
    if len(files) > 1:
        raise ValueError(
            f"{folder} holds a DICOM series of {len(files)} images; the anomaly models read one 2D radiograph "
            "(DX/CR/MG: one instance per series). Send the instance file itself."
        )
    return files[0]


def resolve_image_path(path: str) -> str:
    """The file the bundle's reader should open for a path handed over by a MONAI Label datastore.

    A folder (what the DICOMweb datastore hands over for a series, see :meth:`MedADApp._init_dicomweb_datastore
    <medad_monai.apps.label.main.MedADApp._init_dicomweb_datastore>`, or a local DICOM series folder) becomes its single
    DICOM instance; anything else is returned unchanged.

    Raises:
        ValueError: a folder without DICOM files, or with more than one image.
    """
    path = str(path)
    if os.path.isdir(path):
        found = _single_dicom_in(path)
        if found is None:
            raise ValueError(f"{path} is a folder without DICOM files; expected one 2D image file.")
        return found
    return path


class ResolveImagePathd(MapTransform):
    """Replaces each key's path by :func:`resolve_image_path` (before the bundle's loader runs)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, os.PathLike)):
                d[key] = resolve_image_path(str(d[key]))
        return d


class RecordSpatialShaped(MapTransform):
    """Keeps the loaded image's ``(H, W)`` under ``shape_key`` so the heatmap can be resized back to it.

    Runs right after the bundle's loader: the bundle's preprocessing ends with ``EnsureTyped(track_meta=False)``, so
    no image metadata survives to tell the original size later (MONAI Label's own ``Restored`` reads it from there).
    """

    def __init__(self, keys: str = "image", shape_key: str = ORIGINAL_SHAPE_KEY) -> None:
        super().__init__(keys)
        self.shape_key = shape_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.shape_key] = [int(s) for s in d[key].shape[-2:]]
        return d


def _heatmap_mode(value: Any) -> str:
    mode = value[0] if isinstance(value, (list, tuple)) and value else value
    mode = HEATMAP_MODES[0] if mode in (None, "") else str(mode).lower()
    if mode not in HEATMAP_MODES:
        raise ClientError(400, f"heatmap must be one of {list(HEATMAP_MODES)}, got {str(value)[:40]!r}.")
    return mode


def _result_extension(data: Mapping[str, Any], mode: str) -> str:
    """The heatmap file's extension (``result_extension``, one of
    :data:`~medad_monai.apps.label.security.RESULT_EXTENSIONS`, default ``.nii.gz``); PNG only for integer heatmaps."""
    ext = check_result_extension(data.get("result_extension"))
    if mode == "raw" and ext in _INTEGER_ONLY_EXTENSIONS:
        raise ClientError(
            400,
            f"{ext} holds integers only; the raw heatmap is float. Ask for heatmap 'display' or 'mask', or a float "
            "format (.nii.gz, .nrrd).",
        )
    return ext


class AnomalyResultd(MapTransform):
    """Scores the anomaly map, applies the calibration and turns the map into the heatmap image MONAI Label writes.

    Input: ``d[pred_key]`` the ``(1, h, w)`` map at the network's resolution. Output: ``d[pred_key]`` the heatmap
    ``(W, H)`` at the input's ``(H, W)`` (``shape_key``), transposed because MONAI Label's ITK writer transposes
    arrays back (its loaders give x-first arrays), and ``d[result_key]`` the JSON fields described in the module
    docstring.

    Args:
        predictor: the bundle's :class:`~medad_monai.evaluation.predictor.AnomalyPredictor` (the one predictor of every
            entry point): its :meth:`~medad_monai.evaluation.predictor.AnomalyPredictor.decide` gives the score, label
            and mask, from its calibration (without one: no labels, and ``display`` and ``mask`` heatmaps are refused).
        heatmap: one of :data:`HEATMAP_MODES`.
        pred_key, shape_key, result_key: data keys.
        model_name: reported in the JSON.

    Example::

        >>> from medad_monai.evaluation.predictor import AnomalyPredictor
        >>> t = AnomalyResultd(AnomalyPredictor(torch.nn.Identity()), heatmap="raw")
        >>> d = t({"pred": torch.ones(1, 8, 8), "image_original_shape": [16, 32]})
        >>> d["pred"].shape, d["result"]["anomaly_score"], d["result"]["anomaly_label"]
        ((32, 16), 1.0, -1)
    """

    def __init__(
        self,
        predictor: AnomalyPredictor,
        heatmap: str = "raw",
        pred_key: str = "pred",
        shape_key: str = ORIGINAL_SHAPE_KEY,
        result_key: str = "result",
        model_name: str = "",
    ) -> None:
        super().__init__(pred_key)
        self.predictor = predictor
        self.heatmap = _heatmap_mode(heatmap)
        if self.heatmap != "raw" and predictor.calibration is None:
            raise ClientError(
                409,
                f"heatmap={self.heatmap!r} needs the bundle's models/calibration.json; run the bundle's calibration "
                "(or train through MONAI Label, which calibrates) or ask for heatmap='raw'.",
            )
        self.pred_key = pred_key
        self.shape_key = shape_key
        self.result_key = result_key
        self.model_name = model_name

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        amap = to_tensor(d[self.pred_key], self.pred_key).detach().float().cpu()
        if amap.ndim == 2:
            amap = amap[None]
        if amap.ndim != 3 or amap.shape[0] != 1:
            raise ValueError(
                f"medad_monai.apps.label: the network returned a map of shape {tuple(amap.shape)}; expected (1, H, W). "
                "Check that network_def in the bundle's inference.json is medad_monai.networks.AnomalyMapNet."
            )
        decided = self.predictor.decide(amap[None])
        score = float(decided.pred_score[0])
        cal = self.predictor.calibration
        result: dict[str, Any] = {
            "model": self.model_name,
            "anomaly_score": score,
            "score_method": self.predictor.score_method,
            "percentile": self.predictor.percentile,
            "map_size": [int(s) for s in amap.shape[-2:]],
            "heatmap": self.heatmap,
        }
        if cal is not None:
            label = int(decided.pred_label[0])
            result.update(
                {
                    "anomaly_label": label,
                    "anomaly_class": "anomalous" if label else "normal",
                    "normalized_score": float(cal.normalize_score(score)),
                    "image_threshold": cal.image_threshold,
                    "pixel_threshold": cal.pixel_threshold,
                    "image_fpr": cal.image_fpr,
                    "pixel_fpr": cal.pixel_fpr,
                    "anomalous_pixel_fraction": float(decided.pred_mask.float().mean()),
                }
            )
        else:
            result.update({"anomaly_label": -1, "anomaly_class": "uncalibrated", "normalized_score": None})

        size = tuple(int(s) for s in d.get(self.shape_key, amap.shape[-2:]))
        full = amap[None]
        if tuple(full.shape[-2:]) != size:
            full = F.interpolate(full, size=size, mode="bilinear", align_corners=False)
        full = full[0, 0]
        if self.heatmap == "raw":
            out = full.numpy().astype(np.float32)
        elif self.heatmap == "display":
            out = torch.round(cal.normalize_map(full) * 255.0).to(torch.uint8).numpy()
        else:
            out = (full > cal.pixel_threshold).to(torch.uint8).numpy()
        result["heatmap_range"] = [float(out.min()), float(out.max())]
        result["image_size"] = list(size)
        d[self.pred_key] = np.ascontiguousarray(out.T)
        d[self.result_key] = {**d.get(self.result_key, {}), **result}
        return d


class AnomalyBundleInferTask(BundleInferTask):
    """A ``BundleInferTask`` for the medad-monai anomaly bundles (MemMC-MAE, MorphAEus).

    Differences from MONAI Label's ``BundleInferTask`` (why):

    - the task is created even when the bundle has no ``models/model.pt`` yet, and :meth:`is_valid` is true only once
      it exists, so a model trained through MONAI Label appears without restarting the server (the stock task
      ignores untrained bundles for good);
    - weights are loaded by the package's one loader (:func:`medad_monai.evaluation.predictor.load_weights`: checked
      file, ``torch.load(weights_only=True)``, strict: ``AnomalyMapNet`` accepts the training network's plain state
      dict, so a mismatch is a real error rather than the stock task's warning), and the score, label and mask come from
      the package's one predictor (:class:`~medad_monai.evaluation.predictor.AnomalyPredictor`), as in bundle inference
      and Deploy;
    - the input path goes through :func:`resolve_image_path` (a DICOMweb series folder becomes its DICOM file);
    - post-processing is :class:`AnomalyResultd` (score, calibrated label, heatmap at the input's size) instead of
      ``Restored``, which needs image metadata our preprocessing does not keep.

    Args:
        path: the bundle folder (``configs/inference.json``, ``configs/metadata.json``, ``models/``).
        conf: the server's ``--conf`` values: ``preload``, and ``bundle_configs`` (the bundle's override files the
            model was trained with, comma-separated, e.g. ``configs/demo.json``; default ``$MEDAD_BUNDLE_CONFIGS``).
        name: the model name shown by MONAI Label (default: the folder name).
        type: MONAI Label infer type (default ``segmentation``: clients list it as an automatic model).
        kwargs: passed to ``BasicInferTask``.
    """

    def __init__(
        self,
        path: str,
        conf: dict[str, str] | None = None,
        name: str | None = None,
        type: str | InferType = InferType.SEGMENTATION,
        **kwargs: Any,
    ) -> None:
        conf = conf or {}
        self.valid = False
        self.const = BundleConstants()
        self.pre_filter = None
        self.post_filter = [SaveImaged]
        self.extend_load_image = False
        self.add_post_restore = False
        self.dropout = 0.0
        self.name = name or os.path.basename(os.path.normpath(path))

        self.bundle_path = os.path.abspath(path)
        config_path = os.path.join(self.bundle_path, "configs", "inference.json")
        meta_path = os.path.join(self.bundle_path, "configs", "metadata.json")
        for required in ("configs/inference.json", "configs/metadata.json"):
            if not os.path.isfile(os.path.join(self.bundle_path, required)):
                raise FileNotFoundError(f"medad_monai.apps.label: bundle {self.bundle_path} has no {required}.")
        self.bundle_config_path = config_path
        # inference.json with the bundle's override files a model was trained with (conf ``bundle_configs`` or
        # $MEDAD_BUNDLE_CONFIGS, comma-separated, e.g. configs/demo.json), bundle_root set to this folder as MONAI
        # Label's own loader does: the package's one reader (medad_monai.evaluation.predictor.bundle_parser)
        self.bundle_config, self.bundle_config_files = bundle_parser(self.bundle_path, conf.get("bundle_configs"))
        network = self.bundle_config.get_parsed_content("network_def", instantiate=True)

        with open(meta_path) as f:
            metadata = json.load(f)
        fmt = metadata.get("network_data_format", {})
        self.key_image, image = next(iter(fmt.get("inputs", {"image": {}}).items()))
        self.key_pred = next(iter(fmt.get("outputs", {"pred": {}})))
        spatial_shape = image.get("spatial_shape") or [0, 0]
        self.version = metadata.get("version")
        self.model_path = os.path.join(self.bundle_path, "models", "model.pt")

        super(BundleInferTask, self).__init__(
            path=self.model_path,
            network=network,
            type=type,
            labels={"anomaly": 1},
            dimension=len(spatial_shape),
            description=metadata.get("description", ""),
            input_key=self.key_image,
            output_label_key=self.key_pred,
            preload=False,
            load_strict=True,
            **kwargs,
        )
        self._config.update({"heatmap": list(HEATMAP_MODES), "result_extension": ".nii.gz"})
        self._calibration_cache: tuple[float, Calibration] | None = None
        # made with the network (_get_network) and kept while network and calibration stay; used by the post-transforms
        self._predictor: AnomalyPredictor | None = None
        self._bundle_identity = bundle_identity(self.bundle_path)
        self.valid = True
        if strtobool(conf.get("preload", "false")) and self.is_valid():
            self._get_network("cpu", None)

    def is_valid(self) -> bool:
        return self.valid and os.path.isfile(self.model_path)

    def info(self) -> dict[str, Any]:
        i = BasicInferTask.info(self)
        i["version"] = self.version
        return i

    def __call__(self, request, *args, **kwargs):
        try:
            return super().__call__(request, *args, **kwargs)
        except ImageReadError as e:  # the client's image, not the server, is at fault; no server path in the answer
            raise ClientError(422, f"the image could not be read: {e.problem}") from None

    # -- calibration -------------------------------------------------------------------------------------------------
    def _parsed(self, key: str, default: Any) -> Any:
        return self.bundle_config.get_parsed_content(key) if self.bundle_config.get(key) is not None else default

    def calibration_path(self) -> str:
        """``calibration_file`` of the bundle's inference config (``<bundle>/models/calibration.json``)."""
        return str(self._parsed("calibration_file", os.path.join(self.bundle_path, "models", "calibration.json")))

    def calibration(self) -> Calibration | None:
        """The bundle's calibration, re-read when the file changes (training rewrites it); ``None`` if absent."""
        path = self.calibration_path()
        if not os.path.isfile(path):
            return None
        mtime = os.stat(path).st_mtime
        if self._calibration_cache is None or self._calibration_cache[0] != mtime:
            self._calibration_cache = (mtime, Calibration.load(path))
        return self._calibration_cache[1]

    # -- pipeline ------------------------------------------------------------------------------------------------------
    def pre_transforms(self, data=None) -> Sequence:
        if data is not None:  # refuse a bad request before any work
            _result_extension(data, _heatmap_mode(data.get("heatmap")))
        pre = list(super().pre_transforms(data))
        out: list = [ResolveImagePathd(keys=self.key_image)]
        recorded = False
        for t in pre:
            out.append(t)
            if not recorded and isinstance(t, LoadAnomalyImaged):
                out.append(RecordSpatialShaped(keys=self.key_image))
                recorded = True
        if not recorded:
            raise ValueError(
                f"medad_monai.apps.label: the preprocessing of {self.bundle_config_path} has no LoadAnomalyImaged; "
                "expected medad_monai.data.anomaly_transforms."
            )
        return out

    def post_transforms(self, data=None) -> Sequence:
        post = list(super().post_transforms(data))
        post.append(
            AnomalyResultd(
                self._predictor,
                heatmap=_heatmap_mode((data or {}).get("heatmap")),
                pred_key=self.key_pred,
                model_name=self.name,
            )
        )
        return post

    def _get_network(self, device, data):
        if not os.path.isfile(self.model_path):
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"{self.name} has no trained weights ({self.model_path}); train it first (POST /train/{self.name}).",
            )
        mtime = os.stat(self.model_path).st_mtime
        cached = self._networks.get(device)
        if cached is not None and cached[1] == mtime:
            return self._follow_calibration(cached[0])
        network = copy.deepcopy(self.network)
        try:  # the package's one loader: checked file, weights_only=True, strict
            load_weights(network, self.model_path)
        except BundleLoadError as e:
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR, f"{self.name}: {e} (network_def of {self.bundle_config_path})"
            ) from e
        network = network.to(torch.device(device)).eval()
        self._networks[device] = (network, mtime)
        logger.info("%s: loaded %s on %s", self.name, self.model_path, device)
        return self._follow_calibration(network)

    def _follow_calibration(self, network):
        """Builds the bundle's :class:`~medad_monai.evaluation.predictor.AnomalyPredictor` for ``network`` and the
        current calibration: a network or input size other than the one the calibration records is refused (its labels
        would all be wrong); the maps and the score are the calibration's recipe (served as calibrated: one policy, see
        :mod:`medad_monai.evaluation.predictor`). Built again only when the weights or the calibration file change."""
        calibration = self.calibration()
        current = self._predictor
        if current is not None and current.network is network and current.calibration is calibration:
            return network
        size = self._parsed("spatial_size", None)
        shape = (int(self._parsed("channels", 1)), *[int(v) for v in size]) if size else None
        try:
            self._predictor = AnomalyPredictor(
                network,
                calibration,
                str(self._parsed("score_method", "mean")),
                float(self._parsed("percentile", 99.0)),
                input_shape=shape,
                follow=True,
                source=f"models/calibration.json of {self.name}",
                what=" + ".join(os.path.relpath(f, self.bundle_path) for f in self.bundle_config_files),
                bundle=self._bundle_identity,
            )
        except ValueError as e:  # the served bundle, not the request, is at fault: 409 as without weights
            raise ClientError(409, str(e)) from None
        return network

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        mode = data.get(self.output_json_key, {}).get("heatmap", HEATMAP_MODES[0])
        return super().writer(
            data, extension=_result_extension(data, mode), dtype="float32" if mode == "raw" else "uint8"
        )
