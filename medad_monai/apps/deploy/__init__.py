"""MONAI Deploy application for the anomaly-detection bundles (MemMC-MAE, MorphAEus).

- :mod:`~medad_monai.apps.deploy.model`: :class:`AnomalyBundle` (bundle folder -> network, preprocessing, calibration)
  and :class:`AnomalyResult`; plain Python, usable without MONAI Deploy.
- :mod:`~medad_monai.apps.deploy.dicom`: DICOM instance -> model input (the package's reader), heatmap overlay,
  Secondary Capture (highdicom) and Basic Text SR builders.
- :mod:`~medad_monai.apps.deploy.inputs`: the input-folder check run before the graph (one-line errors) and the app's
  exit statuses; plain pydicom.
- :mod:`~medad_monai.apps.deploy.operators` and :mod:`~medad_monai.apps.deploy.app`: the Holoscan operators and the app;
  they need ``monai-deploy-app-sdk``, ``highdicom`` and the pixel-data decoders (``pip install medad-monai[deploy]``).

Run: ``python -m medad_monai.apps.deploy -i <dicom folder> -o <output folder> -m <bundle folder>`` (see
``docs/deploy.md``).
"""

from __future__ import annotations

from typing import Any

from .model import AnomalyBundle, AnomalyResult, BundleLoadError, resolve_bundle

__all__ = ["AnomalyBundle", "AnomalyResult", "BundleLoadError", "resolve_bundle", "AnomalyDetectionApp"]


def __getattr__(name: str) -> Any:
    # the app imports Holoscan (slow, and absent from the core environment), so only on demand
    if name == "AnomalyDetectionApp":
        from .app import AnomalyDetectionApp

        return AnomalyDetectionApp
    raise AttributeError(f"module 'medad_monai.apps.deploy' has no attribute {name!r}")
