"""Hyper-Kvasir colonoscopy frames (Borgli et al. 2020, Simula / Vestre Viken, Norway) turned into a small colour
anomaly-detection task: healthy lower-GI ``training`` / ``validation`` frames and a labelled ``test`` set of healthy
frames and polyp frames with pixel masks (the 1,000 "segmented images" of Hyper-Kvasir, the Kvasir-SEG set).

Source layout (the OSF download https://osf.io/mh9sj: ``hyper-kvasir-labeled-images.zip`` and
``hyper-kvasir-segmented-images.zip`` unpacked side by side)::

    <source_dir>/                          # or <source_dir>/hyper-kvasir/
        labeled-images/lower-gi-tract/anatomical-landmarks/{cecum,ileum,retroflex-rectum}/<uuid>.jpg
        labeled-images/lower-gi-tract/quality-of-mucosal-views/{bbps-0-1,bbps-2-3,impacted-stool}/<uuid>.jpg
        labeled-images/lower-gi-tract/pathological-findings/{polyps,ulcerative-colitis-grade-1,...}/<uuid>.jpg
        labeled-images/upper-gi-tract/...  (not used by default)
        segmented-images/images/<name>.jpg  segmented-images/masks/<name>.jpg  (same file name, white = polyp)

The class of a labelled image is its leaf folder name; ``normal_classes`` picks the healthy ones (default: the
colonoscopy normal findings ``cecum``, ``ileum`` and ``bbps-2-3``, i.e. anatomical landmarks and well-prepared
mucosa). Abnormal test frames are polyp frames of ``segmented-images`` with their mask.

No patient or video id: the labelled images of Hyper-Kvasir carry none, so splits cannot be patient-disjoint.
Frames of one examination can be near-identical; as a cheap guard every candidate frame gets a difference hash
(``hash_size`` x ``hash_size`` bits of the grey thumbnail) and frames whose hashes differ in at most
``max_hash_distance`` bits are linked into one group (connected components), which plays the part of a patient: one
frame per group, and sections are group-disjoint (normal and polyp frames are hashed together). This removes exact
and near-exact repeats, not every frame of the same examination.

Splits (our choices), drawn with ``numpy.random.default_rng(seed)`` in a fixed order, one frame per group:

- ``test``: ``n_test_abnormal`` polyp groups (from ``segmented-images``), then ``n_test_normal`` healthy groups;
- ``validation`` then ``training``: further healthy groups.

Output (``<out_dir>``): ``images/<source sub-path>.png`` (8-bit RGB PNG, longest side <= ``max_size``),
``masks/<name>.png`` (8-bit grey PNG, 0 or 255, same size as its image), ``manifest.csv``, ``datalist.json``
(paths relative to ``<out_dir>``; test items carry ``label`` and ``lesion``: ``none`` or ``polyp``, polyp items a
``mask``), ``README.md`` and ``LICENSE.txt``. Train with ``--channels 3``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..datalist import write_datalist
from ._common import (
    check_patient_disjoint,
    downsample,
    prepare_out_dir,
    to_rgb8,
    write_manifest,
    write_png_gray8,
    write_png_rgb8,
)

__all__ = ["prepare_hyperkvasir", "scan_hyperkvasir", "find_hyperkvasir_root", "HYPERKVASIR", "NORMAL_CLASSES"]

HYPERKVASIR: dict[str, str] = {
    "name": "hyperkvasir",
    "title": "HyperKvasir, a comprehensive multi-class image and video dataset for gastrointestinal endoscopy "
    "(Borgli et al. 2020)",
    "license": "CC BY 4.0",
    "license_url": "https://creativecommons.org/licenses/by/4.0/",
    "terms_note": (
        "The dataset's repository (github.com/simula/hyper-kvasir) carries the CC BY 4.0 licence text (LICENSE.md) "
        "and its README adds: 'The data is released fully open for research and educational purposes. The use of "
        "the dataset for purposes such as competitions and commercial purposes needs prior written permission.'"
    ),
    "citation": (
        "Borgli H., Thambawita V., Smedsrud P. H., Hicks S., Jha D., Eskeland S. L., Randel K. R., Pogorelov K., "
        "Lux M., Nguyen D. T. D., Johansen D., Griwodz C., Stensland H. K., Garcia-Ceja E., Schmidt P. T., "
        "Hammer H. L., Riegler M. A., Halvorsen P., de Lange T. (2020). HyperKvasir, a comprehensive multi-class "
        "image and video dataset for gastrointestinal endoscopy. Scientific Data 7:283. "
        "https://doi.org/10.1038/s41597-020-00622-y"
    ),
}

#: default healthy classes (leaf folder names of ``labeled-images``): colonoscopy normal findings.
NORMAL_CLASSES: tuple[str, ...] = ("cecum", "ileum", "bbps-2-3")

MANIFEST_FIELDS = (
    "file",
    "mask",
    "source_file",
    "group_id",
    "label",
    "finding",
    "section",
    "width",
    "height",
    "license",
    "sha256",
    "mask_sha256",
)

_IMAGE_EXT = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class HyperKvasirImage:
    source_file: str  # relative to the layout root, forward slashes
    finding: str  # the class folder name for a labelled image; "polyp" for a segmented image
    mask_file: str = ""  # relative to the layout root; segmented images only


def find_hyperkvasir_root(source_dir: str | Path) -> Path:
    """The folder holding ``labeled-images/`` (and ``segmented-images/``), looked for at ``source_dir`` and
    ``source_dir/hyper-kvasir``."""
    base = Path(source_dir).expanduser()
    for cand in (base, base / "hyper-kvasir"):
        if (cand / "labeled-images").is_dir():
            return cand
    raise FileNotFoundError(
        f"No Hyper-Kvasir layout under '{source_dir}': expected labeled-images/ (and segmented-images/) there or "
        "under hyper-kvasir/."
    )


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(_IMAGE_EXT)


def scan_hyperkvasir(
    root: str | Path, normal_classes: Sequence[str] = NORMAL_CLASSES
) -> tuple[list[HyperKvasirImage], list[HyperKvasirImage], list[str]]:
    """Healthy images (``normal_classes`` under ``labeled-images``), segmented polyp images that have a mask, and the
    files left out of those folders (hidden files, other extensions, images without mask); all sorted."""
    root = Path(root)
    wanted = {c.lower() for c in normal_classes}
    normals: list[HyperKvasirImage] = []
    skipped: list[str] = []
    for folder in sorted(p for p in (root / "labeled-images").rglob("*") if p.is_dir()):
        if folder.name.lower() not in wanted:
            continue
        for path in sorted(folder.iterdir()):
            rel = path.relative_to(root).as_posix()
            if path.is_dir():
                continue
            if not _is_image(path):
                skipped.append(rel)
                continue
            normals.append(HyperKvasirImage(rel, folder.name.lower()))
    polyps: list[HyperKvasirImage] = []
    img_dir, mask_dir = root / "segmented-images" / "images", root / "segmented-images" / "masks"
    if img_dir.is_dir():
        masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if _is_image(p)} if mask_dir.is_dir() else {}
        for path in sorted(img_dir.iterdir()):
            rel = path.relative_to(root).as_posix()
            if not _is_image(path) or path.stem not in masks:
                skipped.append(rel)
                continue
            polyps.append(HyperKvasirImage(rel, "polyp", masks[path.stem].relative_to(root).as_posix()))
    return sorted(normals, key=lambda i: i.source_file), polyps, skipped


def _dhash(path: Path, hash_size: int) -> np.ndarray:
    """Difference hash: the grey image shrunk to ``(hash_size + 1) x hash_size`` and compared left to right."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("L", (4 * hash_size, 4 * hash_size))  # JPEG: decode at a reduced scale, much faster
        small = np.asarray(img.convert("L").resize((hash_size + 1, hash_size), Image.BILINEAR), dtype=np.int16)
    return np.packbits(small[:, 1:] > small[:, :-1])


