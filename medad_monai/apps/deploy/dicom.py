"""DICOM in and out for the deployed app: model input from a SOP instance, Secondary Capture and Basic Text SR.

- :func:`instance_to_image` turns a loaded instance into the model input with **our reader's** semantics
  (:func:`medad_monai.data.load_image`: Modality LUT / rescale, VOI LUT or window, MONOCHROME1 inversion, min-max to
  [0, 1]), so the app sees the same pixels as the bundle's training and inference workflows. MONAI Deploy's
  ``DICOMSeriesToVolumeOperator`` applies only the rescale, not the VOI window or the MONOCHROME1 inversion, which
  is why it is not used.
- :func:`overlay_rgb` draws the heatmap over the source image at its own size, on the fixed colour scale of the
  package's overlays (``0 .. default_vmax(0, pixel_threshold)``, threshold mid-scale, never per image), with the
  outline of ``map > pixel_threshold`` in cyan.
- :func:`secondary_capture` builds an RGB Secondary Capture with highdicom (patient/study copied from the source,
  new Series/SOP Instance UIDs, the source referenced in ``SourceImageSequence``).
- :func:`text_sr` builds a Basic Text SR like MONAI Deploy's ``DICOMTextSRWriterOperator`` (its
  ``write_common_modules``), with a narrative TEXT item inferred from the source image.

Only attributes that the Secondary Capture Image IOD and the Basic Text SR IOD define are copied from the source, with
their conditions (:func:`series_laterality`, :func:`valid_pixel_spacing`); ``dciodvfy`` (dicom3tools) reports no
error on either object (``tests/test_deploy.py``, ``docs/deploy.md``).

highdicom and MONAI Deploy are imported inside the functions that need them (they are in the ``[deploy]`` extra).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from medad_monai.data.readers import load_image
from medad_monai.io.figures import PRED_CONTOUR_RGB, colorize, contour, default_vmax

from .model import AnomalyResult

__all__ = [
    "BASIC_TEXT_SR_SOP_CLASS",
    "SECONDARY_CAPTURE_SOP_CLASS",
    "UNPAIRED_BODY_PARTS",
    "body_part_examined",
    "instance_to_image",
    "overlay_rgb",
    "result_text",
    "secondary_capture",
    "series_laterality",
    "text_sr",
    "valid_pixel_spacing",
]

SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"
#: closes every narrative the app writes (the series descriptions say "research use only" too).
RESEARCH_ONLY = "Research use only. Not for diagnosis."

#: Body Part Examined defined terms (PS3.16 Annex L) of unpaired regions, for which General Series Laterality must
#: be absent. The set is the one ``dciodvfy`` (dicom3tools 1.00.snapshot.20220618) applies, measured term by term
#: with it: it also counts ILIUM, URETER, THYMUS and CORONARYARTERY as unpaired, and every term not listed here
#: (including newer unpaired ones such as THORAX) as possibly paired, so Laterality is then written (empty if
#: unknown, which Type 2 allows).
UNPAIRED_BODY_PARTS = frozenset(
    """
    ABDOMEN ABDOMENPELVIS AORTA BACK BLADDER BRAIN CEREBELLUM CERVIX CHEST CHESTABDOMEN CHESTABDPELVIS
    CIRCLEOFWILLIS COCCYX COLON CORONARYARTERY CSPINE CTSPINE DUODENUM ESOPHAGUS FACE GALLBLADDER HEAD HEADNECK
    HEART ILEUM ILIUM JAW JEJUNUM LARYNX LIVER LSPINE LSSPINE MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST
    NECKCHESTABDOMEN NECKCHESTABDPELV NOSE PANCREAS PELVIS PENIS PHARYNX PROSTATE RECTUM SCALP SKULL SPINE SPLEEN
    SSPINE STERNUM STOMACH THYMUS THYROID TLSPINE TONGUE TRACHEA TSPINE URETER URETHRA UTERUS VAGINA VULVA WHOLEBODY
    """.split()
)
#: a valid Code String (CS) value: upper-case letters, digits, space and underscore, at most 16 characters.
_CODE_STRING = re.compile(r"^[A-Z0-9 _]{1,16}$")


def instance_to_image(ds: Any, channels: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Model input ``(C, H, W)`` float32 in [0, 1] and reader metadata from a pydicom dataset.

    The dataset is read back through :func:`medad_monai.data.load_image` from its file (``ds.filename``, set by
    ``pydicom.dcmread`` and so by MONAI Deploy's ``DICOMDataLoaderOperator``); a dataset without a file (e.g. received
    over the network) is written to a temporary file first. One reader for every entry point is our choice: the
    LUT/window/MONOCHROME1 rules then cannot drift between the bundle workflows and the app.
    """
    filename = getattr(ds, "filename", None)
    if isinstance(filename, (str, os.PathLike)) and os.path.isfile(filename):
        return load_image(filename, channels=channels)
    with tempfile.TemporaryDirectory(prefix="medad_dicom_") as tmp:
        path = os.path.join(tmp, "instance.dcm")
        ds.save_as(path, enforce_file_format=False)
        return load_image(path, channels=channels)


