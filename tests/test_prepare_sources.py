"""Tests for medad_monai.data.sources: the prepare commands on tiny fixtures in each source's real layout, the PNG
encoder, the combined real-benchmark datalist, and the real chest radiographs committed in data/real."""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medad_monai.data import load_datalist
from medad_monai.data.sources import (
    DERIVED_TEST_SETS,
    INSERTED_LESION_KINDS,
    LESION_SIZES,
    MAX_SIZE,
    SOURCES,
    acquisition_jitter,
    encode_png_gray8,
    insert_lesion,
    prepare_kermany,
    prepare_lesion_task,
    real_benchmark_datalist,
    real_data_dir,
    scan_kermany,
    verify_real_data,
)
from medad_monai.data.sources._common import read_manifest

REPO = Path(__file__).resolve().parents[1]
MAX_TOTAL_BYTES = 50 * 1024 * 1024
# keyword of load_datalist that applies the bundles' rule "images inside the dataset folder", where it exists
_INSIDE = {"allow_outside": False} if "allow_outside" in inspect.signature(load_datalist).parameters else {}

# ------------------------------------------------------------------------------------------------ Kermany fixture

# The Kaggle/Mendeley "chest_xray" layout with the file-name patterns of the real set: multi-image patients
# (IM-0011-0001, -0001-0001, -0001-0002), NORMAL2- prefixes, a person with bacteria and virus files, the odd
# "_1" suffix (person447_virus_921_1.jpeg), a test patient key that also appears in train/NORMAL (IM-0003), and
# files that are no images of the set (.DS_Store, notes.txt, an unknown name).
KERMANY_FILES = {
    "test/NORMAL": [
        "IM-0001-0001.jpeg", "IM-0003-0001.jpeg", "IM-0011-0001.jpeg", "IM-0011-0001-0001.jpeg",
        "IM-0011-0001-0002.jpeg", "NORMAL2-IM-0007-0001.jpeg", "NORMAL2-IM-0012-0001.jpeg",
    ],
    "test/PNEUMONIA": [
        "person1_virus_6.jpeg", "person1_virus_7.jpeg", "person3_bacteria_10.jpeg", "person5_bacteria_15.jpeg",
        "person8_virus_20.jpeg", "person9_bacteria_25.jpeg", "person9_virus_26.jpeg", "person447_virus_921_1.jpeg",
    ],
    "train/NORMAL": [
        "IM-0115-0001.jpeg", "IM-0117-0001.jpeg", "IM-0119-0001.jpeg", "IM-0119-0002.jpeg", "IM-0122-0001.jpeg",
        "IM-0125-0001.jpeg", "IM-0127-0001.jpeg", "IM-0128-0001.jpeg", "IM-0003-0002.jpeg",
        "NORMAL2-IM-0372-0001.jpeg", "NORMAL2-IM-0373-0001.jpeg", "NORMAL2-IM-0374-0001-0001.jpeg",
    ],
    "train/PNEUMONIA": ["person100_bacteria_475.jpeg", "person100_virus_184.jpeg"],
    "val/NORMAL": ["NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1430-0001.jpeg"],
    "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"],
}
JUNK = ["test/NORMAL/.DS_Store", "train/NORMAL/notes.txt", "train/PNEUMONIA/scan_0001.jpeg"]
COUNTS = {
    "n_train": 5, "n_val": 2, "n_test_normal": 3, "n_test_bacterial": 2, "n_test_viral": 2,
    "n_dev_normal": 2, "n_dev_pneumonia": 2,
}


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int], rgb: bool) -> None:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 80 + 60 * np.sin(xx / 9.0 + rng.uniform(0, 6)) * np.cos(yy / 13.0) + rng.normal(0, 12, (h, w))
    arr = np.clip(base, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.stack([arr] * 3, -1) if rgb else arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90)


