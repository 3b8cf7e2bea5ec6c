"""The real-image development benchmark committed in ``data/real``: where it is, a check of its files against the
manifests, and one datalist for all of it that the demo and the bundles take.

::

    python -m medad_monai real_benchmark_datalist                # -> data/real/datalist.json
    python -m medad_monai demo --dataset_dir data/real --max_epochs 1
    python -m monai.bundle run --config_file bundles/morphaeus/configs/train.json --dataset_dir data/real
    python -m medad_monai real_benchmark_datalist /tmp/real      # copies the images -> /tmp/real/datalist.json
    python -m medad_monai real_benchmark_datalist /tmp/les --test_section test_lesions   # `test` = the lesion task

Besides the sources (healthy training / validation and a labelled test set each), ``data/real`` holds derived test
sets (:data:`DERIVED_TEST_SETS`, e.g. ``kermany_lesions`` written by ``python -m medad_monai prepare_lesion_task``):
test images only, added to the combined datalist as extra sections (``test_lesions``) next to the sources' ``test``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..datalist import write_datalist
from ._common import read_manifest, rel_posix, sha256_file

__all__ = ["SOURCES", "DERIVED_TEST_SETS", "real_data_dir", "verify_real_data", "real_benchmark_datalist"]

#: the sources committed under ``data/real/<name>`` (each written by ``python -m medad_monai prepare_<name>``).
SOURCES: tuple[str, ...] = ("kermany",)

#: test-only sets derived from the sources, committed under ``data/real/<name>``: folder name -> the section their
#: ``test`` becomes in the combined datalist (``test_<x>`` sections become ``<section>_<x>``).
DERIVED_TEST_SETS: dict[str, str] = {"kermany_lesions": "test_lesions"}

# how a missing folder is rebuilt (the default: prepare_<name> <source_dir>)
_PREPARE_COMMAND = {"kermany_lesions": "prepare_lesion_task data/real/kermany"}

#: total size the committed real data may reach (bytes).
MAX_TOTAL_BYTES = 50 * 1024 * 1024


def real_data_dir() -> Path:
    """``data/real`` of the repository (``$MEDAD_REAL_DATA_DIR`` overrides it); the data is not part of the wheel,
    so this needs a clone of the repository (``pip install -e .``)."""
    env = os.environ.get("MEDAD_REAL_DATA_DIR")
    if env:
        return Path(env).expanduser().absolute()
    return Path(__file__).resolve().parents[3] / "data" / "real"


def _base_dir(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir).expanduser().absolute() if data_dir else real_data_dir()


def _names(value) -> list[str] | None:
    """A comma-separated string or a list as a list of names; None stays None (the default applies)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return [str(v) for v in value]


def _is_prepared(folder: Path) -> bool:
    return (folder / "datalist.json").is_file() and (folder / "manifest.csv").is_file()


def _source_dirs(data_dir: str | os.PathLike | None, sources) -> list[tuple[str, Path]]:
    base = _base_dir(data_dir)
    names = _names(sources) or list(SOURCES)
    found = []
    for name in names:
        folder = base / name
        if not _is_prepared(folder):
            command = _PREPARE_COMMAND.get(name, f"prepare_{name} <source_dir>")
            raise FileNotFoundError(
                f"'{folder}' has no datalist.json and manifest.csv: the real data lives in data/real of a clone of "
                "the repository (or set MEDAD_REAL_DATA_DIR); rebuild it with "
                f"`python -m medad_monai {command} {folder}`."
            )
        found.append((name, folder))
    return found


def _test_set_dirs(data_dir: str | os.PathLike | None, test_sets) -> list[tuple[str, Path]]:
    """The derived test sets asked for; by default (None) every one of :data:`DERIVED_TEST_SETS` that is present."""
    names = _names(test_sets)
    if names is None:
        return [(n, _base_dir(data_dir) / n) for n in DERIVED_TEST_SETS if _is_prepared(_base_dir(data_dir) / n)]
    unknown = [n for n in names if n not in DERIVED_TEST_SETS]
    if unknown:
        raise ValueError(f"Unknown derived test set(s) {unknown}; known: {sorted(DERIVED_TEST_SETS)}.")
    return _source_dirs(data_dir, names) if names else []


def _manifest_files(row: dict[str, str]) -> list[tuple[str, str]]:
    """``(file, sha256)`` of every file a manifest row names: the image and, where the row has one, its mask."""
    files = [(row["file"], row["sha256"])]
    if row.get("mask"):
        files.append((row["mask"], row.get("mask_sha256", "")))
    return files