def overlay_rgb(result: AnomalyResult, alpha: float = 0.5, cmap: str = "inferno") -> np.ndarray:
    """The heatmap of ``result`` over its source image, at the source size, as ``(H, W, 3)`` uint8.

    Colours: ``(1 - alpha) * image + alpha * colormap(map / vmax)`` with ``vmax = default_vmax(0, pixel_threshold)``
    (the scale of :class:`~medad_monai.io.writers.AnomalyResultWriter` overlays: fixed, threshold mid-scale). The
    outline of ``map > pixel_threshold`` is drawn in cyan, about 1/256 of the image side thick (at least 1 pixel).
    """
    amap = result.map_at_source_size()[0]
    img = np.clip(np.asarray(result.image, dtype=np.float64), 0.0, 1.0)
    rgb = np.repeat(img[:1], 3, axis=0) if img.shape[0] == 1 else img[:3]
    rgb = rgb.transpose(1, 2, 0)
    vmax = default_vmax(0.0, result.pixel_threshold)
    heat = colorize(amap, 0.0, vmax, cmap).astype(np.float64) / 255.0
    out = np.clip(np.rint(((1.0 - alpha) * rgb + alpha * heat) * 255.0), 0, 255).astype(np.uint8)
    thickness = max(1, int(round(max(amap.shape) / 256)))
    edge = contour(amap > result.pixel_threshold, thickness)
    out[edge] = PRED_CONTOUR_RGB
    return np.ascontiguousarray(out)


def result_text(result: AnomalyResult, model: dict[str, Any]) -> str:
    """The narrative of the SR: score, calibrated label, thresholds and the model, in one paragraph."""
    cal = model.get("calibration", {})
    fpr = cal.get("image_fpr")
    fpr_txt = f" (calibrated on healthy images for a {100 * fpr:g}% false-positive rate)" if fpr is not None else ""
    relation = ">" if result.label else "<="
    return (
        f"Unsupervised anomaly detection with {model.get('name', 'unknown model')} version "
        f"{model.get('version', 'unknown')}. "
        f"Anomaly score: {result.score:.6g} ({result.score_method} of the anomaly map). "
        f"Image threshold: {result.image_threshold:.6g}{fpr_txt}. "
        f"Result: {result.label_name} (score {relation} threshold). "
        f"Pixel threshold: {result.pixel_threshold:.6g}; {100 * result.anomalous_fraction:.2f}% of the image lies "
        f"above it (outlined in the secondary capture). {RESEARCH_ONLY}"
    )


def body_part_examined(ref: Any) -> str | None:
    """The source's Body Part Examined as a valid CS value (upper-cased, trimmed), or None when absent or invalid.

    Args:
        ref: the source pydicom dataset.
    """
    value = str(ref.get("BodyPartExamined", "") or "").strip().upper()
    return value if _CODE_STRING.match(value) else None


