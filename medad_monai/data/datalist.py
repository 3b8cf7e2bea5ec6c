"""Datalists for anomaly detection: a MONAI decathlon-style JSON file, a loader that validates it, and converters.

Format (MONAI decathlon style, as read by ``monai.data.load_decathlon_datalist``)::

    {
      "description": "...",                     # optional metadata keys are ignored by the loader
      "training":   [{"image": "images/n1.png"}, ...],                       # healthy only
      "validation": [{"image": "images/n2.png"}, ...],                       # healthy only
      "test":       [{"image": "images/n3.png", "label": 0},
                     {"image": "images/a1.png", "label": 1, "mask": "masks/a1.png"}, ...]
    }

- ``image`` (required) and ``mask`` (optional) are paths relative to the dataset directory, which defaults to the
  folder holding the JSON file; absolute paths are kept. ``label`` is 0 (normal) or 1 (abnormal); items without a
  label are treated as normal (see :mod:`medad_monai.data.transforms`).
- Extra keys (``task``, ``lesion``) pass through. Every item of one section should have the same keys, because
  MONAI's default collate takes the keys of the first item of a batch.
- Extra sections (e.g. ``test_pneumonia``) are allowed and read with ``section=...``.

The converters write such a file with paths relative to the output file's folder, and return the dict:
:func:`datalist_from_folders` (normal/abnormal/mask folders, anomalib ``Folder``-like),
:func:`datalist_from_morphaeus_csv` (the original MorphAEus split CSVs) and :func:`datalist_from_medianomaly`
(MedIAnomaly / DDAD-ASR ``data.json`` and its BraTS2021 folder layout).
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .readers import SUPPORTED_EXTENSIONS

__all__ = [
    "load_datalist",
    "write_datalist",
    "datalist_from_folders",
    "datalist_from_morphaeus_csv",
    "datalist_from_medianomaly",
    "MORPHAEUS_SPLITS",
]

_PATH_KEYS = ("image", "mask")
_MAX_LISTED = 5


def _resolve(base: Path, value: Any, where: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise ValueError(f"{where}: expected a non-empty path string, got {value!r}.")
    p = Path(os.path.expanduser(str(value)))
    return os.path.normpath(str(p if p.is_absolute() else base / p))


def load_datalist(
    path: str | os.PathLike,
    section: str = "training",
    dataset_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    require_label: bool = False,
    allow_outside: bool = True,
) -> list[dict[str, Any]]:
    """Reads one section of a datalist JSON, with absolute paths, and validates it.

    ``monai.data.load_decathlon_datalist`` reads the same files, but it turns any other string value that happens to
    name an existing file into a path and treats a ``label`` as a path for segmentation lists, so the joining is done
    here for ``image`` and ``mask`` only. Like MONAI, a section that is a list of strings is read as images.

    Args:
        path: the JSON file.
        section: ``"training"``, ``"validation"``, ``"test"`` or any other list in the file.
        dataset_dir: folder the relative paths start from; defaults to the JSON file's folder.
        check_files: raise if an image or mask file does not exist.
        require_label: every item needs a ``label`` (a labelled test section: an item without one would otherwise
            be taken for normal).
        allow_outside: accept image/mask paths outside ``dataset_dir`` (``..`` or absolute paths elsewhere); the
            bundles pass ``False`` unless ``--allow_outside_dataset_dir True``.

    Returns:
        a list of new dicts (the file is not modified), each with absolute ``image`` (and ``mask``) paths.

    Raises:
        FileNotFoundError: the JSON file, or (with ``check_files``) some images/masks, do not exist; the message gives
            the count and the first few missing paths.
        ValueError: not valid JSON, unknown section, an item without ``image``, a ``label`` not in {0, 1}, a missing
            label (``require_label``), an image listed twice, or a path outside ``dataset_dir`` (``allow_outside``
            false); the message names the item and the fix.

    Example::

        >>> items = load_datalist("datalist.json", "test")
        >>> items[0]
        {'image': '/data/demo/images/test_normal_0000.png', 'label': 0, 'mask': '/data/demo/masks/...'}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Datalist '{path}' does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Datalist '{path}' is not valid JSON: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"Datalist '{path}' must hold a JSON object with sections, got {type(content).__name__}.")
    sections = sorted(k for k, v in content.items() if isinstance(v, list))
    if section not in content or not isinstance(content[section], list):
        raise ValueError(f"Datalist '{path}' has no section '{section}'; its sections are {sections}.")
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    base = Path(os.path.expanduser(str(base))).absolute()
    items: list[dict[str, Any]] = []
    missing: list[str] = []
    first_seen: dict[str, int] = {}
    root = os.path.normpath(str(base))
    for i, raw in enumerate(content[section]):
        where = f"Datalist '{path}', section '{section}', item {i}"
        item = {"image": raw} if isinstance(raw, str) else raw
        if not isinstance(item, dict):
            raise ValueError(f"{where}: items must be objects or path strings, got {type(raw).__name__}.")
        if "image" not in item:
            raise ValueError(f"{where}: no 'image' key (keys: {sorted(item)}).")
        out = dict(item)
        for key in _PATH_KEYS:
            if key in out and out[key] is not None:
                out[key] = _resolve(base, out[key], f"{where}, '{key}'")
                if not allow_outside and os.path.commonpath([root, out[key]]) != root:
                    raise ValueError(
                        f"{where}: '{key}' {item[key]!r} lies outside the dataset folder {root}. Move the files into "
                        "it, point --dataset_dir at a folder holding all of them, or accept paths outside it with "
                        "--allow_outside_dataset_dir True."
                    )
                if check_files and not os.path.isfile(out[key]):
                    missing.append(out[key])
        if out["image"] in first_seen:
            raise ValueError(
                f"{where}: the image {item['image']!r} is listed again (first at item {first_seen[out['image']]}); it "
                "would be counted twice. Remove the duplicate."
            )
        first_seen[out["image"]] = i
        if require_label and out.get("label") is None:
            raise ValueError(
                f"{where}: no 'label'; every item of a labelled test section needs 'label': 0 (normal) or 1 "
                f"(abnormal) ({item['image']!r}). Add the labels, or run inference instead of evaluation."
            )
        if "label" in out and out["label"] is not None:
            label = out["label"]
            if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in (0, 1):
                raise ValueError(f"{where}: 'label' must be 0 or 1, got {label!r}.")
            out["label"] = int(label)
        items.append(out)
    if missing:
        shown = "\n  ".join(missing[:_MAX_LISTED])
        more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise FileNotFoundError(
            f"Datalist '{path}', section '{section}': {len(missing)} file(s) not found (paths relative to "
            f"'{base}'):\n  {shown}{more}"
        )
    return items


