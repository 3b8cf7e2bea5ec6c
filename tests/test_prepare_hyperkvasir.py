"""Tests for ``prepare_hyperkvasir`` on a tiny fixture in Hyper-Kvasir's own layout (labeled-images/<tract>/<group>/
<class>/ and segmented-images/{images,masks}/), and for the RGB PNG encoder it writes with."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medad_monai.data.sources._common import encode_png_gray8, encode_png_rgb8, read_manifest
from medad_monai.data.sources.hyperkvasir import find_hyperkvasir_root, prepare_hyperkvasir, scan_hyperkvasir

REPO = Path(__file__).resolve().parents[1]

# class folder -> number of frames; the healthy defaults (cecum, ileum, bbps-2-3) and classes that must be ignored
LABELLED = {
    "lower-gi-tract/anatomical-landmarks/cecum": 6,
    "lower-gi-tract/anatomical-landmarks/ileum": 3,
    "lower-gi-tract/anatomical-landmarks/retroflex-rectum": 2,
    "lower-gi-tract/quality-of-mucosal-views/bbps-2-3": 5,
    "lower-gi-tract/quality-of-mucosal-views/bbps-0-1": 2,
    "lower-gi-tract/pathological-findings/polyps": 2,
    "upper-gi-tract/anatomical-landmarks/pylorus": 2,
}
N_POLYPS = 6
COUNTS = dict(n_train=6, n_val=2, n_test_normal=3, n_test_abnormal=4, max_size=32)


def _frame(rng: np.random.Generator, size=(90, 72)) -> Image.Image:
    """A smooth random colour frame (distinct difference hashes) with a black border like an endoscope image."""
    small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BICUBIC)
    arr = np.asarray(img).copy()
    arr[:3], arr[-3:], arr[:, :3], arr[:, -3:] = 0, 0, 0, 0
    return Image.fromarray(arr)


def _uuid(rng: np.random.Generator) -> str:
    h = "".join(f"{int(v):x}" for v in rng.integers(0, 16, 32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """Writes the fixture under ``<tmp>/hyper-kvasir`` (the nesting the finder accepts) and returns its facts."""
    rng = np.random.default_rng(7)
    base = tmp_path_factory.mktemp("hk_src")
    root = base / "hyper-kvasir"
    facts: dict = {"base": base, "root": root, "labelled": {}}
    for folder, n in LABELLED.items():
        d = root / "labeled-images" / folder
        d.mkdir(parents=True)
        names = []
        for _ in range(n):
            name = _uuid(rng) + ".jpg"
            _frame(rng).save(d / name, quality=95)
            names.append(f"labeled-images/{folder}/{name}")
        facts["labelled"][folder.rsplit("/", 1)[1]] = names
    (root / "labeled-images" / "lower-gi-tract" / "anatomical-landmarks" / "cecum" / ".DS_Store").write_bytes(b"x")
    # a near-duplicate: the same cecum frame saved again (JPEG at another quality, different bytes)
    first = root / facts["labelled"]["cecum"][0]
    dup = first.with_name(_uuid(rng) + ".jpg")
    Image.open(first).save(dup, quality=80)
    facts["cecum_dup"] = (facts["labelled"]["cecum"][0], dup.relative_to(root).as_posix())

    seg_img, seg_mask = root / "segmented-images" / "images", root / "segmented-images" / "masks"
    seg_img.mkdir(parents=True)
    seg_mask.mkdir(parents=True)
    facts["polyps"] = []
    for i in range(N_POLYPS):
        name = f"cju{i:03d}polyp{i}"
        w, h = (120, 100) if i % 2 else (100, 120)
        frame = _frame(rng, (w, h))
        frame.save(seg_img / f"{name}.jpg", quality=95)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2 + 10, w // 3 : w // 3 + 30] = 255
        Image.fromarray(mask).save(seg_mask / f"{name}.jpg", quality=90)  # JPEG masks, as published
        facts["polyps"].append(f"segmented-images/images/{name}.jpg")
    _frame(rng).save(seg_img / "nomask.jpg")  # an image without mask is left out
    (root / "segmented-images" / "bounding-boxes.json").write_text("{}")
    # a healthy-class frame that is a near-duplicate of a polyp frame must never be used as healthy
    bbps = root / "labeled-images" / "lower-gi-tract" / "quality-of-mucosal-views" / "bbps-2-3"
    Image.open(seg_img / "cju000polyp0.jpg").save(bbps / "f0000000-0000-0000-0000-000000000000.jpg", quality=85)
    facts["polyp_dup"] = "labeled-images/lower-gi-tract/quality-of-mucosal-views/bbps-2-3/" \
        "f0000000-0000-0000-0000-000000000000.jpg"
    return facts


def _run_cli(src: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "medad_monai", "prepare_hyperkvasir", str(src), str(out)]
    cmd += [f"--{k}={v}" for k, v in COUNTS.items()] + list(extra)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_scan_finds_classes_masks_and_skips(source):
    root = find_hyperkvasir_root(source["base"])
    assert root == source["root"]
    normals, polyps, skipped = scan_hyperkvasir(root)
    assert {n.finding for n in normals} == {"cecum", "ileum", "bbps-2-3"}
    assert len(normals) == 6 + 1 + 3 + 5 + 1
    assert [p.source_file for p in polyps] == sorted(source["polyps"])
    assert all(p.mask_file.startswith("segmented-images/masks/") for p in polyps)
    assert any(s.endswith(".DS_Store") for s in skipped) and "segmented-images/images/nomask.jpg" in skipped
    with pytest.raises(FileNotFoundError):
        find_hyperkvasir_root(source["root"] / "segmented-images")


def test_prepare_splits_manifest_masks_and_rerun(source, tmp_path):
    out = tmp_path / "hk"
    _run_cli(source["base"], out, "--origin=fixture")
    dl = json.loads((out / "datalist.json").read_text())
    assert dl["source"] == "hyperkvasir" and dl["license"] == "CC BY 4.0" and dl["channels"] == 3
    assert len(dl["training"]) == COUNTS["n_train"] and len(dl["validation"]) == COUNTS["n_val"]
    test = dl["test"]
    assert sum(t["label"] == 0 for t in test) == COUNTS["n_test_normal"]
    assert sum(t["label"] == 1 for t in test) == COUNTS["n_test_abnormal"]
    for t in test:
        assert t["lesion"] == ("polyp" if t["label"] else "none")
        assert ("mask" in t) == bool(t["label"])  # a healthy frame has no mask file (taken as all zero)

    rows = read_manifest(out / "manifest.csv")
    assert len(rows) == sum(COUNTS[k] for k in ("n_train", "n_val", "n_test_normal", "n_test_abnormal"))
    sources = [r["source_file"] for r in rows]
    assert len(set(sources)) == len(sources)
    # sections are disjoint in near-duplicate groups; the duplicated cecum frame is used at most once, and the
    # healthy-class copy of a polyp frame never
    groups: dict[str, set] = {}
    for r in rows:
        groups.setdefault(r["section"], set()).add(r["group_id"])
    secs = list(groups)
    assert all(not (groups[a] & groups[b]) for i, a in enumerate(secs) for b in secs[i + 1 :])
    assert sum(s in source["cecum_dup"] for s in sources) <= 1
    assert source["polyp_dup"] not in sources
    allowed = set(source["labelled"]["cecum"] + source["labelled"]["ileum"] + source["labelled"]["bbps-2-3"])
    allowed |= {source["cecum_dup"][1]} | set(source["polyps"])
    assert set(sources) <= allowed

    in_dl = {x["image"] for s in ("training", "validation", "test") for x in dl[s]}
    assert in_dl == {r["file"] for r in rows}
    for r in rows:
        data = (out / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        img = Image.open(io.BytesIO(data))
        assert img.mode == "RGB" and max(img.size) <= COUNTS["max_size"]
        assert img.size == (int(r["width"]), int(r["height"]))
        assert r["license"] == "CC BY 4.0"
        if r["label"] == "1":
            assert r["finding"] == "polyp" and r["section"] == "test" and r["mask"]
            mdata = (out / r["mask"]).read_bytes()
            assert hashlib.sha256(mdata).hexdigest() == r["mask_sha256"]
            mask = Image.open(io.BytesIO(mdata))
            assert mask.mode == "L" and mask.size == img.size
            values = set(np.unique(np.asarray(mask)).tolist())
            assert values <= {0, 255} and 255 in values
        else:
            assert r["finding"] in ("cecum", "ileum", "bbps-2-3") and not r["mask"]
    # the polyp frames are 120x100 or 100x120: aspect kept at max_size 32
    sizes = {(int(r["width"]), int(r["height"])) for r in rows if r["label"] == "1"}
    assert sizes <= {(32, 27), (27, 32)}
    readme = (out / "README.md").read_text()
    assert "CC BY 4.0" in readme and "Borgli" in readme and "prepare_hyperkvasir" in readme and "fixture" in readme
    assert "Attribution 4.0" in (out / "LICENSE.txt").read_text()

    # the same source and seed: byte-identical files, through the function into a second folder and into the same
    first = _tree(out)
    out2 = tmp_path / "hk2"
    prepare_hyperkvasir(str(source["base"]), str(out2), origin="fixture", **COUNTS)
    assert _tree(out2) == first
    _run_cli(source["base"], out, "--origin=fixture")
    assert _tree(out) == first
    # another seed draws other frames
    out3 = tmp_path / "hk3"
    prepare_hyperkvasir(str(source["base"]), str(out3), seed=1, origin="fixture", **COUNTS)
    assert {r["source_file"] for r in read_manifest(out3 / "manifest.csv")} != set(sources)


def test_prepare_refuses_too_few_and_foreign_folders(source, tmp_path):
    with pytest.raises(ValueError, match="polyp groups"):
        prepare_hyperkvasir(str(source["root"]), str(tmp_path / "a"), **{**COUNTS, "n_test_abnormal": N_POLYPS + 1})
    with pytest.raises(ValueError, match="healthy"):
        prepare_hyperkvasir(str(source["root"]), str(tmp_path / "b"), **{**COUNTS, "n_train": 50})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        prepare_hyperkvasir(str(source["root"]), str(foreign), **COUNTS)
    # other healthy classes, given as a comma-separated string
    dl = prepare_hyperkvasir(
        str(source["root"]), str(tmp_path / "c"), normal_classes="retroflex-rectum,bbps-0-1", n_train=2, n_val=1,
        n_test_normal=1, n_test_abnormal=1,
    )
    assert all("retroflex-rectum" in x["image"] or "bbps-0-1" in x["image"] for x in dl["training"])


def test_rgb_png_encoder_round_trip_and_grey_unchanged():
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (5, 7, 3), (33, 20, 3)]:
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        a[: shape[0] // 2] = a[: shape[0] // 2] // 32 * 32  # some smooth rows so that every filter gets chosen
        data = encode_png_rgb8(a)
        assert data == encode_png_rgb8(a.copy())
        back = Image.open(io.BytesIO(data))
        assert back.mode == "RGB" and np.array_equal(np.asarray(back), a)
    with pytest.raises(ValueError):
        encode_png_rgb8(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_png_gray8(np.zeros((4, 4, 3), np.uint8))
    g = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png_gray8(g)))), g)
