"""The MONAI Deploy application: DICOM CR/DX radiographs in, heatmap Secondary Captures + Basic Text SRs + JSON out.

Run it (in the ``[deploy]`` environment, no Docker needed)::

    python -m medad_monai.apps.deploy -i <dicom folder> -o <output folder> -m <bundle folder>
    python <repo>/medad_monai/apps/deploy -i ... -o ... -m ...          # the app folder, as MONAI Deploy packages it

``-i/-o/-m`` may also come from ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` (MONAI
Deploy's ``AppContext``; inside a MAP they are set by the package). ``-m`` is a bundle folder (``configs/`` +
``models/model.pt`` + ``models/calibration.json``), its ``models`` folder or a ``.pt`` file in it. The series rules
default to :data:`DEFAULT_RULES` (every CR or DX series); ``MEDAD_SERIES_RULES`` may hold other rules in the JSON
format of ``DICOMSeriesSelectorOperator`` (the text, or the path of a file holding it).

Exit status (:func:`main`): 0 when every selected instance was processed; 2 when nothing could be processed (input
folder missing, empty, without DICOM files, without a series of an accepted modality, or a bundle that cannot be
loaded), with one line on stderr that says why; 3 when the run finished but some instances failed (they are listed
with their error in ``results.json``, which is complete), unless ``MEDAD_ALLOW_FAILED_INSTANCES=1``; 1 for an
unexpected error (with its traceback).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

from .inputs import (
    ALLOW_FAILED_ENV,
    EXIT_FAILED_INSTANCES,
    EXIT_INPUT_ERROR,
    EXIT_OK,
    InputError,
    InputScan,
    allow_failed_instances,
    no_series_message,
    scan_input,
)
from .model import AnomalyBundle, BundleLoadError
from .operators import (
    FINDINGS,
    AnomalyInferenceOperator,
    AnomalyReportWriterOperator,
    AnomalyTextSRWriterOperator,
    DICOMSecondaryCaptureWriterOperator,
)

__all__ = ["AnomalyDetectionApp", "DEFAULT_RULES", "main", "run_app"]

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


def _rule_names(rules: str) -> list[str]:
    try:
        return [str(s.get("name", "")) for s in json.loads(rules).get("selections", [])]
    except (ValueError, AttributeError):
        return []


class AnomalyDetectionApp(Application):
    """Unsupervised anomaly detection on CR/DX radiographs with a MemMC-MAE or MorphAEus bundle.

    Graph: ``DICOMDataLoaderOperator`` (runs once) -> ``DICOMSeriesSelectorOperator`` (all CR/DX series) ->
    :class:`~medad_monai.apps.deploy.operators.AnomalyInferenceOperator` (reader semantics of
    :func:`medad_monai.data.load_image`, the bundle's preprocessing and network, calibrated score and label) ->
    :class:`~medad_monai.apps.deploy.operators.DICOMSecondaryCaptureWriterOperator` (``sc/*.dcm``) ->
    :class:`~medad_monai.apps.deploy.operators.AnomalyTextSRWriterOperator` (``sr/*.dcm``) ->
    :class:`~medad_monai.apps.deploy.operators.AnomalyReportWriterOperator` (``results.json``, ``overlays/*.png``).

    :meth:`prepare` (called by :meth:`compose` when not called before) reads the app context, checks the input
    folder (:func:`~medad_monai.apps.deploy.inputs.scan_input`) and loads the bundle before any operator exists; after
    :meth:`run`, :meth:`exit_status` turns the report into the process exit status.

    Example::

        >>> AnomalyDetectionApp().run()  # reads -i/-o/-m from sys.argv  # doctest: +SKIP
    """

    def __init__(self, *args, **kwargs) -> None:
        self._logger = logging.getLogger("medad_monai.apps.deploy")
        self.app_context: AppContext | None = None
        self.bundle: AnomalyBundle | None = None
        self.input_scan: InputScan | None = None
        self.rules = DEFAULT_RULES
        self.report_writer: AnomalyReportWriterOperator | None = None
        super().__init__(*args, **kwargs)

    def prepare(self) -> None:
        """Parses ``-i/-o/-m`` (or the ``HOLOSCAN_*`` variables), scans the input folder, then loads the bundle.

        Raises:
            InputError: the input cannot be processed (see :func:`~medad_monai.apps.deploy.inputs.scan_input`).
            BundleLoadError: the bundle cannot be loaded (the message names the missing file).
        """
        if self.app_context is None:
            self.app_context = Application.init_app_context(self.argv)
        if self.input_scan is None:  # first: reading headers is cheaper than building the network
            self.input_scan = scan_input(self.app_context.input_path)
        if self.bundle is None:
            self.bundle = AnomalyBundle(self.app_context.model_path)
        self.rules = selection_rules()

    def compose(self) -> None:
        self.prepare()
        assert self.app_context is not None and self.bundle is not None and self.input_scan is not None
        input_path = Path(self.app_context.input_path)
        output_path = Path(self.app_context.output_path)
        bundle = self.bundle
        model = bundle.info()
        self._logger.info(
            "Input %s (%d DICOM instances: %s), output %s, model %s %s (%s)", input_path,
            self.input_scan.n_instances, self.input_scan.modalities(), output_path, model["name"], model["version"],
            bundle.bundle_dir,
        )

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="loader")
        selector = DICOMSeriesSelectorOperator(self, rules=self.rules, all_matched=True, name="selector")
        inference = AnomalyInferenceOperator(self, bundle=bundle, name="anomaly_inference")
        sc_writer = DICOMSecondaryCaptureWriterOperator(self, output_folder=output_path, model=model, name="sc_writer")
        sr_writer = AnomalyTextSRWriterOperator(self, output_folder=output_path, model=model, name="sr_writer")
        self.report_writer = AnomalyReportWriterOperator(
            self, output_folder=output_path, model=model, input_summary=self.input_scan.to_dict(),
            name="report_writer",
        )

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, inference, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(inference, sc_writer, {(FINDINGS, FINDINGS)})
        self.add_flow(sc_writer, sr_writer, {(FINDINGS, FINDINGS)})
        self.add_flow(sr_writer, self.report_writer, {(FINDINGS, FINDINGS)})

    def exit_status(self) -> tuple[int, str]:
        """``(status, message)`` after :meth:`run`: see the module docstring; the message is empty for 0."""
        report: dict[str, Any] | None = self.report_writer.report if self.report_writer is not None else None
        if report is None:
            return 1, "the app stopped before writing results.json; see the log above."
        results_file = Path(self.report_writer.output_folder) / "results.json"
        if report["n_instances"] == 0:
            assert self.input_scan is not None
            custom = bool(os.environ.get("MEDAD_SERIES_RULES", "").strip())
            return EXIT_INPUT_ERROR, no_series_message(self.input_scan, _rule_names(self.rules), custom, results_file)
        n_failed = int(report["n_failed"])
        if n_failed == 0:
            return EXIT_OK, ""
        first = next(r for r in report["results"] if "error" in r)
        message = (
            f"{n_failed} of {report['n_instances']} instance(s) could not be processed (each is listed with its "
            f"error in {results_file}; first: {first.get('source_file') or first.get('sop_instance_uid')}: "
            f"{first['error']})"
        )
        if allow_failed_instances():
            return EXIT_OK, f"{message}; exit status 0 because {ALLOW_FAILED_ENV} is set."
        return EXIT_FAILED_INSTANCES, (
            f"{message}; fix or remove those files (compressed pixel data needs the decoders of the [deploy] "
            f"extra), or set {ALLOW_FAILED_ENV}=1 to exit 0 when some instances fail."
        )


def run_app() -> int:
    """Runs :class:`AnomalyDetectionApp` on ``sys.argv`` and returns the exit status (see the module docstring).

    Input and bundle errors are printed as one line, ``medad_monai.apps.deploy: error: ...``, on stderr.
    """
    app = AnomalyDetectionApp()
    try:
        app.prepare()
    except (InputError, BundleLoadError) as e:
        print(f"medad_monai.apps.deploy: error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    app.run()
    status, message = app.exit_status()
    if message:
        kind = "warning" if status == EXIT_OK else "error"
        print(f"medad_monai.apps.deploy: {kind}: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m medad_monai.apps.deploy``; arguments as MONAI Deploy apps (``-i -o -m -l``).

    Exits with :func:`run_app`'s status.

    Args:
        argv: the arguments without the program name; ``sys.argv[1:]`` when None.
    """
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.exit(run_app())
