"""Loading a trained bundle for deployment and running it on one image, without MONAI Deploy or Holoscan.

Everything the MONAI Deploy operators need from a bundle lives here, so it can be used (and tested) from plain
Python as well:

- :func:`resolve_bundle` finds the bundle folder from what ``-m`` points at (the bundle folder, its ``models/``
  folder or a ``.pt`` state dict inside it);
- :class:`AnomalyBundle` is the package's one predictor
  (:meth:`medad_monai.evaluation.predictor.AnomalyPredictor.from_bundle`: ``configs/inference.json`` and the override
  files, ``network_def``, ``models/model.pt``, ``models/calibration.json`` and its checks) with the bundle's identity,
  and runs **the bundle's own** ``preprocessing`` (the transforms of ``python -m monai.bundle run`` inference), so a
  deployed score is the score of the bundle workflow;
- :class:`AnomalyResult` holds one image's score, calibrated label, maps and the model's identity.

The TorchScript export (``medad_monai.apps.export``) is deliberately not required: the bundle folder already holds the
configs, the weights and the calibration, and reading them directly keeps one code path for both bundles, the same
as their training and evaluation.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medad_monai.data.readers import load_image
from medad_monai.io.outputs import sha256_file
from medad_monai.evaluation.predictor import CONFIGS_ENV, INFERENCE_CONFIG, AnomalyPredictor, BundleLoadError

__all__ = ["AnomalyBundle", "AnomalyResult", "BundleLoadError", "resolve_bundle", "CONFIGS_ENV"]

logger = logging.getLogger("medad_monai.apps.deploy")

METADATA_FILE = os.path.join("configs", "metadata.json")
WEIGHTS_FILE = os.path.join("models", "model.pt")


def resolve_bundle(path: str | os.PathLike) -> tuple[Path, Path]:
    """Returns ``(bundle_dir, weights_file)`` for a bundle folder, its ``models/`` folder or a ``.pt`` file in it.

    Args:
        path: the bundle folder (``configs/inference.json`` + ``models/model.pt``), its ``models`` folder, a
            state-dict file inside ``<bundle>/models/`` (e.g. ``models/model_final.pt``), or a folder whose only
            bundle is one of its subfolders.

    Raises:
        BundleLoadError: the path does not exist or no bundle folder can be found from it.

    Example::

        >>> resolve_bundle("bundles/memmc_mae/models/model.pt")  # doctest: +SKIP
        (PosixPath('bundles/memmc_mae'), PosixPath('bundles/memmc_mae/models/model.pt'))
    """
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise BundleLoadError(f"medad_monai.apps.deploy: the model path {p} does not exist.")
    if p.is_file():
        if p.suffix == ".ts" or p.name.endswith(".zip"):
            raise BundleLoadError(
                f"medad_monai.apps.deploy: {p} is a TorchScript/zip export; this app loads a bundle folder "
                "(configs/inference.json + models/model.pt + models/calibration.json). Pass the bundle folder with -m."
            )
        candidates = [p.parent.parent, p.parent, p.parent.parent.parent]  # models/model.pt or models/<variant>/model.pt
        weights = p
    else:
        candidates = [p, p.parent]
        weights = None
    if weights is None:
        # a folder holding exactly one bundle, e.g. the model folder of a MONAI Application Package
        children = [c for c in sorted(p.iterdir()) if (c / INFERENCE_CONFIG).is_file()] if p.is_dir() else []
        candidates += children[:1] if len(children) == 1 else []
    for root in candidates:
        if (root / INFERENCE_CONFIG).is_file():
            weights = weights if weights is not None else root / WEIGHTS_FILE
            if not weights.is_file():
                raise BundleLoadError(
                    f"medad_monai.apps.deploy: the bundle {root} has no trained weights at {weights}; train it first "
                    "(python -m monai.bundle run --config_file <bundle>/configs/train.json) or copy model.pt there."
                )
            return root, weights
    raise BundleLoadError(
        f"medad_monai.apps.deploy: no bundle found at {p}: expected a folder with {INFERENCE_CONFIG} (or a .pt file in "
        "its models/ folder)."
    )



@dataclass
class AnomalyResult:
    """One image's result, in the output contract of the package (maps on the model grid, never normalised).

    Attributes:
        score: image score, :func:`~medad_monai.evaluation.scoring.aggregate_score` of ``anomaly_map`` with the
            calibration's ``score_method``/``percentile``.
        label: 1 if ``score > image_threshold`` (anomalous), else 0.
        normalized_score: the calibration's display normalisation of the score (threshold -> 0.5).
        image_threshold, pixel_threshold: the calibrated thresholds used.
        score_method, percentile: how the score was aggregated.
        anomalous_fraction: fraction of map pixels ``> pixel_threshold``.
        image: ``(C, H, W)`` float32 source image in [0, 1] at its own size (as read by ``load_image``).
        model_input: ``(C, h, w)`` the network input after the bundle's preprocessing.
        reconstruction: ``(C, h, w)`` pseudo-healthy reconstruction.
        anomaly_map: ``(1, h, w)`` raw anomaly map.
        source: free-form description of the source (file path, DICOM UIDs), copied to the JSON.
    """

    score: float
    label: int
    normalized_score: float
    image_threshold: float
    pixel_threshold: float
    score_method: str
    percentile: float
    anomalous_fraction: float
    image: np.ndarray
    model_input: np.ndarray
    reconstruction: np.ndarray
    anomaly_map: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def label_name(self) -> str:
        """``"ANOMALOUS"`` or ``"NORMAL"``."""
        return "ANOMALOUS" if self.label else "NORMAL"

    def map_at_source_size(self) -> np.ndarray:
        """The anomaly map resized (bilinear, ``align_corners=False``) to the source image's ``(H, W)``: ``(1, H, W)``.

        Bilinear is our choice: it keeps the map non-negative and undoes the preprocessing's bilinear resize, so a
        contour drawn at ``pixel_threshold`` on the source grid outlines the same region as on the model grid.
        """
        h, w = self.image.shape[-2:]
        m = torch.from_numpy(np.ascontiguousarray(self.anomaly_map, dtype=np.float32))[None]
        if tuple(m.shape[-2:]) == (h, w):
            return m[0].numpy()
        return torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays)."""
        return {
            **self.source,
            "score": float(self.score),
            "label": self.label_name.lower(),
            "normalized_score": float(self.normalized_score),
            "image_threshold": float(self.image_threshold),
            "pixel_threshold": float(self.pixel_threshold),
            "score_method": self.score_method,
            "percentile": float(self.percentile),
            "anomalous_pixel_fraction": float(self.anomalous_fraction),
            "image_size": [int(s) for s in self.image.shape[-2:]],
            "model_input_size": [int(s) for s in self.model_input.shape[-2:]],
        }