@pytest.fixture(scope="module")
def kermany_src(tmp_path_factory) -> Path:
    """A tiny Kermany source, nested like the Kaggle zip (``<dir>/chest_xray/{train,val,test}/...``)."""
    top = tmp_path_factory.mktemp("kermany_src")
    root = top / "chest_xray"
    rng = np.random.default_rng(7)
    k = 0
    for folder, names in KERMANY_FILES.items():
        for name in names:
            # mostly RGB JPEGs larger than MAX_SIZE (wide, like the real set); some small grey ones
            size, rgb = ((280, 330), True) if k % 3 else ((60, 72), False)
            _jpeg(root / folder / name, rng, size, rgb)
            k += 1
    for junk in JUNK:
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"not an image of the set")
    return top


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ PNG encoder


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 64), (257, 100)])
def test_png_encoder_roundtrip(shape):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, shape).astype(np.uint8)
    arr[: shape[0] // 2] = np.arange(shape[1], dtype=np.uint8)  # smooth rows, so several filter types get picked
    data = encode_png_gray8(arr)
    img = Image.open(io.BytesIO(data))
    assert img.mode == "L" and img.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.asarray(img), arr)
    assert encode_png_gray8(arr) == data  # deterministic


def test_png_encoder_rejects_other_arrays():
    with pytest.raises(ValueError):
        encode_png_gray8(np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError):
        encode_png_gray8(np.zeros((4, 4, 3), np.uint8))


# ------------------------------------------------------------------------------------------------ prepare_kermany


def test_scan_kermany_reads_the_real_names(kermany_src):
    images, skipped = scan_kermany(kermany_src / "chest_xray")
    assert len(images) == sum(len(v) for v in KERMANY_FILES.values())
    assert sorted(skipped) == sorted(JUNK)
    by_file = {i.source_file: i for i in images}
    assert by_file["test/NORMAL/IM-0011-0001-0002.jpeg"].patient_id == "IM-0011"
    assert by_file["train/NORMAL/NORMAL2-IM-0374-0001-0001.jpeg"].patient_id == "NORMAL2-IM-0374"
    assert by_file["test/PNEUMONIA/person447_virus_921_1.jpeg"].patient_id == "person447"
    assert by_file["test/PNEUMONIA/person447_virus_921_1.jpeg"].finding == "viral"
    assert by_file["test/PNEUMONIA/person3_bacteria_10.jpeg"].finding == "bacterial"