def verify_real_data(data_dir: str | os.PathLike | None = None, sources=None) -> dict[str, Any]:
    """Checks every file named in each ``manifest.csv`` (images, and masks where a row names one) exists with the
    recorded sha256; returns counts and bytes per folder. Raises ``ValueError`` listing the first mismatches.

    Args:
        data_dir: the ``data/real`` folder (default: the repository's, or ``$MEDAD_REAL_DATA_DIR``).
        sources: folder names (comma-separated or a list); default all :data:`SOURCES` and the derived test sets
            (:data:`DERIVED_TEST_SETS`) that are present.
    """
    report: dict[str, Any] = {}
    problems: list[str] = []
    folders = _source_dirs(data_dir, sources)
    if _names(sources) is None:
        folders += _test_set_dirs(data_dir, None)
    for name, folder in folders:
        rows = read_manifest(folder / "manifest.csv")
        n_bytes = 0
        for row in rows:
            for rel, digest in _manifest_files(row):
                path = folder / rel
                if not path.is_file():
                    problems.append(f"{name}: missing {rel}")
                    continue
                n_bytes += path.stat().st_size
                if sha256_file(path) != digest:
                    problems.append(f"{name}: sha256 of {rel} differs from manifest.csv")
        report[name] = {"images": len(rows), "bytes": n_bytes}
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in the real data:\n  " + "\n  ".join(problems[:10]))
    return report


def _inside(path: Path, root: Path) -> bool:
    path, root = os.path.normpath(str(path)), os.path.normpath(str(root))
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # other drive
        return False


def _place(name: str, folder: Path, out_dir: Path, files: str) -> Path:
    """Where the source's files are for a datalist in ``out_dir``: ``folder`` itself when it lies inside
    ``out_dir`` or ``files == "reference"``, else a copy (``"copy"``) or a symbolic link (``"link"``) at
    ``out_dir/<name>``."""
    if files == "reference" or _inside(folder, out_dir):
        return folder
    target = out_dir / name
    if files == "link":
        if target.is_symlink() or target.exists():
            if not (target.is_symlink() and target.resolve() == folder.resolve()):
                raise FileExistsError(f"'{target}' exists and is not a link to '{folder}'.")
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            target.symlink_to(folder, target_is_directory=True)
        return target
    rows = read_manifest(folder / "manifest.csv")
    listed = [rel for r in rows for rel, _ in _manifest_files(r)]
    for rel in listed + ["manifest.csv", "datalist.json", "README.md", "LICENSE.txt"]:
        src, dst = folder / rel, target / rel
        if not src.is_file():
            continue
        if dst.is_file() and dst.stat().st_size == src.stat().st_size and sha256_file(dst) == sha256_file(src):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return target


def _rebase(items: list, folder: Path, out_dir: Path) -> list[dict[str, Any]]:
    rebased = []
    for item in items:
        item = {"image": item} if isinstance(item, str) else dict(item)
        for key in ("image", "mask"):
            if isinstance(item.get(key), str):
                item[key] = rel_posix(folder / item[key], out_dir)
        rebased.append(item)
    return rebased


def _derived_section(name: str, section: str) -> str:
    """The combined datalist's name of a derived test set's section: ``test`` -> ``test_lesions``,
    ``test_x`` -> ``test_lesions_x``."""
    prefix = DERIVED_TEST_SETS[name]
    if section == "test":
        return prefix
    if section.startswith("test_"):
        return f"{prefix}_{section[len('test_'):]}"
    raise ValueError(
        f"The derived test set '{name}' has a section {section!r}; derived sets hold test sections only "
        "(test, test_<x>). Rebuild it with its prepare command."
    )


