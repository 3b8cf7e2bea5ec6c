"""Kermany et al.'s paediatric chest radiographs (Guangzhou Women and Children's Medical Center; CC BY 4.0) turned
into a small, patient-disjoint anomaly-detection benchmark: healthy ``training`` / ``validation`` images and a
labelled ``test`` set of healthy, bacterial-pneumonia and viral-pneumonia images, and a labelled ``development`` set
of the same kinds for choosing settings without the test set.

Source layout (the Kaggle "Chest X-Ray Images (Pneumonia)" / Mendeley ``chest_xray`` folder, and repositories that
keep it)::

    <source_dir>/                     # or <source_dir>/chest_xray/ or <source_dir>/chest_xray/chest_xray/
        train/NORMAL/IM-0115-0001.jpeg, NORMAL2-IM-0372-0001.jpeg, IM-0011-0001-0002.jpeg, ...
        train/PNEUMONIA/person1_bacteria_1.jpeg, person1_virus_6.jpeg, person447_virus_921_1.jpeg, ...
        val/...   (optional)          test/NORMAL/..., test/PNEUMONIA/...

Patient keys (our reading of the file names; the dataset documents no other patient id): ``IM-0115`` /
``NORMAL2-IM-0372`` for healthy images (everything before the image counter), ``person1`` for pneumonia images.
The same ``personN`` appears with both ``bacteria`` and ``virus`` files (808 numbers in the training folder), which
suggests the two kinds are numbered separately; we still treat one number as one patient, the conservative choice
for disjoint splits. Healthy and pneumonia keys cannot be linked to each other.

Splits (our choices), drawn with ``numpy.random.default_rng(seed)`` in a fixed order, one image per patient:

- ``test``: ``n_test_normal`` healthy patients from the source's ``test/NORMAL`` and ``n_test_bacterial`` /
  ``n_test_viral`` pneumonia patients from ``test/PNEUMONIA`` (the source's test set, whose labels a third expert
  checked); a patient is bacterial if it has a ``bacteria`` file and the bacterial quota is open, else viral.
- ``validation`` then ``training``: healthy patients from ``train/`` and ``val/`` ``NORMAL`` whose key never occurs
  in the source's test folder.
- ``development`` (drawn after all of the above, so adding it changed none of them): the next ``n_dev_normal``
  healthy and ``n_dev_pneumonia`` pneumonia patients of the source's test folder in the permutations that drew
  ``test`` (patients ``test`` did not take), one image each, labelled like ``test``. From the test folder because
  the source's train and test folders differ (on a development set from ``train/`` the baselines and most models
  scored far from their test figures, e.g. the mean-image baseline 0.75 against 0.55; docs/data_sources.md); no
  model trains or calibrates on it. It is where recipes, scores and budgets are compared (e.g.
  ``python -m medad_monai map_recipe_study --development real``), so that the test set is evaluated once, afterwards.
- extra sections ``test_pneumonia`` (= ``test``), ``test_bacterial`` and ``test_viral`` (the healthy test images
  plus one pneumonia kind), for ``python -m medad_monai evaluate_tasks --tasks test_bacterial,test_viral``.

Output (``<out_dir>``): ``images/<source sub-path>.png`` (8-bit grey PNG, longest side <= ``max_size``),
``manifest.csv``, ``datalist.json`` (paths relative to ``<out_dir>``; test items carry ``label`` and ``lesion``:
``none``, ``bacterial`` or ``viral``), ``README.md`` and ``LICENSE.txt``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..datalist import write_datalist
from ._common import (
    MAX_SIZE,
    check_patient_disjoint,
    downsample,
    prepare_out_dir,
    to_gray8,
    write_manifest,
    write_png_gray8,
)

__all__ = ["prepare_kermany", "scan_kermany", "find_kermany_root", "KERMANY"]

KERMANY: dict[str, str] = {
    "name": "kermany",
    "title": "Chest X-Ray Images (Pneumonia), Kermany et al. 2018 (paediatric, Guangzhou)",
    "license": "CC BY 4.0",
    "license_url": "https://creativecommons.org/licenses/by/4.0/",
    "citation": (
        "Kermany D., Zhang K., Goldbaum M. (2018). Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images "
        "for Classification. Mendeley Data, v2. https://doi.org/10.17632/rscbjbr9sj.2 ; Kermany D. S. et al. (2018). "
        "Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning. Cell 172(5):1122-1131. "
        "https://doi.org/10.1016/j.cell.2018.02.010"
    ),
}

MANIFEST_FIELDS = (
    "file",
    "source_file",
    "patient_id",
    "label",
    "finding",
    "section",
    "width",
    "height",
    "license",
    "sha256",
)

_SPLITS = ("train", "val", "test")
_CLASSES = ("NORMAL", "PNEUMONIA")
_IMAGE_EXT = (".jpeg", ".jpg", ".png")
_NORMAL_RE = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+(?:-\d+)*\.(?:jpe?g|png)$", re.IGNORECASE)
_PNEUMONIA_RE = re.compile(r"^(person\d+)_(bacteria|virus)_\d+(?:_\d+)?\.(?:jpe?g|png)$", re.IGNORECASE)
_KIND = {"bacteria": "bacterial", "virus": "viral"}


@dataclass(frozen=True)
class KermanyImage:
    source_file: str  # relative to the layout root, forward slashes
    split: str  # train / val / test (source folder)
    patient_id: str
    finding: str  # normal / bacterial / viral


def find_kermany_root(source_dir: str | Path) -> Path:
    """The folder holding ``train/``/``test/`` with ``NORMAL``/``PNEUMONIA`` inside, looked for at ``source_dir``,
    ``source_dir/chest_xray`` and ``source_dir/chest_xray/chest_xray`` (the Kaggle zip nests it twice)."""
    base = Path(source_dir).expanduser()
    for cand in (base, base / "chest_xray", base / "chest_xray" / "chest_xray"):
        if any((cand / s / c).is_dir() for s in _SPLITS for c in _CLASSES):
            return cand
    raise FileNotFoundError(
        f"No Kermany layout under '{source_dir}': expected train/ and test/ folders with NORMAL/ and PNEUMONIA/ "
        "inside (directly or under chest_xray/)."
    )


def scan_kermany(root: str | Path) -> tuple[list[KermanyImage], list[str]]:
    """All images of the layout (sorted) and the files left out (hidden files, other extensions, unknown names)."""
    root = Path(root)
    images: list[KermanyImage] = []
    skipped: list[str] = []
    for split in _SPLITS:
        for cls in _CLASSES:
            folder = root / split / cls
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                rel = f"{split}/{cls}/{path.name}"
                if not path.is_file() or path.name.startswith(".") or not path.name.lower().endswith(_IMAGE_EXT):
                    skipped.append(rel)
                    continue
                if cls == "NORMAL":
                    m = _NORMAL_RE.match(path.name)
                    finding = "normal"
                else:
                    m = _PNEUMONIA_RE.match(path.name)
                    finding = _KIND[m.group(2).lower()] if m else ""
                if not m:
                    skipped.append(rel)
                    continue
                images.append(KermanyImage(rel, split, m.group(1), finding))
    return images, skipped


def _by_patient(images: list[KermanyImage]) -> dict[str, list[KermanyImage]]:
    groups: dict[str, list[KermanyImage]] = defaultdict(list)
    for im in images:
        groups[im.patient_id].append(im)
    return {k: sorted(v, key=lambda i: i.source_file) for k, v in sorted(groups.items())}


def _select(images: list[KermanyImage], seed: int, counts: dict[str, int]) -> dict[str, list[tuple[KermanyImage, str]]]:
    """``section -> [(image, finding)]``; see the module docstring for the rules."""
    rng = np.random.default_rng(seed)
    test_normal = _by_patient([i for i in images if i.split == "test" and i.finding == "normal"])
    test_pneu = _by_patient([i for i in images if i.split == "test" and i.finding != "normal"])
    test_keys = {i.patient_id for i in images if i.split == "test"}
    trainval = _by_patient(
        [i for i in images if i.split != "test" and i.finding == "normal" and i.patient_id not in test_keys]
    )

    def pick(group: list[KermanyImage]) -> KermanyImage:
        return group[int(rng.integers(len(group)))]

    out: dict[str, list[tuple[KermanyImage, str]]] = {"training": [], "validation": [], "test": [], "development": []}
    keys = list(test_normal)
    if len(keys) < counts["test_normal"]:
        raise ValueError(f"Only {len(keys)} healthy patients in test/NORMAL; n_test_normal={counts['test_normal']}.")
    normal_order = rng.permutation(len(keys))
    for k in normal_order[: counts["test_normal"]]:
        out["test"].append((pick(test_normal[keys[k]]), "normal"))
    normal_left = [keys[k] for k in normal_order[counts["test_normal"]:]]

    keys = list(test_pneu)
    quota = {"bacterial": counts["test_bacterial"], "viral": counts["test_viral"]}
    pneumonia_left = []  # test-folder pneumonia patients not drawn, in the permutation's order
    for k in rng.permutation(len(keys)):
        group = test_pneu[keys[k]]
        for kind in ("bacterial", "viral"):
            of_kind = [i for i in group if i.finding == kind]
            if of_kind and quota[kind] > 0:
                out["test"].append((pick(of_kind), kind))
                quota[kind] -= 1
                break
        else:
            pneumonia_left.append(keys[k])
    if any(quota.values()):
        have = {kind: sum(any(i.finding == kind for i in g) for g in test_pneu.values()) for kind in quota}
        raise ValueError(
            f"Not enough pneumonia patients in test/PNEUMONIA for n_test_bacterial={counts['test_bacterial']}, "
            f"n_test_viral={counts['test_viral']} (patients with bacterial / viral files: {have})."
        )

    keys = list(trainval)
    need = counts["validation"] + counts["training"]
    if len(keys) < need:
        raise ValueError(
            f"Only {len(keys)} healthy patients in train/ and val/ NORMAL (outside the test patients); "
            f"n_val + n_train = {need}."
        )
    order = rng.permutation(len(keys))
    for j, k in enumerate(order[:need]):
        section = "validation" if j < counts["validation"] else "training"
        out[section].append((pick(trainval[keys[k]]), "normal"))

    # development: the test folder's patients that test did not draw, taken last (the sections above do not depend
    # on its counts), so that settings are chosen on images distributed as the test images are
    if len(normal_left) < counts["dev_normal"] or len(pneumonia_left) < counts["dev_pneumonia"]:
        raise ValueError(
            f"The source's test folder has {len(normal_left)} healthy and {len(pneumonia_left)} pneumonia patients "
            f"left after the test section; n_dev_normal={counts['dev_normal']}, "
            f"n_dev_pneumonia={counts['dev_pneumonia']}."
        )
    for key in normal_left[: counts["dev_normal"]]:
        out["development"].append((pick(test_normal[key]), "normal"))
    for key in pneumonia_left[: counts["dev_pneumonia"]]:
        im = pick(test_pneu[key])
        out["development"].append((im, im.finding))
    for section in out:
        out[section].sort(key=lambda t: t[0].source_file)
    return out


def _readme(
    counts: dict[str, dict[str, int]], command: str, skipped: int, total: int, n_bytes: int, origin: str
) -> str:
    rows = "\n".join(
        f"| {s} | {c.get('normal', 0)} | {c.get('bacterial', 0)} | {c.get('viral', 0)} |" for s, c in counts.items()
    )
    return f"""# Kermany paediatric chest radiographs (subset)

