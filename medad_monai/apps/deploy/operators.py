"""MONAI Deploy (Holoscan) operators of the anomaly-detection app.

The app's graph (see :mod:`medad_monai.apps.deploy.app`) is::

    DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator (CR/DX) -> AnomalyInferenceOperator
        -> DICOMSecondaryCaptureWriterOperator -> AnomalyTextSRWriterOperator -> AnomalyReportWriterOperator

Each operator after the selector passes one list of :class:`Finding` objects (one per selected SOP instance) down
the chain and adds what it wrote to ``finding.outputs``, so the last writer can list every file of every image.

Why a custom inference operator rather than MONAI Deploy's ``MonaiBundleInferenceOperator``: that operator casts
outputs declared ``"type": "image"`` to uint8 (our float anomaly map would be truncated), returns one output, and
knows nothing of the calibration that turns a map into a score and a label; and its input would come from
``DICOMSeriesToVolumeOperator``, which ignores the VOI window and MONOCHROME1. Ours reads each instance with the
package's reader and runs the bundle's own preprocessing and network
(:class:`~medad_monai.apps.deploy.model.AnomalyBundle`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries

from medad_monai.io.figures import default_vmax, overlay_panel
from medad_monai.io.writers import safe_stem

from .dicom import instance_to_image, overlay_rgb, result_text, secondary_capture, text_sr
from .model import AnomalyBundle, AnomalyResult

__all__ = [
    "AnomalyInferenceOperator",
    "AnomalyReportWriterOperator",
    "AnomalyTextSRWriterOperator",
    "DICOMSecondaryCaptureWriterOperator",
    "Finding",
]

logger = logging.getLogger("medad_monai.apps.deploy")

#: port that carries the list of findings from one operator to the next.
FINDINGS = "findings"


@dataclass
class Finding:
    """One selected SOP instance and what the app made of it.

    Attributes:
        series: the source ``DICOMSeries`` (MONAI Deploy domain object).
        dataset: the source instance (pydicom dataset).
        selection: name of the selection rule that picked the series.
        result: the model result, or None when the instance could not be processed.
        error: why it could not be processed.
        outputs: filled by the writers: ``{"secondary_capture": {...}, "structured_report": {...}, ...}``.
    """

    series: Any
    dataset: Any
    selection: str = ""
    result: AnomalyResult | None = None
    error: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
            "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
            "modality": str(ds.get("Modality", "")),
            "patient_id": str(ds.get("PatientID", "")),
            "source_file": str(getattr(ds, "filename", "") or ""),
            "selection": self.selection,
        }


def _instance_order(sop_instance: Any) -> tuple[int, str]:
    ds = sop_instance.get_native_sop_instance()
    try:
        number = int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    return number, str(ds.get("SOPInstanceUID", ""))


class AnomalyInferenceOperator(Operator):
    """Runs an anomaly-detection bundle on every instance of the selected series.

    Named input:
        study_selected_series_list: ``List[StudySelectedSeries]`` from ``DICOMSeriesSelectorOperator``.

    Named output:
        findings: ``List[Finding]``, one per SOP instance, in study/series/instance-number order.

    An instance that cannot be read or run (compressed data without a decoder, a colour image for a grey model, ...)
    gets ``Finding.error`` and is logged; the others are still processed. A run where nothing was selected emits an
    empty list.

    Args:
        fragment: the application.
        bundle: an :class:`~medad_monai.apps.deploy.model.AnomalyBundle` or a path it accepts.
    """

    def __init__(self, fragment: Fragment, *args, bundle: AnomalyBundle | str | os.PathLike, **kwargs) -> None:
        self.bundle = bundle if isinstance(bundle, AnomalyBundle) else AnomalyBundle(bundle)
        self.input_name = "study_selected_series_list"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name)
        spec.output(FINDINGS)

    def compute(self, op_input, op_output, context) -> None:
        selected = op_input.receive(self.input_name) or []
        findings = self.process(selected)
        if not findings:
            logger.warning("No series was selected; nothing to run the model on (the app exits with an error).")
        op_output.emit(findings, FINDINGS)

    def process(self, study_selected_series_list: list[StudySelectedSeries]) -> list[Finding]:
        """The work of :meth:`compute`, callable without a running graph."""
        findings: list[Finding] = []
        for study_selected in study_selected_series_list:
            for selected in study_selected.selected_series:
                series = selected.series
                for sop in sorted(series.get_sop_instances(), key=_instance_order):
                    ds = sop.get_native_sop_instance()
                    finding = Finding(series=series, dataset=ds, selection=selected.selection_name or "")
                    try:
                        image, meta = instance_to_image(ds, channels=self.bundle.channels)
                        source = {**finding.identity(), "photometric": meta.get("source_mode")}
                        finding.result = self.bundle.infer_array(image, source)
                        logger.info(
                            "%s: score %.6g -> %s",
                            source["sop_instance_uid"],
                            finding.result.score,
                            finding.result.label_name,
                        )
                    except Exception as e:  # noqa: BLE001 - one bad instance must not stop the study
                        finding.error = f"{type(e).__name__}: {e}"
                        logger.error("Cannot process SOP instance %s: %s", finding.identity()["sop_instance_uid"],
                                     finding.error)
                    findings.append(finding)
        return findings


class _FindingsWriter(Operator):
    """Base of the writers: receives the findings, writes, and passes them on."""

    folder = ""

    def __init__(self, fragment: Fragment, *args, output_folder: str | os.PathLike, model: dict[str, Any], **kwargs):
        self.output_folder = Path(output_folder)
        self.model = model
        self._new_series: dict[str, str] = {}
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(FINDINGS)
        spec.output(FINDINGS).condition(ConditionType.NONE)  # the next writer is optional

    def compute(self, op_input, op_output, context) -> None:
        findings = op_input.receive(FINDINGS) or []
        self.write(findings)
        op_output.emit(findings, FINDINGS)

    def new_series_uid(self, source_series_uid: str) -> str:
        """One new series per source series, so the outputs of one acquisition stay together."""
        from pydicom.uid import generate_uid

        return self._new_series.setdefault(source_series_uid, generate_uid())

    def write(self, findings: list[Finding]) -> None:
        raise NotImplementedError


class DICOMSecondaryCaptureWriterOperator(_FindingsWriter):
    """Writes an RGB DICOM Secondary Capture of the heatmap overlay for every finding with a result.

    Files: ``<output_folder>/sc/<SOPInstanceUID>.dcm``. See :func:`medad_monai.apps.deploy.dicom.secondary_capture`
    and :func:`~medad_monai.apps.deploy.dicom.overlay_rgb`. Adds ``outputs["secondary_capture"]`` (file, UIDs).

    Args:
        output_folder: the app's output folder.
        model: :meth:`~medad_monai.apps.deploy.model.AnomalyBundle.info`.
        alpha: heatmap opacity.
    """

    def __init__(self, fragment: Fragment, *args, alpha: float = 0.5, **kwargs) -> None:
        self.alpha = float(alpha)
        super().__init__(fragment, *args, **kwargs)

    def write(self, findings: list[Finding]) -> None:
        folder = self.output_folder / "sc"
        counters: dict[str, int] = {}
        for f in findings:
            if f.result is None:
                continue
            src_series = str(f.dataset.SeriesInstanceUID)
            series_uid = self.new_series_uid(src_series)
            counters[series_uid] = counters.get(series_uid, 0) + 1
            sc = secondary_capture(
                f.dataset,
                overlay_rgb(f.result, alpha=self.alpha),
                series_instance_uid=series_uid,
                series_number=9000 + len(self._new_series),
                instance_number=counters[series_uid],
                model=self.model,
                description=result_text(f.result, self.model),
            )
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{sc.SOPInstanceUID}.dcm"
            sc.save_as(path, enforce_file_format=True)
            f.outputs["secondary_capture"] = {
                "file": str(path),
                "sop_class_uid": str(sc.SOPClassUID),
                "sop_instance_uid": str(sc.SOPInstanceUID),
                "series_instance_uid": series_uid,
            }
            logger.info("Secondary Capture written: %s", path)


class AnomalyTextSRWriterOperator(_FindingsWriter):
    """Writes a DICOM Basic Text SR with the score, calibrated label, thresholds and model for every result.

    Files: ``<output_folder>/sr/<SOPInstanceUID>.dcm``; see :func:`medad_monai.apps.deploy.dicom.text_sr`. When the
    Secondary Capture writer ran before, the SC is listed as evidence too. Adds ``outputs["structured_report"]``.
    """

    def write(self, findings: list[Finding]) -> None:
        from monai.deploy.operators.dicom_utils import save_dcm_file

        folder = self.output_folder / "sr"
        counters: dict[str, int] = {}
        for f in findings:
            if f.result is None:
                continue
            series_uid = self.new_series_uid(str(f.dataset.SeriesInstanceUID))
            counters[series_uid] = counters.get(series_uid, 0) + 1
            sc = f.outputs.get("secondary_capture")
            extra = [(sc["sop_class_uid"], sc["sop_instance_uid"], sc["series_instance_uid"])] if sc else []
            text = result_text(f.result, self.model)
            ds = text_sr(
                f.series, f.dataset, text, series_uid, 9500 + len(self._new_series), counters[series_uid], self.model,
                extra
            )
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            save_dcm_file(ds, path)
            f.outputs["structured_report"] = {
                "file": str(path),
                "sop_class_uid": str(ds.SOPClassUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": series_uid,
                "text": text,
            }
            logger.info("Basic Text SR written: %s", path)


class AnomalyReportWriterOperator(_FindingsWriter):
    """Writes ``results.json`` (model, calibration, one entry per instance) and ``overlays/<SOP UID>.png``.

    The PNG is :func:`medad_monai.io.figures.overlay_panel` (input | reconstruction | heatmap on the model grid, the
    package's fixed scale ``0 .. default_vmax(0, pixel_threshold)``), for people reading the results without a
    DICOM viewer. The JSON is written last, after every DICOM file, so its presence means the run finished.

    JSON layout: ``{"model": AnomalyBundle.info(), "input": {...}, "n_instances", "n_anomalous", "n_failed",
    "results": [...]}``; ``input`` is the scan of the input folder (files, DICOM instances, series per modality;
    :meth:`medad_monai.apps.deploy.inputs.InputScan.to_dict`) when the app gives it. A result has the source UIDs and
    file, ``score``, ``label`` (``"normal"``/``"anomalous"``), ``normalized_score``, ``image_threshold``,
    ``pixel_threshold``, ``score_method``, ``percentile``, ``anomalous_pixel_fraction``, sizes and ``outputs`` (files
    and UIDs); a failed instance has ``error`` instead. After :meth:`write`, ``self.report`` holds the same dict (the
    app derives its exit status from it).

    Args:
        write_png: also write ``overlays/<SOP Instance UID>.png``.
        input_summary: stored as ``"input"`` in the JSON (omitted when None).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        write_png: bool = True,
        input_summary: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        self.write_png = bool(write_png)
        self.input_summary = input_summary
        self.report: dict[str, Any] | None = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(FINDINGS)

    def compute(self, op_input, op_output, context) -> None:
        self.write(op_input.receive(FINDINGS) or [])

    def write(self, findings: list[Finding]) -> None:
        self.output_folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for f in findings:
            if f.result is None:
                entries.append({**f.identity(), "error": f.error})
                continue
            entry = f.result.to_dict()
            if self.write_png:
                r = f.result
                # the UID comes from the input file: as a file name it must stay inside overlays/
                png = self.output_folder / "overlays" / f"{safe_stem(entry['sop_instance_uid']) or len(entries)}.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                overlay_panel(
                    r.model_input,
                    r.reconstruction,
                    r.anomaly_map,
                    pixel_threshold=r.pixel_threshold,
                    vmin=0.0,
                    vmax=default_vmax(0.0, r.pixel_threshold),
                    title=f"{r.label_name}  score {r.score:.4g} (threshold {r.image_threshold:.4g})",
                    scale=max(2, -(-256 // max(r.model_input.shape[-2:]))),  # panels of at least ~256 pixels
                ).save(png)
                f.outputs["overlay_png"] = {"file": str(png)}
            entry["outputs"] = f.outputs
            entries.append(entry)
        report: dict[str, Any] = {"model": self.model}
        if self.input_summary is not None:
            report["input"] = self.input_summary
        report.update({
            "n_instances": len(findings),
            "n_anomalous": sum(1 for f in findings if f.result is not None and f.result.label),
            "n_failed": sum(1 for f in findings if f.result is None),
            "results": entries,
        })
        path = self.output_folder / "results.json"
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as fp:
            json.dump(report, fp, indent=4, allow_nan=False)
            fp.write("\n")
        os.replace(tmp, path)
        self.report = report
        logger.info("Results written: %s (%d instances, %d anomalous, %d failed)", path, report["n_instances"],
                    report["n_anomalous"], report["n_failed"])