def _near_duplicate_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Connected components of "Hamming distance <= max_distance"; each row's group is its smallest member index."""
    n = len(hashes)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for i in range(n - 1):
        dist = np.unpackbits(np.bitwise_xor(hashes[i + 1 :], hashes[i]), axis=1).sum(axis=1)
        for j in np.nonzero(dist <= max_distance)[0] + i + 1:
            a, b = find(i), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(n)])


def _select(
    normals: list[HyperKvasirImage],
    polyps: list[HyperKvasirImage],
    groups: dict[str, str],
    seed: int,
    counts: dict[str, int],
) -> dict[str, list[HyperKvasirImage]]:
    """``section -> [image]``, one image per near-duplicate group; see the module docstring for the rules."""
    rng = np.random.default_rng(seed)

    def by_group(images: list[HyperKvasirImage]) -> dict[str, list[HyperKvasirImage]]:
        out: dict[str, list[HyperKvasirImage]] = {}
        for im in images:
            out.setdefault(groups[im.source_file], []).append(im)
        return dict(sorted(out.items()))

    polyp_groups = by_group(polyps)
    # a group with a polyp frame is never used as healthy (a near-duplicate of a polyp frame is no normal frame)
    normal_groups = {k: v for k, v in by_group(normals).items() if k not in polyp_groups}

    def pick(group: list[HyperKvasirImage]) -> HyperKvasirImage:
        return group[int(rng.integers(len(group)))]

    out: dict[str, list[HyperKvasirImage]] = {"training": [], "validation": [], "test": []}
    keys = list(polyp_groups)
    if len(keys) < counts["test_abnormal"]:
        raise ValueError(
            f"Only {len(keys)} polyp groups with masks in segmented-images; n_test_abnormal={counts['test_abnormal']}."
        )
    for k in rng.permutation(len(keys))[: counts["test_abnormal"]]:
        out["test"].append(pick(polyp_groups[keys[k]]))
    keys = list(normal_groups)
    need = counts["test_normal"] + counts["validation"] + counts["training"]
    if len(keys) < need:
        raise ValueError(
            f"Only {len(keys)} healthy near-duplicate groups in the normal classes; "
            f"n_test_normal + n_val + n_train = {need}."
        )
    for j, k in enumerate(rng.permutation(len(keys))[:need]):
        if j < counts["test_normal"]:
            section = "test"
        elif j < counts["test_normal"] + counts["validation"]:
            section = "validation"
        else:
            section = "training"
        out[section].append(pick(normal_groups[keys[k]]))
    for section in out:
        out[section].sort(key=lambda i: i.source_file)
    return out