def test_prepare_kermany_outputs(kermany_src, tmp_path):
    out = tmp_path / "kermany"
    datalist = prepare_kermany(str(kermany_src), str(out), seed=0, **COUNTS)

    rows = read_manifest(out / "manifest.csv")
    n_test = COUNTS["n_test_normal"] + COUNTS["n_test_bacterial"] + COUNTS["n_test_viral"]
    n_dev = COUNTS["n_dev_normal"] + COUNTS["n_dev_pneumonia"]
    assert len(rows) == COUNTS["n_train"] + COUNTS["n_val"] + n_test + n_dev
    written = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert written == {r["file"] for r in rows}  # nothing else in images/
    for r in rows:
        data = (out / r["file"]).read_bytes()
        assert _sha(data) == r["sha256"]
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.mode == "L"
        assert max(img.size) <= MAX_SIZE and img.size == (int(r["width"]), int(r["height"]))
        # labels follow the source folders and file names
        cls = r["source_file"].split("/")[1]
        assert r["label"] == ("0" if cls == "NORMAL" else "1")
        expected = "normal" if cls == "NORMAL" else ("bacterial" if "_bacteria_" in r["source_file"] else "viral")
        assert r["finding"] == expected and r["license"] == "CC BY 4.0"
        assert r["file"] == "images/" + r["source_file"].rsplit(".", 1)[0] + ".png"
    # a large RGB source image was downsampled with its aspect ratio kept; a small one kept its size
    sizes = {(int(r["width"]), int(r["height"])) for r in rows}
    assert (256, 217) in sizes or (72, 60) in sizes
    assert all(s in {(256, 217), (72, 60)} for s in sizes)

    # sections: healthy training/validation, test from the source's test folder, one image per patient
    by_section: dict[str, list[dict]] = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r)
    assert len(by_section["training"]) == COUNTS["n_train"] and len(by_section["validation"]) == COUNTS["n_val"]
    assert all(r["finding"] == "normal" and not r["source_file"].startswith("test/") for s in ("training", "validation")
               for r in by_section[s])
    assert all(r["source_file"].startswith("test/") for r in by_section["test"])
    kinds = [r["finding"] for r in by_section["test"]]
    assert kinds.count("normal") == 3 and kinds.count("bacterial") == 2 and kinds.count("viral") == 2
    patients = {s: [r["patient_id"] for r in v] for s, v in by_section.items()}
    for s, p in patients.items():
        assert len(p) == len(set(p)), f"two images of one patient in {s}"
    assert not set(patients["training"]) & set(patients["validation"])
    assert not (set(patients["training"]) | set(patients["validation"])) & set(patients["test"])
    # development: labelled, the test folder's patients that test did not draw, disjoint from every other section
    dev = by_section["development"]
    assert [r["finding"] for r in dev].count("normal") == 2 and len(dev) == 4
    assert all(r["source_file"].startswith("test/") for r in dev)
    others = set(patients["training"]) | set(patients["validation"]) | set(patients["test"])
    assert not set(patients["development"]) & others
    # a key of the source's test folder never goes to training/validation, even when not drawn for test
    assert "IM-0003" not in set(patients["training"]) | set(patients["validation"])

    # the datalist: same files, labels and lesion kinds; extra task sections; readable by the package's loader
    on_disk = json.loads((out / "datalist.json").read_text())
    assert on_disk == datalist and on_disk["license"] == "CC BY 4.0" and "<source_dir>" in on_disk["generated_by"]
    section_of = {r["file"]: r for r in rows}
    for s in ("training", "validation"):
        assert sorted(i["image"] for i in on_disk[s]) == sorted(r["file"] for r in by_section[s])
        assert all(set(i) == {"image"} for i in on_disk[s])
    for section in ("test", "development"):
        for item in on_disk[section]:
            r = section_of[item["image"]]
            assert r["section"] == section and item["label"] == int(r["label"])
            assert item["lesion"] == ("none" if r["finding"] == "normal" else r["finding"])
    assert on_disk["test_pneumonia"] == on_disk["test"]
    normals = [i for i in on_disk["test"] if i["label"] == 0]
    for kind in ("bacterial", "viral"):
        sec = on_disk[f"test_{kind}"]
        assert sec[: len(normals)] == normals and {i["lesion"] for i in sec[len(normals):]} == {kind}
    for s in ("training", "validation", "test", "test_pneumonia", "test_bacterial", "test_viral", "development"):
        items = load_datalist(out / "datalist.json", s, **_INSIDE)
        assert len(items) == len(on_disk[s]) and all(os.path.isfile(i["image"]) for i in items)
    assert "CC BY 4.0" in (out / "LICENSE.txt").read_text() and "Kermany" in (out / "README.md").read_text()


def test_prepare_kermany_is_reproducible_and_seeded(kermany_src, tmp_path):
    prepare_kermany(str(kermany_src), str(tmp_path / "a"), seed=3, **COUNTS)
    prepare_kermany(str(kermany_src / "chest_xray"), str(tmp_path / "b"), seed=3, **COUNTS)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b  # byte-identical PNGs, manifest, datalist, README, LICENSE

    def selection(seed):
        out = tmp_path / f"s{seed}"
        prepare_kermany(str(kermany_src), str(out), seed=seed, **COUNTS)
        return {r["source_file"]: r["section"] for r in read_manifest(out / "manifest.csv")}

    first = selection(0)
    assert any(selection(seed) != first for seed in (1, 2, 4))

    # a rebuild into the same folder leaves no stale image behind
    prepare_kermany(str(kermany_src), str(tmp_path / "a"), seed=0, **COUNTS)
    assert _files(tmp_path / "a") == _files(tmp_path / "s0")

    # the development set is drawn last: without it, every other section and file is the same
    prepare_kermany(str(kermany_src), str(tmp_path / "nodev"), seed=0,
                    **{**COUNTS, "n_dev_normal": 0, "n_dev_pneumonia": 0})
    nodev = {r["source_file"]: r["section"] for r in read_manifest(tmp_path / "nodev" / "manifest.csv")}
    assert nodev == {f: sec for f, sec in first.items() if sec != "development"}
    with_dev = _files(tmp_path / "s0")
    assert all(with_dev[f] == data for f, data in _files(tmp_path / "nodev").items() if f.startswith("images/"))