def write_datalist(datalist: dict[str, Any], output: str | os.PathLike) -> Path:
    """Writes a datalist dict as indented JSON (creating parent folders) and returns the path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(datalist, f, indent=1)
        f.write("\n")
    os.replace(tmp, output)
    return output


def _rel(path: str | os.PathLike, start: Path) -> str:
    """Path relative to ``start`` with forward slashes, or absolute when no relative path exists (other drive)."""
    path = os.path.abspath(str(path))
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _stem(name: str) -> str:
    lower = name.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def _list_images(folder: str | os.PathLike, extensions: Sequence[str], recursive: bool) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder '{folder}' does not exist or is not a folder.")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    files = folder.rglob("*") if recursive else folder.iterdir()
    found = sorted(
        p for p in files if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(exts)
    )
    return found


def _split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Shuffles ``range(n)`` with ``seed`` and cuts it into ``len(fractions)`` parts plus the rest (first)."""
    order = np.random.default_rng(seed).permutation(n)
    counts = [int(round(f * n)) for f in fractions]
    rest = n - sum(counts)
    parts, start = [order[:rest]], rest
    for c in counts:
        parts.append(order[start : start + c])
        start += c
    return parts


_MASK_SUFFIXES = ("", "_mask", "-mask", "_seg", "_label", "_gt", "_annotation")