def real_benchmark_datalist(
    output: str | None = None,
    sources: str | list[str] | None = None,
    data_dir: str | None = None,
    files: str = "copy",
    verify: bool = True,
    test_sets: str | list[str] | None = None,
    test_section: str = "test",
) -> dict[str, Any]:
    """Writes one datalist for the committed real data (all of :data:`SOURCES`, or ``--sources a,b``, plus the
    derived test sets of :data:`DERIVED_TEST_SETS` as extra test sections).

    The bundles refuse images outside the dataset folder (unless ``--allow_outside_dataset_dir True``), so the
    images must lie under the datalist's folder: by default the datalist is written to ``data/real/datalist.json``
    (use ``--dataset_dir data/real``); for an ``output`` elsewhere each source folder is copied there (``files``
    ``"copy"``, about 30 MB), linked (``"link"``, a symbolic link per source) or referenced where it is
    (``"reference"``: paths with ``..``, which then needs ``--allow_outside_dataset_dir True``).

    Args:
        output: a folder (the file is ``<output>/datalist.json``, so ``--dataset_dir <output>`` of the demo and the
            bundles finds it) or a ``.json`` file path; default ``data/real/datalist.json``.
        sources: source names under ``data/real`` (default: all).
        data_dir: the ``data/real`` folder (default: the repository's, or ``$MEDAD_REAL_DATA_DIR``).
        files: ``"copy"``, ``"link"`` or ``"reference"`` for an output outside ``data_dir`` (see above).
        verify: check every file against its manifest sha256 first (and the copies after copying).
        test_sets: derived test sets to add (names of :data:`DERIVED_TEST_SETS`, comma-separated or a list); default
            every one present under ``data_dir``; ``""`` for none. ``kermany_lesions`` adds ``test_lesions``.
        test_section: the section that the bundles' and the demo's default ``test`` key evaluates: ``"test"`` (the
            sources' own test sets) or another section of the combined datalist, e.g. ``"test_lesions"``, which is
            then copied to ``test`` (the sources' test set stays available under its other names, e.g.
            ``test_pneumonia``).

    Returns:
        the datalist dict: every list section of the sources' datalists, concatenated in source order, then the
        derived test sets' sections, with image and mask paths relative to the output file's folder.

    Raises:
        FileNotFoundError: a source or an asked-for derived test set is missing (the message names its rebuild
            command).
        ValueError: a file differs from its manifest, an unknown ``files`` mode, derived test set or
            ``test_section``.
    """
    if files not in ("copy", "link", "reference"):
        raise ValueError(f"files must be 'copy', 'link' or 'reference', got {files!r}.")
    found = _source_dirs(data_dir, sources)
    derived = _test_set_dirs(data_dir, test_sets)
    base = found[0][1].parent
    out_file = Path(output).expanduser() if output else base / "datalist.json"
    if out_file.suffix.lower() != ".json":
        out_file = out_file / "datalist.json"
    out_file = out_file.absolute()
    everything = found + derived
    if verify:
        verify_real_data(data_dir, [n for n, _ in everything])
    placed = [(name, _place(name, folder, out_file.parent, files)) for name, folder in everything]
    if verify and files == "copy":
        copies = [(n, p) for (n, p), (_, f) in zip(placed, everything) if p != f]
        for name, path in copies:
            verify_real_data(path.parent, [name])
    merged: dict[str, Any] = {
        "description": "Real chest radiographs committed in medad-monai data/real: "
        + ", ".join(n for n, _ in found)
        + (f"; derived test sets: {', '.join(n for n, _ in derived)}" if derived else "")
        + " (licences and citations in each folder's README.md / LICENSE.txt and docs/data_sources.md).",
        "sources": {},
    }
    for name, folder in placed:
        with open(folder / "datalist.json", encoding="utf-8") as f:
            content = json.load(f)
        merged["sources"][name] = {
            k: content[k] for k in ("license", "citation", "origin", "generated_by") if isinstance(content.get(k), str)
        }
        for section, items in content.items():
            if not isinstance(items, list):
                continue
            target = _derived_section(name, section) if name in DERIVED_TEST_SETS else section
            merged.setdefault(target, []).extend(_rebase(items, folder, out_file.parent))
    if test_section != "test":
        if test_section not in merged or not isinstance(merged[test_section], list):
            have = sorted(k for k, v in merged.items() if isinstance(v, list) and k.startswith("test"))
            raise ValueError(f"test_section {test_section!r} is not a section of the combined datalist; it has {have}.")
        merged["test"] = [dict(item) for item in merged[test_section]]
        merged["description"] += f" Section 'test' is a copy of '{test_section}'."
    write_datalist(merged, out_file)
    counts = {k: len(v) for k, v in merged.items() if isinstance(v, list)}
    outside = files == "reference" and not all(_inside(f, out_file.parent) for _, f in placed)
    note = " (and --allow_outside_dataset_dir True for the bundles)" if outside else ""
    print(
        f"real_benchmark_datalist: {out_file}\n  sections: {json.dumps(counts)}\n  use: python -m medad_monai demo "
        f"--dataset_dir {out_file.parent}{note}",
        flush=True,
    )
    return merged