def series_laterality(ref: Any) -> str | None:
    """General Series Laterality (0020,0060) of an image derived from ``ref`` in an IOD without Image Laterality.

    The attribute is Type 2C: required when the body part examined is a paired structure, absent otherwise. So:
    ``None`` (leave it out) when ``ref``'s Body Part Examined is in :data:`UNPAIRED_BODY_PARTS` (e.g. CHEST);
    otherwise the source's ``Laterality``, else its ``ImageLaterality``, when that is ``L`` or ``R``; otherwise
    ``""`` (present and empty: laterality unknown, which Type 2 allows; ``B``/``U`` image lateralities have no
    series-level equivalent).

    Args:
        ref: the source pydicom dataset (CR/DX: ``ImageLaterality`` is Type 1 in DX, ``Laterality`` common in CR).
    """
    if body_part_examined(ref) in UNPAIRED_BODY_PARTS:
        return None
    for key in ("Laterality", "ImageLaterality"):
        value = str(ref.get(key, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return ""


def valid_pixel_spacing(value: Any) -> list[float] | None:
    """``[row, column]`` spacing in mm when ``value`` is two finite positive numbers, else None.

    A zero, negative, non-numeric or single spacing (e.g. the ``0\\0`` of some CR files) is invalid for Pixel
    Spacing and is not copied.

    Args:
        value: a Pixel Spacing value (pydicom ``MultiValue`` of DS), or None.
    """
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        spacing = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        return None
    return spacing


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def secondary_capture(
    ref: Any,
    rgb: np.ndarray,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    model: dict[str, Any],
    description: str = "",
) -> Any:
    """An RGB Secondary Capture Image (``highdicom.sc.SCImage``) in the source's study.

    Patient and study attributes are copied from ``ref`` (highdicom's ``from_ref_dataset``); the SOP Instance UID is
    new, the series is ``series_instance_uid``. The overlay keeps the source's rows and columns, so the source's
    ``PatientOrientation`` is copied (empty, Type 2C, when the source has no two-value one) and so is its
    ``PixelSpacing`` when it is valid (:func:`valid_pixel_spacing`; never a zero spacing). Of the series attributes,
    ``BodyPartExamined`` is copied (when a valid CS) and ``Laterality`` follows :func:`series_laterality` (absent for
    an unpaired body part such as CHEST). ``ViewPosition`` and ``ImageLaterality`` are not copied: the Secondary
    Capture Image IOD does not have them. The source image is referenced in ``SourceImageSequence`` and the model in
    the ``ContributingEquipmentSequence`` (purpose DCM "Processing Equipment", one of the codes highdicom allows;
    the SR uses MONAI Deploy's IHE AIR "Processing Algorithm" item).

    Args:
        ref: the source pydicom dataset.
        rgb: ``(H, W, 3)`` uint8.
        series_instance_uid, series_number, instance_number: identity of the new object in its new series.
        model: :meth:`~medad_monai.apps.deploy.model.AnomalyBundle.info`.
        description: stored as ``DerivationDescription`` (e.g. the SR narrative).
    """
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"secondary_capture needs an (H, W, 3) uint8 image, got {rgb.shape}.")
    algorithm = hd.ContributingEquipment(
        manufacturer=model.get("authors") or "medad-monai",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=str(model.get("name", ""))[:64],
        software_versions=str(model.get("version", ""))[:64],
    )
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=int(instance_number),
        manufacturer="medad-monai",
        # placeholder for highdicom's check; replaced below by the source's own value (not validated by highdicom)
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm],
        series_description="AI anomaly heatmap - research use only",
        software_versions=str(model.get("version", ""))[:64],
    )
    orientation = ref.get("PatientOrientation", None)
    two_values = orientation is not None and not isinstance(orientation, str) and len(orientation) == 2
    sc.PatientOrientation = list(orientation) if two_values else None
    spacing = valid_pixel_spacing(ref.get("PixelSpacing", None))
    if spacing is not None:
        sc.PixelSpacing = ref.PixelSpacing
    sc.BurnedInAnnotation = "NO"
    # only attributes of the SC Image IOD (General Series): no View Position, no Image Laterality
    for key in ("ViewPosition", "ImageLaterality", "Laterality"):
        sc.pop(key, None)
    body_part = body_part_examined(ref)
    if body_part is not None:
        sc.BodyPartExamined = body_part
    laterality = series_laterality(ref)
    if laterality is not None:
        sc.Laterality = laterality
    source = Dataset()
    source.ReferencedSOPClassUID = ref.SOPClassUID
    source.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    source.PurposeOfReferenceCodeSequence = [_code("121322", "DCM", "Source image for image processing operation")]
    sc.SourceImageSequence = [source]
    if description:
        sc.DerivationDescription = description[:1024]
    sc.ImageComments = "Heatmap of the anomaly map (inferno), cyan outline: map above the calibrated pixel threshold."
    return sc