def test_prepare_kermany_refuses_bad_input(kermany_src, tmp_path):
    with pytest.raises(FileNotFoundError, match="No Kermany layout"):
        prepare_kermany(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="bacterial"):
        prepare_kermany(str(kermany_src), str(tmp_path / "o1"), **{**COUNTS, "n_test_bacterial": 5})
    with pytest.raises(ValueError, match="healthy patients in train"):
        prepare_kermany(str(kermany_src), str(tmp_path / "o2"), **{**COUNTS, "n_train": 50})
    with pytest.raises(ValueError, match="2 pneumonia patients left.*n_dev_pneumonia=3"):
        prepare_kermany(str(kermany_src), str(tmp_path / "o3"), **{**COUNTS, "n_dev_pneumonia": 3})
    with pytest.raises(ValueError, match="2 healthy .*n_dev_normal=3"):
        prepare_kermany(str(kermany_src), str(tmp_path / "o4"), **{**COUNTS, "n_dev_normal": 3})
    other = tmp_path / "not_ours"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        prepare_kermany(str(kermany_src), str(other), **COUNTS)
    assert (other / "keep.txt").is_file()


def test_prepare_kermany_command_line(kermany_src, tmp_path):
    """The registered command, as a user types it, writes what the function writes."""
    flags = [f"--{k}={v}" for k, v in COUNTS.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "medad_monai", "prepare_kermany", str(kermany_src), str(tmp_path / "cli"),
         "--seed=5", *flags],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    prepare_kermany(str(kermany_src), str(tmp_path / "api"), seed=5, **COUNTS)
    assert _files(tmp_path / "cli") == _files(tmp_path / "api")


# ------------------------------------------------------------------------------------------ real_benchmark_datalist


def test_real_benchmark_datalist_modes(kermany_src, tmp_path):
    data = tmp_path / "real"
    prepare_kermany(str(kermany_src), str(data / "kermany"), seed=0, **COUNTS)
    source = json.loads((data / "kermany" / "datalist.json").read_text())
    lists = [k for k, v in source.items() if isinstance(v, list)]

    # default: next to the sources, every path inside the folder
    merged = real_benchmark_datalist(data_dir=str(data), sources="kermany")
    assert (data / "datalist.json").is_file()
    for s in lists:
        assert [i["image"] for i in merged[s]] == ["kermany/" + i["image"] for i in source[s]]
        assert len(load_datalist(data / "datalist.json", s, **_INSIDE)) == len(source[s])
    assert merged["sources"]["kermany"]["license"] == "CC BY 4.0"

    # elsewhere: copied (checked against the manifest), so `--dataset_dir <out>` works with the bundles' rule
    out = tmp_path / "bench"
    real_benchmark_datalist(str(out), data_dir=str(data))
    n_rows = len(read_manifest(data / "kermany" / "manifest.csv"))
    assert verify_real_data(out, ["kermany"])["kermany"]["images"] == n_rows
    for s in lists:
        assert len(load_datalist(out / "datalist.json", s, **_INSIDE)) == len(source[s])

    # linked, or referenced in place (then the paths leave the folder)
    real_benchmark_datalist(str(tmp_path / "linked" / "dl.json"), data_dir=str(data), files="link")
    assert (tmp_path / "linked" / "kermany").is_symlink()
    assert len(load_datalist(tmp_path / "linked" / "dl.json", "test", **_INSIDE)) == len(source["test"])
    ref = real_benchmark_datalist(str(tmp_path / "ref"), data_dir=str(data), files="reference")
    assert ref["training"][0]["image"].startswith("../real/kermany/")
    assert len(load_datalist(tmp_path / "ref" / "datalist.json", "training")) == len(source["training"])

    # a damaged file is caught before anything is written
    victim = data / "kermany" / read_manifest(data / "kermany" / "manifest.csv")[0]["file"]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        real_benchmark_datalist(str(tmp_path / "bad"), data_dir=str(data))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FileNotFoundError, match="prepare_nothere"):
        real_benchmark_datalist(str(tmp_path / "x"), data_dir=str(data), sources="nothere")


