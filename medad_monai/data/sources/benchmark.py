"""The real-image development benchmark committed in ``data/real``: where it is, a check of its files against the
manifests, and one datalist for all of it that the demo and the bundles take.

::

    python -m medad_monai real_benchmark_datalist                # -> data/real/datalist.json
    python -m medad_monai demo --dataset_dir data/real --max_epochs 1
    python -m monai.bundle run --config_file bundles/morphaeus/configs/train.json --dataset_dir data/real
    python -m medad_monai real_benchmark_datalist /tmp/real      # copies the images -> /tmp/real/datalist.json
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..datalist import write_datalist
from ._common import read_manifest, rel_posix, sha256_file

__all__ = ["SOURCES", "real_data_dir", "verify_real_data", "real_benchmark_datalist"]

#: the sources committed under ``data/real/<name>`` (each written by ``python -m medad_monai prepare_<name>``).
SOURCES: tuple[str, ...] = ("kermany",)

#: total size the committed real data may reach (bytes).
MAX_TOTAL_BYTES = 50 * 1024 * 1024


def real_data_dir() -> Path:
    """``data/real`` of the repository (``$MEDAD_REAL_DATA_DIR`` overrides it); the data is not part of the wheel,
    so this needs a clone of the repository (``pip install -e .``)."""
    env = os.environ.get("MEDAD_REAL_DATA_DIR")
    if env:
        return Path(env).expanduser().absolute()
    return Path(__file__).resolve().parents[3] / "data" / "real"


def _source_dirs(data_dir: str | os.PathLike | None, sources) -> list[tuple[str, Path]]:
    base = Path(data_dir).expanduser().absolute() if data_dir else real_data_dir()
    if isinstance(sources, str):
        sources = [s.strip() for s in sources.split(",") if s.strip()]
    names = list(sources) if sources else list(SOURCES)
    found = []
    for name in names:
        folder = base / name
        if not (folder / "datalist.json").is_file() or not (folder / "manifest.csv").is_file():
            raise FileNotFoundError(
                f"'{folder}' has no datalist.json and manifest.csv: the real data lives in data/real of a clone of "
                "the repository (or set MEDAD_REAL_DATA_DIR); rebuild a source with "
                f"`python -m medad_monai prepare_{name} <source_dir> {folder}`."
            )
        found.append((name, folder))
    return found


def verify_real_data(data_dir: str | os.PathLike | None = None, sources=None) -> dict[str, Any]:
    """Checks every file named in each source's ``manifest.csv`` exists with the recorded sha256; returns counts
    and bytes per source. Raises ``ValueError`` listing the first mismatches."""
    report: dict[str, Any] = {}
    problems: list[str] = []
    for name, folder in _source_dirs(data_dir, sources):
        rows = read_manifest(folder / "manifest.csv")
        n_bytes = 0
        for row in rows:
            path = folder / row["file"]
            if not path.is_file():
                problems.append(f"{name}: missing {row['file']}")
                continue
            n_bytes += path.stat().st_size
            if sha256_file(path) != row["sha256"]:
                problems.append(f"{name}: sha256 of {row['file']} differs from manifest.csv")
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
    for rel in [r["file"] for r in rows] + ["manifest.csv", "datalist.json", "README.md", "LICENSE.txt"]:
        src, dst = folder / rel, target / rel
        if not src.is_file():
            continue
        if dst.is_file() and dst.stat().st_size == src.stat().st_size and sha256_file(dst) == sha256_file(src):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return target


def real_benchmark_datalist(
    output: str | None = None,
    sources: str | list[str] | None = None,
    data_dir: str | None = None,
    files: str = "copy",
    verify: bool = True,
) -> dict[str, Any]:
    """Writes one datalist for the committed real data (all of :data:`SOURCES`, or ``--sources a,b``).

    The bundles refuse images outside the dataset folder (unless ``--allow_outside_dataset_dir True``), so the
    images must lie under the datalist's folder: by default the datalist is written to ``data/real/datalist.json``
    (use ``--dataset_dir data/real``); for an ``output`` elsewhere each source folder is copied there (``files``
    ``"copy"``, about 25 MB), linked (``"link"``, a symbolic link per source) or referenced where it is
    (``"reference"``: paths with ``..``, which then needs ``--allow_outside_dataset_dir True``).

    Args:
        output: a folder (the file is ``<output>/datalist.json``, so ``--dataset_dir <output>`` of the demo and the
            bundles finds it) or a ``.json`` file path; default ``data/real/datalist.json``.
        sources: source names under ``data/real`` (default: all).
        data_dir: the ``data/real`` folder (default: the repository's, or ``$MEDAD_REAL_DATA_DIR``).
        files: ``"copy"``, ``"link"`` or ``"reference"`` for an output outside ``data_dir`` (see above).
        verify: check every file against its manifest sha256 first (and the copies after copying).

    Returns:
        the datalist dict: every list section of the sources' datalists, concatenated in source order, with image
        paths relative to the output file's folder.
    """
    if files not in ("copy", "link", "reference"):
        raise ValueError(f"files must be 'copy', 'link' or 'reference', got {files!r}.")
    found = _source_dirs(data_dir, sources)
    base = found[0][1].parent
    out_file = Path(output).expanduser() if output else base / "datalist.json"
    if out_file.suffix.lower() != ".json":
        out_file = out_file / "datalist.json"
    out_file = out_file.absolute()
    if verify:
        verify_real_data(data_dir, [n for n, _ in found])
    placed = [(name, _place(name, folder, out_file.parent, files)) for name, folder in found]
    if verify and files == "copy":
        copies = [(n, p) for (n, p), (_, f) in zip(placed, found) if p != f]
        for name, path in copies:
            verify_real_data(path.parent, [name])
    merged: dict[str, Any] = {
        "description": "Real chest radiographs committed in medad-monai data/real: "
        + ", ".join(n for n, _ in found)
        + " (licences and citations in each source's README.md / LICENSE.txt and docs/data_sources.md).",
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
            rebased = []
            for item in items:
                item = {"image": item} if isinstance(item, str) else dict(item)
                for key in ("image", "mask"):
                    if isinstance(item.get(key), str):
                        item[key] = rel_posix(folder / item[key], out_file.parent)
                rebased.append(item)
            merged.setdefault(section, []).extend(rebased)
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