def text_sr(
    ref_series: Any,
    ref: Any,
    text: str,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    model: dict[str, Any],
    extra_references: Sequence[tuple[str, str, str]] = (),
) -> Any:
    """A Basic Text SR with the narrative ``text``, in the source's study (MONAI Deploy's SR writer layout).

    The common modules (patient, study, equipment, SOP common, contributing equipment with the model) come from
    MONAI Deploy's ``write_common_modules`` with ``copy_tags=True``, less the three attributes it writes that the
    Basic Text SR IOD does not have (Acquisition DateTime, Body Part Examined, Requested Procedure ID). The content
    is a CONTAINER "Diagnostic Imaging Report" holding one TEXT "Narrative Summary" (as in
    ``DICOMTextSRWriterOperator``), which is ``INFERRED FROM`` an IMAGE item referencing the source instance. The
    source (and ``extra_references``, e.g. the Secondary Capture) are listed in
    ``CurrentRequestedProcedureEvidenceSequence``, as the SR Document General module requires when the content
    references instances.

    Args:
        ref_series: the source ``monai.deploy.core.domain.DICOMSeries`` (study attributes are copied from it).
        ref: the source instance's pydicom dataset (referenced in the content).
        text: the narrative.
        series_instance_uid, series_number, instance_number: identity of the new object in its new series.
        model: :meth:`~medad_monai.apps.deploy.model.AnomalyBundle.info`.
        extra_references: ``(SOPClassUID, SOPInstanceUID, SeriesInstanceUID)`` of further evidence in the same
            study (e.g. the Secondary Capture), listed in the evidence sequence under their series.
    """
    from monai.deploy.operators.dicom_utils import EquipmentInfo, ModelInfo, write_common_modules
    from pydicom.dataset import Dataset

    info = ModelInfo(
        creator=str(model.get("authors", "")),
        name=str(model.get("name", ""))[:64],
        version=str(model.get("version", ""))[:64],
        uid=_model_uid(model),
    )
    equipment = EquipmentInfo(manufacturer="medad-monai", manufacturer_model="anomaly detection SR writer")
    ds = write_common_modules(ref_series, True, "SR", BASIC_TEXT_SR_SOP_CLASS, info, equipment)
    # write_common_modules writes these for every IOD; the Basic Text SR IOD has none of them (no General Series,
    # no General Acquisition module), so they would make it a Standard Extended SOP Class
    for key in ("AcquisitionDateTime", "BodyPartExamined", "RequestedProcedureID"):
        ds.pop(key, None)
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesDescription = "AI anomaly detection report - research use only"
    ds.InstanceNumber = str(int(instance_number))
    ds.SeriesNumber = str(int(series_number))
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    ds.ContinuityOfContent = "SEPARATE"

    image_item = Dataset()
    image_item.RelationshipType = "INFERRED FROM"
    image_item.ValueType = "IMAGE"
    sop_ref = Dataset()
    sop_ref.ReferencedSOPClassUID = ref.SOPClassUID
    sop_ref.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    image_item.ReferencedSOPSequence = [sop_ref]

    narrative = Dataset()
    narrative.RelationshipType = "CONTAINS"
    narrative.ValueType = "TEXT"
    narrative.ConceptNameCodeSequence = [_code("111412", "DCM", "Narrative Summary")]
    narrative.TextValue = text
    narrative.ContentSequence = [image_item]
    ds.ContentSequence = [narrative]

    by_series: dict[str, list[tuple[str, str]]] = {str(ref.SeriesInstanceUID): [(ref.SOPClassUID, ref.SOPInstanceUID)]}
    for cls_uid, inst_uid, ser_uid in extra_references:
        by_series.setdefault(str(ser_uid), []).append((cls_uid, inst_uid))
    study = Dataset()
    study.StudyInstanceUID = ds.StudyInstanceUID
    study.ReferencedSeriesSequence = []
    for ser_uid, instances in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = ser_uid
        series.ReferencedSOPSequence = []
        for cls_uid, inst_uid in instances:
            item = Dataset()
            item.ReferencedSOPClassUID = cls_uid
            item.ReferencedSOPInstanceUID = inst_uid
            series.ReferencedSOPSequence.append(item)
        study.ReferencedSeriesSequence.append(series)
    ds.CurrentRequestedProcedureEvidenceSequence = [study]
    return ds


def _model_uid(model: dict[str, Any]) -> str:
    """A Device UID that changes whenever the weights change (IHE AIR asks for a new one after retraining)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(model.get("name", "")), str(model.get("weights_sha256", ""))])