def _readme(
    table: dict[str, dict[str, int]],
    command: str,
    n_candidates: int,
    n_groups: int,
    skipped: int,
    n_bytes: int,
    origin: str,
    normal_classes: Sequence[str],
    max_size: int,
) -> str:
    findings = sorted({f for c in table.values() for f in c})
    head = " | ".join(findings)
    rows = "\n".join(f"| {s} | " + " | ".join(str(c.get(f, 0)) for f in findings) + " |" for s, c in table.items())
    return f"""# Hyper-Kvasir colonoscopy frames (subset, RGB)

{HYPERKVASIR['title']}.

- **Licence**: {HYPERKVASIR['license']} ({HYPERKVASIR['license_url']}). {HYPERKVASIR['terms_note']}
  Changes: `medad_monai` selected the frames, downsampled those larger than {max_size} px (Lanczos) and wrote them as
  8-bit RGB PNG; the polyp masks were downsampled the same way and thresholded at 128 to 0/255.
- **Please cite**: {HYPERKVASIR['citation']}
- **Frames**: routine gastro- and colonoscopies at Baerum Hospital (Vestre Viken Hospital Trust, Norway), labelled
  by endoscopists. Healthy classes used: {', '.join(normal_classes)}. Abnormal: polyp frames of the segmented-images
  part (pixel masks; the Kvasir-SEG images).
- **No patient or video ids**: the labelled images carry none, so the sections are not patient-disjoint; frames
  whose difference hashes are near-identical were grouped and at most one frame per group was used, and no group
  spans two sections. Frames of one examination may still appear in two sections.
- Many frames show a green position thumbnail (ScopeGuide) in the lower-left corner, black borders and text
  overlays; they were kept as published.

Source copy: {origin or "not recorded"}.

Written by `{command}` from {n_candidates} candidate frames in {n_groups} near-duplicate groups ({skipped} other
files left out); {n_bytes / 1e6:.1f} MB of PNGs.

| section | {head} |
|---|{'---|' * len(findings)}
{rows}

Files: `images/` (RGB PNG, source sub-path kept), `masks/` (grey PNG, 255 = polyp), `manifest.csv` (file, mask,
source_file, group_id, label, finding, section, width, height, license, sha256, mask_sha256), `datalist.json` (MONAI
decathlon style, paths relative to this folder). Train and evaluate the bundles with `--channels 3`.
"""