# ------------------------------------------------------------------------------------------------ committed data


def test_committed_real_data_matches_manifests_and_limits():
    base = real_data_dir()
    assert base == REPO / "data" / "real" or "MEDAD_REAL_DATA_DIR" in os.environ
    report = verify_real_data(base)  # every manifest file (images and masks) present with its sha256
    assert set(report) == set(SOURCES) | {n for n in DERIVED_TEST_SETS if (base / n).is_dir()}
    total = sum(p.stat().st_size for p in base.rglob("*") if p.is_file() and p != base / "datalist.json")
    assert total <= MAX_TOTAL_BYTES, f"data/real holds {total / 1e6:.1f} MB, more than 50 MB"

    for name in SOURCES:
        folder = base / name
        rows = read_manifest(folder / "manifest.csv")
        assert rows and len({r["file"] for r in rows}) == len(rows)
        on_disk = {p.relative_to(folder).as_posix() for p in (folder / "images").rglob("*") if p.is_file()}
        assert on_disk == {r["file"] for r in rows}, "files in images/ without a manifest row, or the reverse"
        for r in rows:
            with Image.open(folder / r["file"]) as img:
                assert img.format == "PNG" and img.mode == "L" and max(img.size) <= MAX_SIZE
                assert img.size == (int(r["width"]), int(r["height"]))
            assert r["license"] and r["patient_id"] and r["label"] in ("0", "1")
        licence = {r["license"] for r in rows}
        readme, licence_txt = (folder / "README.md").read_text(), (folder / "LICENSE.txt").read_text()
        assert all(lic in readme and lic in licence_txt for lic in licence)

        # the datalist lists exactly the manifest's images, sections and labels, patient-disjoint
        datalist = json.loads((folder / "datalist.json").read_text())
        row_of = {r["file"]: r for r in rows}
        sections = [s for s in ("training", "validation", "test", "development") if s in datalist]
        assert sections[:3] == ["training", "validation", "test"]
        for section in sections:
            items = datalist[section]
            assert items and all(row_of[i["image"]]["section"] == section for i in items)
            if section in ("training", "validation"):
                assert all(row_of[i["image"]]["label"] == "0" for i in items)
            else:  # labelled: test, and the development set for choosing settings
                assert all(i["label"] == int(row_of[i["image"]]["label"]) for i in items)
                assert {i["label"] for i in items} == {0, 1}
            assert len(load_datalist(folder / "datalist.json", section, **_INSIDE)) == len(items)
        assert sum(len(datalist[s]) for s in sections) == len(rows)
        pats = {s: {row_of[i["image"]]["patient_id"] for i in datalist[s]} for s in sections}
        for i, s1 in enumerate(sections):
            for s2 in sections[i + 1:]:
                assert not pats[s1] & pats[s2], f"a patient in both {s1} and {s2}"


def test_real_benchmark_datalist_on_committed_data(tmp_path):
    merged = real_benchmark_datalist(str(tmp_path / "bench"))
    for section in ("training", "validation", "test", "test_lesions"):
        items = load_datalist(tmp_path / "bench" / "datalist.json", section, **_INSIDE)
        assert len(items) == len(merged[section]) > 0
    # the sources' own test set is unchanged by the extra section; the lesion items keep their masks (copied too)
    kermany = json.loads((real_data_dir() / "kermany" / "datalist.json").read_text())
    assert [i["image"] for i in merged["test"]] == ["kermany/" + i["image"] for i in kermany["test"]]
    lesions = load_datalist(tmp_path / "bench" / "datalist.json", "test_lesions", **_INSIDE)
    assert {i["lesion"] for i in lesions} == {"none", *INSERTED_LESION_KINDS}
    assert all(os.path.isfile(i["mask"]) for i in lesions if i["label"] == 1)
    # `test` can be the lesion task, for the demo and the bundles' default test key
    swapped = real_benchmark_datalist(str(tmp_path / "bench"), test_section="test_lesions")
    assert swapped["test"] == swapped["test_lesions"] and swapped["test_pneumonia"] == merged["test_pneumonia"]
    with pytest.raises(ValueError, match="test_nothere"):
        real_benchmark_datalist(str(tmp_path / "bench"), test_section="test_nothere")