{KERMANY['title']}.

- **Licence**: {KERMANY['license']} ({KERMANY['license_url']}). Changes: `medad_monai` selected the images,
  converted them to 8-bit grey PNG and downsampled those larger than {MAX_SIZE} px; earlier changes by the copy
  they were taken from are named under "Source copy".
- **Please cite**: {KERMANY['citation']}
- **Patients**: children aged one to five, anterior-posterior radiographs taken in routine care; labels as
  published (two expert graders, the source's test set checked by a third).

Source copy: {origin or "not recorded"}.

Written by `{command}` from {total} source images ({skipped} other files left out); {n_bytes / 1e6:.1f} MB of PNGs.
One image per patient; patient keys, split rules and what was left out: `docs/data_sources.md` of medad-monai.

| section | normal | bacterial pneumonia | viral pneumonia |
|---|---|---|---|
{rows}

Files: `images/` (PNG, source sub-path kept), `manifest.csv` (file, source_file, patient_id, label, finding,
section, width, height, license, sha256), `datalist.json` (MONAI decathlon style, paths relative to this folder).
"""


def _license_text(origin: str) -> str:
    return f"""The images in this folder are a downsampled subset of

  {KERMANY['title']}

licensed under the Creative Commons Attribution 4.0 International licence (CC BY 4.0),
{KERMANY['license_url']}

Attribution: {KERMANY['citation']}

Changes: images selected, converted to 8-bit greyscale PNG and downsampled to at most {MAX_SIZE} px on the longest
side by medad_monai (python -m medad_monai prepare_kermany); changes made before by the copy they were taken
from: {origin or "none recorded"}. No endorsement by the licensors is implied.
"""


def prepare_kermany(
    source_dir: str,
    out_dir: str,
    seed: int = 0,
    n_train: int = 550,
    n_val: int = 100,
    n_test_normal: int = 100,
    n_test_bacterial: int = 75,
    n_test_viral: int = 75,
    n_dev_normal: int = 60,
    n_dev_pneumonia: int = 50,
    max_size: int = MAX_SIZE,
    origin: str = "",
) -> dict[str, Any]:
    """Turns a Kermany ``chest_xray`` folder into downsampled PNGs, ``manifest.csv`` and a seeded, patient-disjoint
    ``datalist.json`` in ``out_dir`` (see the module docstring for layout and split rules).

    Args:
        source_dir: folder holding ``train/`` and ``test/`` (or ``chest_xray/`` with them).
        out_dir: output folder; new, empty, or written by an earlier run (its ``images/`` is replaced).
        seed: the one seed of every random choice; the same source and seed give byte-identical outputs.
        n_train, n_val: healthy patients (one image each) for ``training`` and ``validation``.
        n_test_normal, n_test_bacterial, n_test_viral: patients of each kind in ``test``.
        n_dev_normal, n_dev_pneumonia: healthy and pneumonia (either kind) patients in ``development``
            (labelled, for choosing settings; drawn after the other sections, which do not depend on these counts).
        max_size: longest side of the written PNGs (never upsampled).
        origin: where the source copy came from (e.g. a repository and commit), recorded in the datalist and
            README for provenance; not used otherwise.

    Returns:
        the datalist dict that was written.

    Raises:
        FileNotFoundError: no Kermany layout under ``source_dir``.
        ValueError: the source has fewer patients than asked for.
    """
    from PIL import Image

    root = find_kermany_root(source_dir)
    images, skipped = scan_kermany(root)
    counts = {
        "training": int(n_train),
        "validation": int(n_val),
        "test_normal": int(n_test_normal),
        "test_bacterial": int(n_test_bacterial),
        "test_viral": int(n_test_viral),
        "dev_normal": int(n_dev_normal),
        "dev_pneumonia": int(n_dev_pneumonia),
    }
    if any(v < 0 for v in counts.values()) or counts["training"] < 1:
        raise ValueError(f"Counts must be >= 0 and n_train >= 1, got {counts}.")
    selected = _select(images, int(seed), counts)
    check_patient_disjoint({s: [i.patient_id for i, _ in items] for s, items in selected.items()})

    out = prepare_out_dir(out_dir)
    rows: list[dict[str, Any]] = []
    sections: dict[str, list[dict[str, Any]]] = {}
    n_bytes = 0
    for section, items in selected.items():
        sections[section] = []
        for im, finding in items:
            arr = downsample(to_gray8(Image.open(root / im.source_file)), int(max_size))
            rel = "images/" + im.source_file.rsplit(".", 1)[0] + ".png"
            digest = write_png_gray8(out / rel, arr)
            n_bytes += (out / rel).stat().st_size
            label = 0 if finding == "normal" else 1
            rows.append(
                {
                    "file": rel,
                    "source_file": im.source_file,
                    "patient_id": im.patient_id,
                    "label": label,
                    "finding": finding,
                    "section": section,
                    "width": arr.shape[1],
                    "height": arr.shape[0],
                    "license": KERMANY["license"],
                    "sha256": digest,
                }
            )
            item: dict[str, Any] = {"image": rel}
            if section in ("test", "development"):
                item.update(label=label, lesion="none" if finding == "normal" else finding)
            sections[section].append(item)
    write_manifest(out / "manifest.csv", rows, MANIFEST_FIELDS)

    command = (
        f"python -m medad_monai prepare_kermany <source_dir> <out_dir> --seed {int(seed)} "
        f"--n_train {counts['training']} --n_val {counts['validation']} --n_test_normal {counts['test_normal']} "
        f"--n_test_bacterial {counts['test_bacterial']} --n_test_viral {counts['test_viral']} "
        f"--n_dev_normal {counts['dev_normal']} --n_dev_pneumonia {counts['dev_pneumonia']} "
        f"--max_size {int(max_size)}"
    )
    if origin:
        command += f' --origin "{origin}"'
    test = sections["test"]
    normals = [x for x in test if x["label"] == 0]
    datalist: dict[str, Any] = {
        "description": f"{KERMANY['title']}; healthy training/validation, labelled test and development (normal, "
        "bacterial and viral pneumonia); one image per patient, patient-disjoint sections.",
        "source": KERMANY["name"],
        "license": KERMANY["license"],
        "citation": KERMANY["citation"],
        "generated_by": command,
        "origin": str(origin),
        "training": sections["training"],
        "validation": sections["validation"],
        "test": test,
        "test_pneumonia": [dict(x) for x in test],
        "test_bacterial": [dict(x) for x in normals] + [dict(x) for x in test if x["lesion"] == "bacterial"],
        "test_viral": [dict(x) for x in normals] + [dict(x) for x in test if x["lesion"] == "viral"],
        "development": sections["development"],
    }
    write_datalist(datalist, out / "datalist.json")

    table: dict[str, dict[str, int]] = {}
    for r in rows:
        table.setdefault(r["section"], {}).setdefault(r["finding"], 0)
        table[r["section"]][r["finding"]] += 1
    (out / "README.md").write_text(
        _readme(table, command, len(skipped), len(images), n_bytes, str(origin)), encoding="utf-8"
    )
    (out / "LICENSE.txt").write_text(_license_text(str(origin)), encoding="utf-8")
    print(
        f"prepare_kermany: {len(rows)} images ({n_bytes / 1e6:.1f} MB) from {len(images)} in '{root}' "
        f"({len(skipped)} other files left out) -> {out}\n  " + json.dumps(table),
        flush=True,
    )
    return datalist
