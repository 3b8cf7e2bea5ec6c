"""The app's input folder, checked before the MONAI Deploy graph starts, and the app's exit statuses.

MONAI Deploy's ``DICOMDataLoaderOperator`` raises inside the running graph when a folder holds no DICOM study,
which ends in a Holoscan error and a long traceback. :func:`scan_input` reads the header of every file first (with
the loader's rules: DICOM Part 10 files with the preamble; DICOMDIR and files without the four UIDs are ignored) and
raises :class:`InputError` with one sentence that names the folder, what was found and what to do. It also counts
the series per Modality, so that a run in which no series was selected can say which modalities were found
(:func:`no_series_message`).

Plain pydicom: no Holoscan import, usable and testable in any environment with pydicom.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ACCEPTED_MODALITIES",
    "ALLOW_FAILED_ENV",
    "EXIT_FAILED_INSTANCES",
    "EXIT_INPUT_ERROR",
    "EXIT_OK",
    "InputError",
    "InputScan",
    "allow_failed_instances",
    "no_series_message",
    "scan_input",
]

#: every selected instance was processed and all outputs were written.
EXIT_OK = 0
#: nothing was processed: the input folder or the bundle cannot be used (missing, empty, no DICOM file, no series
#: of an accepted modality, bundle files missing). argparse's own usage errors also exit with 2.
EXIT_INPUT_ERROR = 2
#: the run finished and ``results.json`` is complete, but at least one selected instance could not be processed.
EXIT_FAILED_INSTANCES = 3
#: set to 1/true/yes/on to exit 0 even when some instances failed (they stay listed in ``results.json``).
ALLOW_FAILED_ENV = "MEDAD_ALLOW_FAILED_INSTANCES"
#: the modalities of the default selection rule (:data:`medad_monai.apps.deploy.app.DEFAULT_RULES`).
ACCEPTED_MODALITIES = ("CR", "DX")
#: Media Storage Directory Storage (DICOMDIR): not an instance, ignored like MONAI Deploy's loader does.
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"]


class InputError(ValueError):
    """The input cannot be processed; the message is one sentence naming the path, what was found and the fix."""


@dataclass
class InputScan:
    """What :func:`scan_input` found in the input folder.

    Attributes:
        folder: the input folder.
        n_files: files found (recursively).
        n_instances: DICOM instances that MONAI Deploy's loader will group into studies.
        not_dicom: files that are not DICOM Part 10 files (up to a few examples, relative paths).
        n_not_dicom: how many files are not DICOM.
        series_by_modality: ``{Modality: set of SeriesInstanceUIDs}`` (``""`` when the attribute is missing).
    """

    folder: Path
    n_files: int = 0
    n_instances: int = 0
    not_dicom: list[str] = field(default_factory=list)
    n_not_dicom: int = 0
    series_by_modality: dict[str, set[str]] = field(default_factory=dict)

    def modalities(self) -> str:
        """``"CT (2 series), MR (1 series)"``: the modalities found, most series first."""
        items = sorted(self.series_by_modality.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        return ", ".join(f"{m or '(no Modality)'} ({len(s)} series)" for m, s in items) or "none"

    def to_dict(self) -> dict[str, Any]:
        """The summary stored in ``results.json`` under ``"input"``."""
        return {
            "folder": str(self.folder),
            "n_files": self.n_files,
            "n_dicom_instances": self.n_instances,
            "n_not_dicom": self.n_not_dicom,
            "series_by_modality": {m: len(s) for m, s in sorted(self.series_by_modality.items())},
        }


def _walk(folder: Path) -> Iterable[Path]:
    # the loader lists folders recursively and follows links to folders; so do we
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def scan_input(folder: str | os.PathLike) -> InputScan:
    """Reads the header of every file under ``folder`` and checks that there is something to process.

    Args:
        folder: the app's input folder (``-i`` or ``HOLOSCAN_INPUT_PATH``).

    Returns:
        what was found; at least one DICOM instance.

    Raises:
        InputError: the folder does not exist or is not a folder, holds no file, holds no DICOM instance, or holds
            a file that looks like DICOM but cannot be read (MONAI Deploy's loader would stop on it).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(folder)
    if not path.exists():
        raise InputError(f"the input folder {path} does not exist: give a folder of DICOM files with -i or "
                         f"HOLOSCAN_INPUT_PATH.")
    if not path.is_dir():
        raise InputError(f"the input {path} is not a folder: put the DICOM file(s) in a folder and give the folder "
                         f"with -i or HOLOSCAN_INPUT_PATH.")
    scan = InputScan(folder=path)
    for file in _walk(path):
        scan.n_files += 1
        rel = str(file.relative_to(path))
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except InvalidDicomError:
            # the loader reads without force, so it skips these too (no 128-byte preamble + "DICM", or not DICOM)
            scan.n_not_dicom += 1
            if len(scan.not_dicom) < 3:
                scan.not_dicom.append(rel)
            continue
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on broken files
            raise InputError(
                f"cannot read {file} as DICOM ({type(e).__name__}: {e}); MONAI Deploy's loader would stop on it: "
                f"repair the file or move it out of {path}."
            ) from e
        uids = [ds.get(k) for k in _HEADER_TAGS[:4]]
        if not all(uids) or str(uids[0]) == _DICOMDIR_CLASS:
            continue  # DICOMDIR, or no SOP/study/series UID: the loader ignores it
        scan.n_instances += 1
        modality = str(ds.get("Modality", "") or "").strip().upper()
        scan.series_by_modality.setdefault(modality, set()).add(str(uids[3]))
    if scan.n_files == 0:
        raise InputError(f"the input folder {path} is empty: put the DICOM files of the CR/DX radiographs to "
                         f"analyse in it (sub-folders are searched too).")
    if scan.n_instances == 0:
        if scan.n_not_dicom == scan.n_files:
            examples = ", ".join(scan.not_dicom) + (", ..." if scan.n_not_dicom > len(scan.not_dicom) else "")
            raise InputError(
                f"no DICOM file in the input folder {path}: none of its {scan.n_files} file(s) is a DICOM Part 10 "
                f"file ({examples}); the app reads DICOM files with the 128-byte preamble and 'DICM' (CR/DX "
                f"radiographs), not PNG/JPEG/NIfTI (use the bundle's inference workflow for those)."
            )
        raise InputError(
            f"no DICOM instance in the input folder {path}: its {scan.n_files - scan.n_not_dicom} DICOM file(s) "
            f"are DICOMDIRs or lack a SOP/Study/Series Instance UID; give the folder of the image files themselves."
        )
    return scan


def no_series_message(
    scan: InputScan, rule_names: list[str], custom_rules: bool, results_file: str | os.PathLike | None = None
) -> str:
    """The error of a run that selected no series: what was found, and what the app accepts.

    Args:
        scan: the input scan.
        rule_names: names of the selection rules that were applied.
        custom_rules: True when the rules come from ``MEDAD_SERIES_RULES`` rather than the default CR/DX rule.
        results_file: the ``results.json`` that lists the scan, named in the message when given.
    """
    listed = f", listed in {results_file}" if results_file else ""
    found = f"found {scan.modalities()} in {scan.n_instances} DICOM instance(s){listed}"
    if custom_rules:
        names = ", ".join(repr(n) for n in rule_names) or "none"
        return (f"no series in {scan.folder} matches the selection rules of MEDAD_SERIES_RULES ({names}): {found}; "
                f"fix the rules or unset MEDAD_SERIES_RULES to select every CR/DX series.")
    accepted = " or ".join(ACCEPTED_MODALITIES)
    return (f"no {'/'.join(ACCEPTED_MODALITIES)} series in {scan.folder}: {found}; the app accepts radiographs with "
            f"Modality {accepted} only (set MEDAD_SERIES_RULES to select other series at your own risk).")


def allow_failed_instances() -> bool:
    """True when :data:`ALLOW_FAILED_ENV` is set to 1/true/yes/on (case-insensitive)."""
    return os.environ.get(ALLOW_FAILED_ENV, "").strip().lower() in ("1", "true", "yes", "on")