# ------------------------------------------------------------------------------------------------ lesion task

LESIONS = REPO / "data" / "real" / "kermany_lesions"


def _gray(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.float64) / 255.0


@pytest.mark.parametrize("kind", INSERTED_LESION_KINDS)
def test_insert_lesion_changes_the_image_where_its_mask_is(kind):
    """On a real held-out radiograph, every kind and size changes the pixels inside its mask far more than outside,
    and the mask is a compact region of the expected size class (larger classes, larger masks)."""
    source = real_data_dir() / "kermany"
    row = next(r for r in read_manifest(source / "manifest.csv") if r["section"] == "test" and r["label"] == "0")
    image = _gray(source / row["file"])
    areas = []
    for k, size in enumerate(LESION_SIZES):
        out, mask, info = insert_lesion(image, kind, size, np.random.default_rng(k))
        assert out.shape == image.shape == mask.shape and mask.dtype == bool and mask.any()
        assert 0.0 <= out.min() and out.max() <= 1.0
        diff = np.abs(out - image)
        ring = np.zeros_like(mask)  # the mask's bounding box grown by 4 px
        ys, xs = np.nonzero(mask)
        ring[max(0, ys.min() - 4): ys.max() + 5, max(0, xs.min() - 4): xs.max() + 5] = True
        assert diff[mask].mean() > 0.03, (kind, size, diff[mask].mean())
        # away from the mask, nothing changes by half a grey level (invisible once written as 8 bits)
        assert diff[~ring].max() < 0.5 / 255, f"{kind} {size} changed pixels away from its mask"
        areas.append(int(mask.sum()))
    if kind != "device":  # a device's size class sets its length or ring radius, which the mask area follows loosely
        assert areas[0] < areas[1] < areas[2], areas
    with pytest.raises(ValueError, match="lesion kind"):
        insert_lesion(image, "tumour", "small", np.random.default_rng(0))


def test_acquisition_jitter_moves_image_and_mask_together():
    source = real_data_dir() / "kermany"
    row = next(r for r in read_manifest(source / "manifest.csv") if r["section"] == "test" and r["label"] == "0")
    image = _gray(source / row["file"])
    lesion, mask, _ = insert_lesion(image, "nodule", "large", np.random.default_rng(3))
    out, moved, params = acquisition_jitter(lesion, mask, np.random.default_rng(4))
    assert out.shape == image.shape and moved.dtype == bool and moved.any()
    assert abs(params["rotation_deg"]) <= 5 and 0.95 <= params["scale"] <= 1.05 and 0.8 <= params["gamma"] <= 1.25
    assert np.abs(out - image).mean() > 0.01  # pose and exposure changed
    # the same draw applied to the lesion-free image differs from the lesion image only at the moved mask
    plain, none, same = acquisition_jitter(image, None, np.random.default_rng(4))
    assert none is None and same == params
    diff = np.abs(out - plain)
    assert diff[moved].mean() > 10 * diff[~moved].mean()