def datalist_from_folders(
    normal_dir: str | os.PathLike,
    output: str | os.PathLike,
    abnormal_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    extensions: Sequence[str] = SUPPORTED_EXTENSIONS,
    recursive: bool = False,
) -> dict[str, Any]:
    """Builds a datalist from a folder of healthy images and, optionally, folders of abnormal images and masks.

    The healthy images are shuffled with ``seed`` and split into training / validation / test (label 0) by the given
    fractions (rounded; training gets the rest). Every abnormal image goes to the test section with label 1. A mask
    is matched to an abnormal image by file stem: ``a1.png`` matches ``a1.png``, ``a1.nii.gz``, ``a1_mask.png``,
    ``a1_seg.png``, ``a1_label.png``, ``a1_gt.png`` (any supported extension); abnormal images without a match get
    no ``mask`` key (no pixel metrics for them) and a warning gives their count. Test normals never get masks.

    Args:
        normal_dir: folder of healthy images.
        output: JSON file to write; the paths inside are relative to its folder.
        abnormal_dir: folder of abnormal images (test only).
        mask_dir: folder of masks for the abnormal images.
        val_fraction: share of healthy images for validation.
        test_fraction: share of healthy images for the test section.
        seed: shuffling seed.
        extensions: file name endings that count as images.
        recursive: search sub-folders too.

    Returns:
        the datalist dict that was written.

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: no healthy images, fractions out of range, no training image left, or two masks for one stem.

    Example::

        >>> d = datalist_from_folders("data/normal", "data/datalist.json", abnormal_dir="data/tumour",
        ...                           mask_dir="data/tumour_masks")
        >>> len(d["training"]), d["test"][-1]
        (810, {'image': 'tumour/t_17.png', 'label': 1, 'mask': 'tumour_masks/t_17.png'})
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) with a sum < 1."
        )
    out_dir = Path(output).absolute().parent
    normals = _list_images(normal_dir, extensions, recursive)
    if not normals:
        raise ValueError(f"No images with extensions {tuple(extensions)} in '{normal_dir}'.")
    train_idx, val_idx, test_idx = _split_indices(len(normals), (val_fraction, test_fraction), seed)
    if len(train_idx) == 0:
        raise ValueError(f"Only {len(normals)} healthy image(s) in '{normal_dir}': none left for training.")
    training = [{"image": _rel(normals[i], out_dir)} for i in sorted(train_idx)]
    validation = [{"image": _rel(normals[i], out_dir)} for i in sorted(val_idx)]
    test: list[dict[str, Any]] = [{"image": _rel(normals[i], out_dir), "label": 0} for i in sorted(test_idx)]

    if abnormal_dir is not None:
        abnormals = _list_images(abnormal_dir, extensions, recursive)
        if not abnormals:
            warnings.warn(f"No images in abnormal_dir '{abnormal_dir}'.", stacklevel=2)
        masks_by_stem: dict[str, Path] = {}
        if mask_dir is not None:
            for m in _list_images(mask_dir, extensions, recursive):
                stem = _stem(m.name)
                if stem in masks_by_stem:
                    raise ValueError(f"Two masks with stem '{stem}' in '{mask_dir}': {masks_by_stem[stem]} and {m}.")
                masks_by_stem[stem] = m
        unmatched = 0
        for a in abnormals:
            item: dict[str, Any] = {"image": _rel(a, out_dir), "label": 1}
            if mask_dir is not None:
                stem = _stem(a.name)
                match = next((masks_by_stem[stem + s] for s in _MASK_SUFFIXES if stem + s in masks_by_stem), None)
                if match is None:
                    unmatched += 1
                else:
                    item["mask"] = _rel(match, out_dir)
            test.append(item)
        if mask_dir is not None and unmatched:
            warnings.warn(
                f"{unmatched} of {len(abnormals)} abnormal images in '{abnormal_dir}' have no mask in '{mask_dir}' "
                "(matched by file stem); they get no pixel-level metrics.",
                stacklevel=2,
            )
    elif mask_dir is not None:
        raise ValueError("mask_dir was given without abnormal_dir.")

    datalist = {
        "description": f"datalist_from_folders(normal_dir='{normal_dir}', abnormal_dir='{abnormal_dir}', "
        f"mask_dir='{mask_dir}', val_fraction={val_fraction}, test_fraction={test_fraction}, seed={seed})",
        "training": training,
        "validation": validation,
        "test": test,
    }
    write_datalist(datalist, output)
    return datalist


# CSV file -> (section, label, task) of the original MorphAEus splits (ci-ber/MorphAEus data/CXR/splits).
MORPHAEUS_SPLITS: dict[str, tuple[str, int, str]] = {
    "cxr_normal_train.csv": ("training", 0, "normal"),
    "cxr_normal_val.csv": ("validation", 0, "normal"),
    "cxr_normal_test.csv": ("test", 0, "normal"),
    "cxr_opa_test.csv": ("test", 1, "pneumonia"),
    "cxr_covid_padchest_test.csv": ("test", 1, "covid"),
}


def _read_filename_csv(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "filename" not in reader.fieldnames:
            raise ValueError(f"Split file '{path}' has no 'filename' column (columns: {reader.fieldnames}).")
        return [row["filename"].strip() for row in reader if row.get("filename") and row["filename"].strip()]


def _check_exist(paths: Sequence[str], what: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:_MAX_LISTED])
        more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise FileNotFoundError(f"{what}: {len(missing)} file(s) not found:\n  {shown}{more}")


def datalist_from_morphaeus_csv(
    splits_dir: str | os.PathLike,
    output: str | os.PathLike,
    root: str | os.PathLike = ".",
    check_files: bool = True,
) -> dict[str, Any]:
    """Converts the original MorphAEus CXR split CSVs into a datalist.

    The CSVs (``data/CXR/splits`` in ci-ber/MorphAEus) have one ``filename`` column with paths such as
    ``./data/CXR/Normal/images/Normal-1.png``, relative to the MorphAEus working directory (``root`` here). Mapping
    (:data:`MORPHAEUS_SPLITS`): ``cxr_normal_train`` -> training, ``cxr_normal_val`` -> validation,
    ``cxr_normal_test`` -> test label 0 (task ``"normal"``), ``cxr_opa_test`` (Kaggle Lung_Opacity, the paper's
    "Pneumonia") -> test label 1 task ``"pneumonia"``, ``cxr_covid_padchest_test`` -> test label 1 task ``"covid"``.

    Sections written: ``training``, ``validation``, ``test`` (all test items once, each with a ``task`` field) and
    one section per pathology, ``test_pneumonia`` and ``test_covid`` (the normal test items plus that pathology),
    which is how the paper scores each task against normals. Deviation: the paper's COVID task uses PadChest normals
    (``data/padchest/splits/cxr_normal_test.csv``), which the repository does not ship; ``test_covid`` uses the
    Kaggle normal test split instead. There are no masks. A missing CSV is skipped, except ``cxr_normal_train.csv``.

    Args:
        splits_dir: folder with the CSV files.
        output: JSON file to write; the paths inside are relative to its folder.
        root: folder the CSV paths are relative to (the MorphAEus repository root, where ``data/CXR`` lives).
        check_files: raise if listed images do not exist under ``root``.

    Returns:
        the datalist dict that was written.

    Raises:
        FileNotFoundError: ``cxr_normal_train.csv`` or (with ``check_files``) listed images are missing.
        ValueError: a CSV without a ``filename`` column.

    Example::

        >>> d = datalist_from_morphaeus_csv("MorphAEus/data/CXR/splits", "cxr.json", root="MorphAEus")
        >>> sorted(k for k in d if k.startswith("test")), len(d["training"])
        (['test', 'test_covid', 'test_pneumonia'], 8154)
    """
    splits_dir, root = Path(splits_dir), Path(root).absolute()
    out_dir = Path(output).absolute().parent
    if not (splits_dir / "cxr_normal_train.csv").is_file():
        raise FileNotFoundError(f"'{splits_dir / 'cxr_normal_train.csv'}' not found (MorphAEus split folder expected).")
    datalist: dict[str, Any] = {
        "description": "MorphAEus CXR splits (ci-ber/MorphAEus data/CXR/splits) converted by medad_monai",
        "training": [],
        "validation": [],
        "test": [],
    }
    per_task: dict[str, list[dict[str, Any]]] = {}
    for csv_name, (section, label, task) in MORPHAEUS_SPLITS.items():
        csv_path = splits_dir / csv_name
        if not csv_path.is_file():
            warnings.warn(f"'{csv_path}' not found; skipped.", stacklevel=2)
            continue
        paths = [os.path.normpath(str(root / f)) for f in _read_filename_csv(csv_path)]
        if check_files:
            _check_exist(paths, f"Split '{csv_path}' (paths relative to root '{root}')")
        if section == "test":
            items = [{"image": _rel(p, out_dir), "label": label, "task": task} for p in paths]
            datalist["test"].extend(items)
            per_task.setdefault(task, []).extend(items)
        else:
            datalist[section].extend({"image": _rel(p, out_dir)} for p in paths)
    normals = per_task.get("normal", [])
    for task, items in per_task.items():
        if task != "normal":
            datalist[f"test_{task}"] = [dict(x) for x in normals] + [dict(x) for x in items]
    write_datalist(datalist, output)
    return datalist


def _medianomaly_brats(root: Path, out_dir: Path, val_fraction: float, seed: int) -> dict[str, Any]:
    """MedIAnomaly's BraTS2021 layout: train/*.png, test/normal, test/tumor, test/annotation ('flair' -> 'seg')."""
    train = sorted(p for p in (root / "train").iterdir() if p.is_file() and not p.name.startswith("."))
    t_norm = sorted(p for p in (root / "test" / "normal").iterdir() if p.is_file() and not p.name.startswith("."))
    t_tum = sorted(p for p in (root / "test" / "tumor").iterdir() if p.is_file() and not p.name.startswith("."))
    ann = root / "test" / "annotation"
    train_idx, val_idx = _split_indices(len(train), (val_fraction,), seed)
    test = [{"image": _rel(p, out_dir), "label": 0} for p in t_norm]
    missing = []
    for p in t_tum:
        mask = ann / p.name.replace("flair", "seg")
        if not mask.is_file():
            missing.append(str(mask))
        test.append({"image": _rel(p, out_dir), "label": 1, "mask": _rel(mask, out_dir)})
    if missing:
        _check_exist(missing, f"BraTS annotations under '{ann}'")
    return {
        "description": f"MedIAnomaly BraTS2021 layout at '{root}' converted by medad_monai "
        f"(validation = {val_fraction} of train, seed {seed})",
        "training": [{"image": _rel(train[i], out_dir)} for i in sorted(train_idx)],
        "validation": [{"image": _rel(train[i], out_dir)} for i in sorted(val_idx)],
        "test": test,
    }


