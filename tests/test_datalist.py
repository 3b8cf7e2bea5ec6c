"""Tests for medad_monai.data.datalist: loading/validation and the three converters, on small files in real layouts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from medad_monai.data import (
    datalist_from_folders,
    datalist_from_medianomaly,
    datalist_from_morphaeus_csv,
    load_datalist,
)


def _png(path, value: int = 100, size: int = 8) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), mode="L").save(path)
    return str(path)


# ------------------------------------------------------------------------------------------------ load_datalist


def test_load_datalist_resolves_and_validates(tmp_path):
    _png(tmp_path / "data" / "images" / "a.png")
    _png(tmp_path / "data" / "images" / "b.png")
    _png(tmp_path / "data" / "masks" / "b.png")
    js = tmp_path / "data" / "datalist.json"
    js.write_text(json.dumps({
        "description": "x",
        "training": [{"image": "images/a.png"}],
        "test": [{"image": "images/a.png", "label": 0}, {"image": "images/b.png", "label": 1, "mask": "masks/b.png"}],
        "strings": ["images/a.png"],
    }))
    items = load_datalist(js, "test")
    assert items[1] == {"image": str(tmp_path / "data" / "images" / "b.png"), "label": 1,
                        "mask": str(tmp_path / "data" / "masks" / "b.png")}
    assert load_datalist(js, "strings") == [{"image": str(tmp_path / "data" / "images" / "a.png")}]
    assert json.loads(js.read_text())["test"][1]["mask"] == "masks/b.png"  # the file is untouched
    with pytest.raises(ValueError, match="no section 'validation'.*'strings'"):
        load_datalist(js, "validation")
    # dataset_dir moves the base: the files are then missing and all are reported with their count
    with pytest.raises(FileNotFoundError, match="3 file"):
        load_datalist(js, "test", dataset_dir=tmp_path / "elsewhere")
    assert load_datalist(js, "test", dataset_dir=tmp_path / "elsewhere", check_files=False)[0]["image"].startswith(
        str(tmp_path / "elsewhere"))


def test_load_datalist_errors(tmp_path):
    _png(tmp_path / "a.png")
    js = tmp_path / "d.json"
    js.write_text(json.dumps({"test": [{"image": "a.png", "label": 2}]}))
    with pytest.raises(ValueError, match="'label' must be 0 or 1"):
        load_datalist(js, "test")
    js.write_text(json.dumps({"test": [{"label": 1}]}))
    with pytest.raises(ValueError, match="no 'image' key"):
        load_datalist(js, "test")
    js.write_text(json.dumps({"training": [{"image": f"missing_{i}.png"} for i in range(9)] + [{"image": "a.png"}]}))
    with pytest.raises(FileNotFoundError) as e:
        load_datalist(js, "training")
    msg = str(e.value)
    assert "9 file(s) not found" in msg and "missing_0.png" in msg and "and 4 more" in msg and "missing_8" not in msg
    js.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_datalist(js, "training")
    with pytest.raises(FileNotFoundError):
        load_datalist(tmp_path / "absent.json", "training")


# --------------------------------------------------------------------------------------------------- folders


def test_datalist_from_folders(tmp_path):
    for i in range(20):
        _png(tmp_path / "normal" / f"n{i:02d}.png")
    for i in range(5):
        _png(tmp_path / "abnormal" / f"a{i}.png")
    _png(tmp_path / "masks" / "a0.png")
    _png(tmp_path / "masks" / "a1_mask.png")
    _png(tmp_path / "masks" / "a2_seg.png")
    _png(tmp_path / "masks" / "a3.png")  # a4 has no mask
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    out = tmp_path / "lists" / "dl.json"
    with pytest.warns(UserWarning, match="1 of 5 abnormal"):
        d = datalist_from_folders(tmp_path / "normal", out, abnormal_dir=tmp_path / "abnormal",
                                  mask_dir=tmp_path / "masks", val_fraction=0.1, test_fraction=0.1, seed=3)
    assert (len(d["training"]), len(d["validation"])) == (16, 2)
    normals_test = [x for x in d["test"] if x["label"] == 0]
    abn = [x for x in d["test"] if x["label"] == 1]
    assert len(normals_test) == 2 and len(abn) == 5 and all("mask" not in x for x in normals_test)
    assert [x.get("mask") for x in abn] == ["../masks/a0.png", "../masks/a1_mask.png", "../masks/a2_seg.png",
                                           "../masks/a3.png", None]
    # splits are disjoint, cover all normals, and are reproducible with the seed
    names = [x["image"] for x in d["training"] + d["validation"] + normals_test]
    assert len(set(names)) == 20
    assert json.loads(out.read_text()) == d
    d2 = datalist_from_folders(tmp_path / "normal", tmp_path / "lists" / "dl2.json", val_fraction=0.1,
                               test_fraction=0.1, seed=3)
    assert d2["validation"] == d["validation"]
    d3 = datalist_from_folders(tmp_path / "normal", tmp_path / "lists" / "dl3.json", seed=4)
    assert d3["validation"] != d["validation"]
    loaded = load_datalist(out, "test")
    assert all(os.path.isfile(x["image"]) for x in loaded)
    with pytest.raises(ValueError, match="val_fraction"):
        datalist_from_folders(tmp_path / "normal", out, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(FileNotFoundError):
        datalist_from_folders(tmp_path / "nope", out)


# ------------------------------------------------------------------------------------------------- MorphAEus


def _morphaeus_layout(root):
    """The ci-ber/MorphAEus layout: data/CXR/<class>/images/*.png and data/CXR/splits/*.csv (one filename column)."""
    files = {
        "cxr_normal_train.csv": [f"./data/CXR/Normal/images/Normal-{i}.png" for i in range(1, 7)],
        "cxr_normal_val.csv": ["./data/CXR/Normal/images/Normal-7.png", "./data/CXR/Normal/images/Normal-8.png"],
        "cxr_normal_test.csv": ["./data/CXR/Normal/images/Normal-9.png", "./data/CXR/Normal/images/Normal-10.png"],
        "cxr_opa_test.csv": ["./data/CXR/Lung_Opacity/images/Lung_Opacity-739.png"],
        "cxr_covid_padchest_test.csv": ["./data/CXR/COVID/images/COVID-1143.png",
                                        "./data/CXR/COVID/images/COVID-1144.png"],
    }
    splits = root / "data" / "CXR" / "splits"
    splits.mkdir(parents=True)
    for name, rows in files.items():
        (splits / name).write_text("filename\n" + "\n".join(rows) + "\n")
        for r in rows:
            _png(root / r)
    return splits


def test_datalist_from_morphaeus_csv(tmp_path):
    root = tmp_path / "MorphAEus"
    splits = _morphaeus_layout(root)
    out = tmp_path / "out" / "cxr.json"
    d = datalist_from_morphaeus_csv(splits, out, root=root)
    assert (len(d["training"]), len(d["validation"]), len(d["test"])) == (6, 2, 5)
    assert {x["task"] for x in d["test"]} == {"normal", "pneumonia", "covid"}
    assert [x["label"] for x in d["test_pneumonia"]] == [0, 0, 1]
    assert [x["task"] for x in d["test_covid"]] == ["normal", "normal", "covid", "covid"]
    assert d["training"][0]["image"] == "../MorphAEus/data/CXR/Normal/images/Normal-1.png"
    items = load_datalist(out, "test_covid")
    assert items[-1]["image"] == str(root / "data" / "CXR" / "COVID" / "images" / "COVID-1144.png")
    os.remove(root / "data" / "CXR" / "COVID" / "images" / "COVID-1144.png")
    with pytest.raises(FileNotFoundError, match="COVID-1144.png"):
        datalist_from_morphaeus_csv(splits, out, root=root)
    (splits / "cxr_opa_test.csv").write_text("path\nx.png\n")
    with pytest.raises(ValueError, match="no 'filename' column"):
        datalist_from_morphaeus_csv(splits, out, root=root, check_files=False)


# ----------------------------------------------------------------------------------------------- MedIAnomaly


def test_datalist_from_medianomaly_data_json(tmp_path):
    root = tmp_path / "MedIAnomaly-Data" / "RSNA"
    train = [f"t{i}.png" for i in range(10)]
    test0, test1 = ["n0.png", "n1.png"], ["p0.png", "p1.png", "p2.png"]
    for name in train + test0 + test1 + ["u0.png"]:
        _png(root / "images" / name)
    (root / "data.json").write_text(json.dumps({
        "train": {"0": train, "unlabeled": {"0": ["u0.png"], "1": []}},
        "test": {"0": test0, "1": test1},
    }))
    out = tmp_path / "rsna.json"
    d = datalist_from_medianomaly(root / "data.json", out, val_fraction=0.2, seed=1)
    assert (len(d["training"]), len(d["validation"])) == (8, 2)
    assert sorted(os.path.basename(x["image"]) for x in d["training"] + d["validation"]) == sorted(train)
    assert [x["label"] for x in d["test"]] == [0, 0, 1, 1, 1]
    assert d["test"][2]["image"] == "MedIAnomaly-Data/RSNA/images/p0.png"
    assert all("u0.png" not in x["image"] for sec in ("training", "validation", "test") for x in d[sec])
    assert len(load_datalist(out, "test")) == 5
    # passing the folder works too, and val_fraction=0 keeps the benchmark's training set
    d0 = datalist_from_medianomaly(root, out, val_fraction=0.0)
    assert len(d0["training"]) == 10 and d0["validation"] == []
    (root / "data.json").write_text(json.dumps({"train": {"0": train}}))
    with pytest.raises(ValueError, match="not a MedIAnomaly data.json"):
        datalist_from_medianomaly(root / "data.json", out)


def test_datalist_from_medianomaly_brats_layout(tmp_path):
    root = tmp_path / "BraTS2021"
    for i in range(5):
        _png(root / "train" / f"BraTS2021_{i:05d}_flair_{60 + i}.png")
    _png(root / "test" / "normal" / "BraTS2021_00100_flair_10.png")
    for i in (101, 102):
        _png(root / "test" / "tumor" / f"BraTS2021_00{i}_flair_70.png")
        _png(root / "test" / "annotation" / f"BraTS2021_00{i}_seg_70.png", value=255)
    out = tmp_path / "brats.json"
    d = datalist_from_medianomaly(root, out, val_fraction=0.2)
    assert (len(d["training"]), len(d["validation"])) == (4, 1)
    assert [x["label"] for x in d["test"]] == [0, 1, 1]
    assert d["test"][1]["mask"] == "BraTS2021/test/annotation/BraTS2021_00101_seg_70.png"
    assert all(os.path.isfile(x["mask"]) for x in load_datalist(out, "test") if "mask" in x)
    os.remove(root / "test" / "annotation" / "BraTS2021_00102_seg_70.png")
    with pytest.raises(FileNotFoundError, match="BraTS2021_00102_seg_70.png"):
        datalist_from_medianomaly(root, out)