def test_committed_lesion_task():
    rows = read_manifest(LESIONS / "manifest.csv")
    verify_real_data(LESIONS.parent, ["kermany_lesions"])  # images and masks match their sha256
    n_bytes = sum(p.stat().st_size for p in LESIONS.rglob("*") if p.is_file())
    assert n_bytes <= 5_000_000, f"data/real/kermany_lesions holds {n_bytes / 1e6:.2f} MB, more than 5 MB"
    on_disk = {p.relative_to(LESIONS).as_posix() for p in LESIONS.rglob("*.png")}
    assert on_disk == {r["file"] for r in rows} | {r["mask"] for r in rows if r["mask"]}

    kermany = read_manifest(real_data_dir() / "kermany" / "manifest.csv")
    held_out = {r["file"]: r for r in kermany if r["section"] == "test" and r["label"] == "0"}
    trained_on = {r["patient_id"] for r in kermany if r["section"] in ("training", "validation")}
    normals = [r for r in rows if r["label"] == "0"]
    abnormal = [r for r in rows if r["label"] == "1"]
    assert len(normals) == len(abnormal) == len(held_out)  # every held-out image once as each
    for r in rows:
        src = held_out[r["source_file"]]  # a healthy image of the held-out test section ...
        assert r["source_sha256"] == src["sha256"] and r["patient_id"] == src["patient_id"]
        assert r["patient_id"] not in trained_on  # ... of a child the models never see
        with Image.open(LESIONS / r["file"]) as img:
            assert img.format == "PNG" and img.mode == "L" and max(img.size) <= MAX_SIZE
            assert img.size == (int(r["width"]), int(r["height"]))
            pixels = np.asarray(img)
        assert not np.array_equal(pixels, (_gray(real_data_dir() / "kermany" / r["source_file"]) * 255).round())
        if r["label"] == "0":
            assert r["lesion"] == "none" and r["mask"] == "" and r["lesion_size"] == ""
            continue
        assert r["lesion"] in INSERTED_LESION_KINDS and r["lesion_size"] in LESION_SIZES
        with Image.open(LESIONS / r["mask"]) as m:
            assert m.mode == "L" and m.size == img.size
            mask = np.asarray(m)
        assert set(np.unique(mask)) == {0, 255}, r["mask"]  # binary and not empty
        assert int((mask > 0).sum()) == int(r["lesion_area_px"])
    kinds = {(r["lesion"], r["lesion_size"]) for r in abnormal}
    assert kinds == {(k, s) for k in INSERTED_LESION_KINDS for s in LESION_SIZES}
    # the jitter is drawn the same way for both classes: it cannot give the label away
    for key in ("rotation_deg", "scale", "gamma", "contrast"):
        a, b = (np.array([float(r[key]) for r in group]) for group in (normals, abnormal))
        assert abs(np.median(a) - np.median(b)) < 0.5 * (np.percentile(a, 75) - np.percentile(a, 25)), key

    datalist = json.loads((LESIONS / "datalist.json").read_text())
    row_of = {r["file"]: r for r in rows}
    assert len(datalist["test"]) == len(rows) and datalist["license"] == "CC BY 4.0"
    for item in datalist["test"]:
        r = row_of[item["image"]]
        assert item["label"] == int(r["label"]) and item["lesion"] == r["lesion"]
        assert item.get("mask", "") == r["mask"]
    items = load_datalist(LESIONS / "datalist.json", "test", **_INSIDE)
    assert sum(i["label"] for i in items) == len(abnormal)
    readme, licence = (LESIONS / "README.md").read_text(), (LESIONS / "LICENSE.txt").read_text()
    assert "synthetic" in readme and "CC BY 4.0" in readme and "Seed" in readme and "CC BY 4.0" in licence