def datalist_from_medianomaly(
    data_json: str | os.PathLike,
    output: str | os.PathLike,
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    check_files: bool = True,
) -> dict[str, Any]:
    """Converts a MedIAnomaly / DDAD-ASR dataset (``data.json`` or the BraTS2021 folder layout) into a datalist.

    ``data.json`` (format of ``caiyu6666/DDAD-ASR/data/README.md``, read by MedIAnomaly's ``MedAD`` dataset) is
    ``{"train": {"0": [names], "unlabeled": {"0": [...], "1": [...]}}, "test": {"0": [names], "1": [names]}}`` where
    names are file names inside ``<root>/images/``. ``train["0"]`` -> training and validation, ``test["0"]`` -> test
    label 0, ``test["1"]`` -> test label 1; the ``unlabeled`` pool (for semi-supervised methods) is ignored. These
    datasets have no masks.

    BraTS2021 has no ``data.json`` in MedIAnomaly: pass its folder as ``data_json``; ``train/`` -> training and
    validation, ``test/normal`` -> label 0, ``test/tumor`` -> label 1 with the mask
    ``test/annotation/<name with 'flair' replaced by 'seg'>`` (as MedIAnomaly's ``BraTSAD`` does).

    MedIAnomaly has no validation split; ``val_fraction`` of the training normals (shuffled with ``seed``) become
    ``validation`` (our choice, for label-free checkpoint selection and threshold calibration). ``val_fraction=0``
    keeps the benchmark's training set intact and leaves ``validation`` empty.

    Args:
        data_json: the ``data.json`` file, or a dataset folder holding ``data.json`` or the BraTS layout.
        output: JSON file to write; the paths inside are relative to its folder.
        root: dataset folder holding ``images/``; defaults to the folder of ``data.json``.
        val_fraction: share of training normals moved to validation.
        seed: shuffling seed of that split.
        check_files: raise if listed images do not exist.

    Returns:
        the datalist dict that was written.

    Raises:
        FileNotFoundError: no ``data.json`` / BraTS layout, or listed files missing.
        ValueError: ``data.json`` without the ``train["0"]``, ``test["0"]`` and ``test["1"]`` lists.

    Example::

        >>> d = datalist_from_medianomaly("~/MedIAnomaly-Data/RSNA/data.json", "rsna.json")
        >>> len(d["training"]) + len(d["validation"]), d["test"][0]
        (3851, {'image': '../MedIAnomaly-Data/RSNA/images/...png', 'label': 0})
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    src = Path(os.path.expanduser(str(data_json)))
    out_dir = Path(output).absolute().parent
    if src.is_dir():
        if (src / "data.json").is_file():
            src = src / "data.json"
        elif (src / "train").is_dir() and (src / "test" / "tumor").is_dir():
            datalist = _medianomaly_brats(Path(root) if root is not None else src, out_dir, val_fraction, seed)
            write_datalist(datalist, output)
            return datalist
        else:
            raise FileNotFoundError(
                f"'{src}' holds neither data.json nor the BraTS2021 layout (train/, test/normal, test/tumor)."
            )
    if not src.is_file():
        raise FileNotFoundError(f"MedIAnomaly data.json '{src}' does not exist.")
    with open(src, encoding="utf-8") as f:
        content = json.load(f)
    try:
        train0, test0, test1 = content["train"]["0"], content["test"]["0"], content["test"]["1"]
        if not all(isinstance(x, list) for x in (train0, test0, test1)):
            raise TypeError
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"'{src}' is not a MedIAnomaly data.json: expected train['0'], test['0'] and test['1'] lists."
        ) from e
    img_dir = (Path(os.path.expanduser(str(root))) if root is not None else src.parent).absolute() / "images"

    def paths(names: list[str]) -> list[str]:
        return [str(img_dir / n) for n in names]

    p_train, p_test0, p_test1 = paths(train0), paths(test0), paths(test1)
    if check_files:
        _check_exist(p_train + p_test0 + p_test1, f"MedIAnomaly '{src}' (images under '{img_dir}')")
    train_idx, val_idx = _split_indices(len(p_train), (val_fraction,), seed)
    datalist = {
        "description": f"MedIAnomaly data.json '{src}' converted by medad_monai "
        f"(validation = {val_fraction} of train['0'], seed {seed})",
        "training": [{"image": _rel(p_train[i], out_dir)} for i in sorted(train_idx)],
        "validation": [{"image": _rel(p_train[i], out_dir)} for i in sorted(val_idx)],
        "test": [{"image": _rel(p, out_dir), "label": 0} for p in p_test0]
        + [{"image": _rel(p, out_dir), "label": 1} for p in p_test1],
    }
    write_datalist(datalist, output)
    return datalist
