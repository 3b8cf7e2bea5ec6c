"""MONAI Label app for the medad-monai anomaly bundles (needs the ``label`` environment, see ``docs/monailabel.md``).

- :mod:`medad_monai.apps.label.main`: :class:`MedADApp`, the app class MONAI Label loads.
- :mod:`medad_monai.apps.label.infer`: :class:`AnomalyBundleInferTask` (heatmap + score + calibrated label).
- :mod:`medad_monai.apps.label.train`: :class:`UnsupervisedBundleTrainTask` (trains on all unlabelled images).
- ``python -m medad_monai.apps.label init <app_dir> <bundle>...``: writes an app folder (:func:`init_app`).

Only :func:`init_app` works without ``monailabel`` installed; the other names import it on first use.
"""

from __future__ import annotations

from .setup_app import init_app

__all__ = [
    "init_app",
    "MedADApp",
    "AnomalyBundleInferTask",
    "AnomalyResultd",
    "UnsupervisedBundleTrainTask",
    "resolve_image_path",
]

_LAZY = {
    "MedADApp": "main",
    "AnomalyBundleInferTask": "infer",
    "AnomalyResultd": "infer",
    "resolve_image_path": "infer",
    "UnsupervisedBundleTrainTask": "train",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