@pytest.mark.slow
def test_committed_lesion_task_rebuilds_byte_for_byte(tmp_path):
    """The command as documented rebuilds the committed folder from data/real/kermany: same hashes."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "medad_monai", "prepare_lesion_task", str(real_data_dir() / "kermany"),
         str(tmp_path / "rebuilt"), "--seed", "0"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(tmp_path / "rebuilt") == _files(LESIONS)


def test_prepare_lesion_task_on_a_fixture(kermany_src, tmp_path):
    data = tmp_path / "real"
    prepare_kermany(str(kermany_src), str(data / "kermany"), seed=0, **COUNTS)
    out = data / "kermany_lesions"
    datalist = prepare_lesion_task(str(data / "kermany"), str(out), seed=1)
    rows = read_manifest(out / "manifest.csv")
    n = COUNTS["n_test_normal"]
    assert len(rows) == 2 * n and sum(r["label"] == "1" for r in rows) == n
    assert {r["lesion"] for r in rows if r["label"] == "1"} <= set(INSERTED_LESION_KINDS)
    for r in rows:
        assert _sha((out / r["file"]).read_bytes()) == r["sha256"]
        if r["mask"]:
            assert _sha((out / r["mask"]).read_bytes()) == r["mask_sha256"]
            with Image.open(out / r["mask"]) as m, Image.open(out / r["file"]) as img:
                assert m.size == img.size and (np.asarray(m) == 255).any()
    assert len(load_datalist(out / "datalist.json", "test", **_INSIDE)) == len(datalist["test"]) == 2 * n

    # reproducible, seeded, and a rebuild into the same folder leaves nothing stale
    prepare_lesion_task(str(data / "kermany"), str(tmp_path / "again"), seed=1)
    assert _files(tmp_path / "again") == _files(out)
    prepare_lesion_task(str(data / "kermany"), str(tmp_path / "other"), seed=2)
    assert _files(tmp_path / "other") != _files(out)
    prepare_lesion_task(str(data / "kermany"), str(tmp_path / "other"), seed=1)
    assert _files(tmp_path / "other") == _files(out)

    # the combined datalist picks it up as an extra test section; without it nothing changes
    merged = real_benchmark_datalist(data_dir=str(data))
    assert [i["image"] for i in merged["test_lesions"]] == ["kermany_lesions/" + i["image"] for i in datalist["test"]]
    assert all(i["mask"].startswith("kermany_lesions/masks/") for i in merged["test_lesions"] if i["label"] == 1)
    assert len(load_datalist(data / "datalist.json", "test_lesions", **_INSIDE)) == 2 * n
    copied = real_benchmark_datalist(str(tmp_path / "copy"), data_dir=str(data))
    assert verify_real_data(tmp_path / "copy", ["kermany_lesions"])["kermany_lesions"]["images"] == 2 * n
    assert len(load_datalist(tmp_path / "copy" / "datalist.json", "test_lesions", **_INSIDE)) == 2 * n
    assert copied["test"] == [{**i, "image": i["image"]} for i in merged["test"]]
    assert "test_lesions" not in real_benchmark_datalist(data_dir=str(data), test_sets="")

    # a damaged lesion mask is caught like a damaged image
    mask_row = next(r for r in rows if r["mask"])
    (out / mask_row["mask"]).write_bytes((out / mask_row["mask"]).read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256 of masks/"):
        verify_real_data(data, ["kermany_lesions"])


def test_prepare_lesion_task_refuses_bad_input(kermany_src, tmp_path):
    data = tmp_path / "real"
    prepare_kermany(str(kermany_src), str(data / "kermany"), seed=0, **COUNTS)
    with pytest.raises(ValueError, match="used to train"):
        prepare_lesion_task(str(data / "kermany"), str(tmp_path / "o1"), section="training")
    with pytest.raises(ValueError, match="healthy images"):
        prepare_lesion_task(str(data / "kermany"), str(tmp_path / "o2"), n_abnormal=COUNTS["n_test_normal"] + 1)
    with pytest.raises(ValueError, match="Unknown lesion kind"):
        prepare_lesion_task(str(data / "kermany"), str(tmp_path / "o3"), kinds="nodule,tumour")
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        prepare_lesion_task(str(tmp_path), str(tmp_path / "o4"))
    victim = next(r for r in read_manifest(data / "kermany" / "manifest.csv") if r["section"] == "test")
    path = data / "kermany" / victim["file"]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="differ from"):
        prepare_lesion_task(str(data / "kermany"), str(tmp_path / "o5"))
    with pytest.raises(FileNotFoundError, match="prepare_lesion_task"):
        real_benchmark_datalist(data_dir=str(data), test_sets="kermany_lesions", verify=False)


def test_prepare_lesion_task_command_line(kermany_src, tmp_path):
    """The registered command, as a user types it, writes what the function writes."""
    data = tmp_path / "real"
    prepare_kermany(str(kermany_src), str(data / "kermany"), seed=0, **COUNTS)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "medad_monai", "prepare_lesion_task", str(data / "kermany"), str(tmp_path / "cli"),
         "--seed=4", "--kinds=nodule,device"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    prepare_lesion_task(str(data / "kermany"), str(tmp_path / "api"), seed=4, kinds=["nodule", "device"])
    assert _files(tmp_path / "cli") == _files(tmp_path / "api")
    assert {r["lesion"] for r in read_manifest(tmp_path / "cli" / "manifest.csv")} == {"none", "nodule", "device"}