class AnomalyBundle:
    """A trained anomaly-detection bundle ready for inference on single images.

    The package's one predictor (:meth:`medad_monai.evaluation.predictor.AnomalyPredictor.from_bundle`, as for bundle
    inference, export and MONAI Label): the network, the preprocessing and the settings come from the bundle's
    ``configs/inference.json`` and its override files (with ``bundle_root`` and ``ckpt_dir`` set to the resolved
    folders, so it works from any working directory); the weights from ``models/model.pt``
    (:func:`~medad_monai.evaluation.predictor.load_weights`: checked, ``weights_only=True``, strict); the thresholds and
    the model record from the config's ``calibration_file`` (``models/calibration.json``). A network or input size other
    than the calibration's is refused; the score and map recipes are the calibration's (the only ones its thresholds
    are valid for), a different config setting being logged.

    Args:
        path: bundle folder, its ``models`` folder, or a ``.pt`` file inside ``<bundle>/models``.
        device: torch device; default: the config's ``device`` (CUDA when available, else CPU).
        config_overrides: extra ``ConfigParser`` overrides (``{"id": value}``), applied after ``bundle_root``.
        config_files: override files of the bundle merged over ``configs/inference.json``, as with ``monai.bundle
            run --config_file "['configs/inference.json','configs/demo.json']"``: a model trained with
            ``demo.json`` is served with ``["configs/demo.json"]``. Paths are relative to the bundle folder and must
            stay inside it (the files hold evaluated expressions). Default: ``MEDAD_BUNDLE_CONFIGS`` (comma-separated).

    Raises:
        BundleLoadError: missing or unusable configs, weights or calibration (the message names the file).

    Example::

        >>> bundle = AnomalyBundle("bundles/memmc_mae")  # doctest: +SKIP
        >>> result = bundle.infer_file("chest.dcm")       # doctest: +SKIP
        >>> result.score, result.label_name               # doctest: +SKIP
        (0.0123, 'ANOMALOUS')
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        config_overrides: dict[str, Any] | None = None,
        config_files: Sequence[str] | None = None,
    ) -> None:
        self.bundle_dir, self.weights_file = resolve_bundle(path)
        try:
            self.predictor = AnomalyPredictor.from_bundle(
                self.bundle_dir, self.weights_file, config_files, config_overrides, device, follow=True
            )
        except BundleLoadError as e:
            raise BundleLoadError(f"medad_monai.apps.deploy: {e}") from None
        self.config_files = self.predictor.config_files
        self.metadata = self._read_metadata()
        self.device = self.predictor.device
        self.channels = self.predictor.channels
        self.spatial_size = self.predictor.spatial_size
        self.preprocessing = self.predictor.preprocessing
        self.network = self.predictor.network
        self.calibration = self.predictor.calibration
        self.weights_sha256 = sha256_file(self.weights_file)

    # -- identity ------------------------------------------------------------------------------------------------
    def _read_metadata(self) -> dict[str, Any]:
        path = self.bundle_dir / METADATA_FILE
        if not path.is_file():
            logger.warning("%s not found; the model name and version are unknown.", path)
            return {}
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise BundleLoadError(f"medad_monai.apps.deploy: cannot read {path}: {e}") from e

    @property
    def name(self) -> str:
        """The bundle's display name (``metadata.json`` ``name``, else the folder name)."""
        return str(self.metadata.get("name") or self.bundle_dir.name)

    @property
    def version(self) -> str:
        """The bundle's ``version`` from ``metadata.json`` (``"unknown"`` without one)."""
        return str(self.metadata.get("version") or "unknown")

    @property
    def authors(self) -> str:
        return str(self.metadata.get("authors") or "")

    def info(self) -> dict[str, Any]:
        """Model identity and calibration settings, for the JSON result and the DICOM contributing equipment."""
        cal = self.calibration
        return {
            "name": self.name,
            "version": self.version,
            "authors": self.authors,
            "bundle_dir": str(self.bundle_dir),
            "weights_file": str(self.weights_file),
            "weights_sha256": self.weights_sha256,
            "network": type(getattr(self.network, "model", self.network)).__name__,
            "input_size": self.spatial_size,
            "channels": self.channels,
            "calibration": {
                "image_threshold": cal.image_threshold,
                "pixel_threshold": cal.pixel_threshold,
                "image_fpr": cal.image_fpr,
                "pixel_fpr": cal.pixel_fpr,
                "score_method": cal.score_method,
                "percentile": cal.percentile,
                "n_images": cal.n_images,
            },
            "intended_use": str(self.metadata.get("intended_use") or "Research only. Not for clinical diagnosis."),
        }

    # -- inference -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def infer_array(self, image: np.ndarray, source: dict[str, Any] | None = None) -> AnomalyResult:
        """Runs the bundle on one ``(C, H, W)`` float image in [0, 1] (as :func:`~medad_monai.data.load_image` gives).

        The bundle's ``preprocessing`` resizes it to the model size (``LoadAnomalyImaged`` keeps arrays as they are),
        then ``network.predict`` gives the reconstruction and the map.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3 or image.shape[0] != self.channels:
            raise ValueError(
                f"medad_monai.apps.deploy: expected a ({self.channels}, H, W) image for {self.name}, got {image.shape}."
            )
        item = self.preprocessing({"image": image})
        x = torch.as_tensor(item["image"], dtype=torch.float32)
        x = (x.as_tensor() if hasattr(x, "as_tensor") else x)[None].to(self.device)
        rec, out = self.predictor.predict(x)
        cal = self.calibration
        score = float(out.pred_score[0])
        return AnomalyResult(
            score=score,
            label=int(out.pred_label[0]),
            normalized_score=float(cal.normalize_score(score)),
            image_threshold=cal.image_threshold,
            pixel_threshold=cal.pixel_threshold,
            score_method=self.predictor.score_method,
            percentile=self.predictor.percentile,
            anomalous_fraction=float(out.pred_mask.float().mean()),
            image=image,
            model_input=x[0].cpu().numpy(),
            reconstruction=rec[0].float().cpu().numpy(),
            anomaly_map=out.anomaly_map[0].cpu().numpy(),
            source=dict(source or {}),
        )

    def infer_file(self, path: str | os.PathLike, source: dict[str, Any] | None = None) -> AnomalyResult:
        """Reads ``path`` with :func:`~medad_monai.data.load_image` (DICOM LUTs, MONOCHROME1 inversion, ...) and
        runs :meth:`infer_array`."""
        image, meta = load_image(path, channels=self.channels)
        src = {"source_file": str(path), "photometric": meta.get("source_mode"), **(source or {})}
        return self.infer_array(image, src)