def _license_text(origin: str, max_size: int) -> str:
    return f"""The images and masks in this folder are a downsampled subset of

  {HYPERKVASIR['title']}

licensed under the Creative Commons Attribution 4.0 International licence (CC BY 4.0),
{HYPERKVASIR['license_url']}

Attribution: {HYPERKVASIR['citation']}

Terms stated by the dataset's authors: {HYPERKVASIR['terms_note']}

Changes: frames selected, downsampled to at most {max_size} px on the longest side and written as 8-bit RGB PNG;
masks downsampled likewise and thresholded to 0/255; by medad_monai (python -m medad_monai prepare_hyperkvasir);
changes made before by the copy they were taken from: {origin or "none recorded"}. No endorsement by the licensors
is implied.
"""


def prepare_hyperkvasir(
    source_dir: str,
    out_dir: str,
    seed: int = 0,
    n_train: int = 400,
    n_val: int = 60,
    n_test_normal: int = 60,
    n_test_abnormal: int = 60,
    max_size: int = 128,
    normal_classes: Sequence[str] | str = NORMAL_CLASSES,
    hash_size: int = 8,
    max_hash_distance: int = 4,
    origin: str = "",
) -> dict[str, Any]:
    """Turns a Hyper-Kvasir download (``labeled-images/`` and ``segmented-images/``) into downsampled RGB PNGs,
    polyp masks, ``manifest.csv`` and a seeded, near-duplicate-disjoint ``datalist.json`` in ``out_dir`` (see the
    module docstring for layout and split rules).

    Args:
        source_dir: folder holding ``labeled-images/`` (or ``hyper-kvasir/`` with it).
        out_dir: output folder; new, empty, or written by an earlier run (its ``images/`` and ``masks/`` are
            replaced).
        seed: the one seed of every random choice; the same source and seed give byte-identical outputs.
        n_train, n_val: healthy frames (one per near-duplicate group) for ``training`` and ``validation``.
        n_test_normal, n_test_abnormal: healthy and polyp frames in ``test``.
        max_size: longest side of the written PNGs (never upsampled).
        normal_classes: leaf folder names of ``labeled-images`` taken as healthy (a comma-separated string works
            on the command line).
        hash_size, max_hash_distance: the near-duplicate guard (difference hash of ``hash_size**2`` bits; frames at
            most ``max_hash_distance`` bits apart share a group); ``max_hash_distance=-1`` turns it off.
        origin: where the source copy came from (e.g. a repository and commit), recorded in the datalist and
            README for provenance; not used otherwise.

    Returns:
        the datalist dict that was written.

    Raises:
        FileNotFoundError: no Hyper-Kvasir layout under ``source_dir``.
        ValueError: the source has fewer groups than asked for.
    """
    from PIL import Image

    if isinstance(normal_classes, str):
        normal_classes = [c.strip() for c in normal_classes.split(",") if c.strip()]
    normal_classes = tuple(normal_classes)
    root = find_hyperkvasir_root(source_dir)
    normals, polyps, skipped = scan_hyperkvasir(root, normal_classes)
    counts = {
        "training": int(n_train),
        "validation": int(n_val),
        "test_normal": int(n_test_normal),
        "test_abnormal": int(n_test_abnormal),
    }
    if any(v < 0 for v in counts.values()) or counts["training"] < 1:
        raise ValueError(f"Counts must be >= 0 and n_train >= 1, got {counts}.")

    candidates = normals + polyps
    if int(max_hash_distance) >= 0 and candidates:
        hashes = np.stack([_dhash(root / im.source_file, int(hash_size)) for im in candidates])
        comp = _near_duplicate_groups(hashes, int(max_hash_distance))
        groups = {im.source_file: candidates[int(c)].source_file for im, c in zip(candidates, comp)}
    else:
        groups = {im.source_file: im.source_file for im in candidates}
    selected = _select(normals, polyps, groups, int(seed), counts)
    check_patient_disjoint({s: [groups[i.source_file] for i in items] for s, items in selected.items()})

    out = prepare_out_dir(out_dir, owned=("images", "masks"))
    rows: list[dict[str, Any]] = []
    sections: dict[str, list[dict[str, Any]]] = {}
    n_bytes = 0
    for section, items in selected.items():
        sections[section] = []
        for im in items:
            with Image.open(root / im.source_file) as img:
                arr = downsample(to_rgb8(img), int(max_size))
            rel = "images/" + im.source_file.rsplit(".", 1)[0] + ".png"
            digest = write_png_rgb8(out / rel, arr)
            n_bytes += (out / rel).stat().st_size
            rel_mask = mask_digest = ""
            if im.mask_file:
                with Image.open(root / im.mask_file) as m:
                    grey = np.asarray(m.convert("L"), dtype=np.uint8)
                if grey.shape != arr.shape[:2]:
                    grey = np.asarray(
                        Image.fromarray(grey, mode="L").resize((arr.shape[1], arr.shape[0]), Image.LANCZOS),
                        dtype=np.uint8,
                    )
                mask = np.where(grey >= 128, 255, 0).astype(np.uint8)
                rel_mask = "masks/" + Path(im.mask_file).stem + ".png"
                mask_digest = write_png_gray8(out / rel_mask, mask)
                n_bytes += (out / rel_mask).stat().st_size
            label = 0 if im.finding != "polyp" else 1
            rows.append(
                {
                    "file": rel,
                    "mask": rel_mask,
                    "source_file": im.source_file,
                    "group_id": groups[im.source_file],
                    "label": label,
                    "finding": im.finding,
                    "section": section,
                    "width": arr.shape[1],
                    "height": arr.shape[0],
                    "license": HYPERKVASIR["license"],
                    "sha256": digest,
                    "mask_sha256": mask_digest,
                }
            )
            item: dict[str, Any] = {"image": rel}
            if section == "test":
                item.update(label=label, lesion="polyp" if label else "none")
                if rel_mask:
                    item["mask"] = rel_mask
            sections[section].append(item)
    write_manifest(out / "manifest.csv", rows, MANIFEST_FIELDS)

    command = (
        f"python -m medad_monai prepare_hyperkvasir <source_dir> <out_dir> --seed {int(seed)} "
        f"--n_train {counts['training']} --n_val {counts['validation']} --n_test_normal {counts['test_normal']} "
        f"--n_test_abnormal {counts['test_abnormal']} --max_size {int(max_size)} "
        f"--normal_classes {','.join(normal_classes)} --hash_size {int(hash_size)} "
        f"--max_hash_distance {int(max_hash_distance)}"
    )
    if origin:
        command += f' --origin "{origin}"'
    datalist: dict[str, Any] = {
        "description": f"{HYPERKVASIR['title']}; healthy colonoscopy frames ({', '.join(normal_classes)}) for "
        "training/validation, labelled test (healthy frames and polyp frames with masks); RGB, use --channels 3; "
        "one frame per near-duplicate group, group-disjoint sections (no patient ids in the source).",
        "source": HYPERKVASIR["name"],
        "license": HYPERKVASIR["license"],
        "citation": HYPERKVASIR["citation"],
        "channels": 3,
        "generated_by": command,
        "origin": str(origin),
        "training": sections["training"],
        "validation": sections["validation"],
        "test": sections["test"],
    }
    write_datalist(datalist, out / "datalist.json")

    table: dict[str, dict[str, int]] = {}
    for r in rows:
        table.setdefault(r["section"], {}).setdefault(r["finding"], 0)
        table[r["section"]][r["finding"]] += 1
    n_groups = len(set(groups.values()))
    (out / "README.md").write_text(
        _readme(
            table, command, len(candidates), n_groups, len(skipped), n_bytes, str(origin), normal_classes,
            int(max_size),
        ),
        encoding="utf-8",
    )
    (out / "LICENSE.txt").write_text(_license_text(str(origin), int(max_size)), encoding="utf-8")
    print(
        f"prepare_hyperkvasir: {len(rows)} images ({n_bytes / 1e6:.1f} MB) from {len(candidates)} candidates in "
        f"{n_groups} near-duplicate groups under '{root}' ({len(skipped)} other files left out) -> {out}\n  "
        + json.dumps(table),
        flush=True,
    )
    return datalist
