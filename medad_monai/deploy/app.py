"""The MONAI Deploy application: DICOM CR/DX radiographs in, heatmap Secondary Captures + Basic Text SRs + JSON out.

Run it (in the ``[deploy]`` environment, no Docker needed)::

    python -m medad_monai.deploy -i <dicom folder> -o <output folder> -m <bundle folder>
    python <repo>/medad_monai/deploy -i ... -o ... -m ...          # the app folder, as MONAI Deploy packages it

``-i/-o/-m`` may also come from ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` (MONAI
Deploy's ``AppContext``; inside a MAP they are set by the package). ``-m`` is a bundle folder (``configs/`` +
``models/model.pt`` + ``models/calibration.json``), its ``models`` folder or a ``.pt`` file in it. The series rules
default to :data:`DEFAULT_RULES` (every CR or DX series); ``MEDAD_SERIES_RULES`` may hold other rules in the JSON
format of ``DICOMSeriesSelectorOperator`` (the text, or the path of a file holding it).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

from .model import AnomalyBundle
from .operators import (
    FINDINGS,
    AnomalyInferenceOperator,
    AnomalyReportWriterOperator,
    AnomalyTextSRWriterOperator,
    DICOMSecondaryCaptureWriterOperator,
)

__all__ = ["AnomalyDetectionApp", "DEFAULT_RULES", "main"]

#: every radiograph series: Computed Radiography or Digital X-Ray (Modality is matched case-insensitively).
DEFAULT_RULES = """
{
    "selections": [
        {
            "name": "CR/DX radiograph",
            "conditions": {
                "Modality": "(?i)^(CR|DX)$"
            }
        }
    ]
}
"""


def selection_rules() -> str:
    """``MEDAD_SERIES_RULES`` (JSON text or a file path) or :data:`DEFAULT_RULES`."""
    value = os.environ.get("MEDAD_SERIES_RULES", "").strip()
    if not value:
        return DEFAULT_RULES
    if not value.startswith("{"):
        with open(value) as f:
            return f.read()
    return value


class AnomalyDetectionApp(Application):
    """Unsupervised anomaly detection on CR/DX radiographs with a MemMC-MAE or MorphAEus bundle.

    Graph: ``DICOMDataLoaderOperator`` (runs once) -> ``DICOMSeriesSelectorOperator`` (all CR/DX series) ->
    :class:`~medad_monai.deploy.operators.AnomalyInferenceOperator` (reader semantics of
    :func:`medad_monai.data.load_image`, the bundle's preprocessing and network, calibrated score and label) ->
    :class:`~medad_monai.deploy.operators.DICOMSecondaryCaptureWriterOperator` (``sc/*.dcm``) ->
    :class:`~medad_monai.deploy.operators.AnomalyTextSRWriterOperator` (``sr/*.dcm``) ->
    :class:`~medad_monai.deploy.operators.AnomalyReportWriterOperator` (``results.json``, ``overlays/*.png``).

    Example::

        >>> AnomalyDetectionApp().run()  # reads -i/-o/-m from sys.argv  # doctest: +SKIP
    """

    def __init__(self, *args, **kwargs) -> None:
        self._logger = logging.getLogger("medad_monai.deploy")
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        input_path = Path(app_context.input_path)
        output_path = Path(app_context.output_path)
        bundle = AnomalyBundle(app_context.model_path)
        model = bundle.info()
        self._logger.info(
            "Input %s, output %s, model %s %s (%s)", input_path, output_path, model["name"], model["version"],
            bundle.bundle_dir,
        )
        if not input_path.is_dir():
            raise ValueError(f"medad_monai.deploy: the input {input_path} must be a folder of DICOM files.")

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="loader")
        selector = DICOMSeriesSelectorOperator(self, rules=selection_rules(), all_matched=True, name="selector")
        inference = AnomalyInferenceOperator(self, bundle=bundle, name="anomaly_inference")
        sc_writer = DICOMSecondaryCaptureWriterOperator(self, output_folder=output_path, model=model, name="sc_writer")
        sr_writer = AnomalyTextSRWriterOperator(self, output_folder=output_path, model=model, name="sr_writer")
        report = AnomalyReportWriterOperator(self, output_folder=output_path, model=model, name="report_writer")

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, inference, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(inference, sc_writer, {(FINDINGS, FINDINGS)})
        self.add_flow(sc_writer, sr_writer, {(FINDINGS, FINDINGS)})
        self.add_flow(sr_writer, report, {(FINDINGS, FINDINGS)})


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m medad_monai.deploy``; arguments as MONAI Deploy apps (``-i -o -m -l``)."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    AnomalyDetectionApp().run()
