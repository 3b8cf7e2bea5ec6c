"""Tests for the embedded demo data generator (medad_monai.data.phantoms)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from medad_monai.data import (
    LESION_KINDS,
    default_demo_dir,
    generate_demo_dataset,
    load_datalist,
    load_image,
    load_mask,
    make_demo_figure,
    synthesize_cxr,
)

SMALL = {"n_train": 3, "n_val": 2, "n_test_normal": 2, "n_test_abnormal": 5, "size": 64, "seed": 5}


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half)."""
    neg, pos = np.asarray(neg, float), np.asarray(pos, float)
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater) / (len(neg) * len(pos))


def _digests(folder) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_synthesize_is_deterministic_and_seed_dependent():
    a, b = synthesize_cxr([1, 2, 3], size=96), synthesize_cxr([1, 2, 3], size=96)
    np.testing.assert_array_equal(a.image, b.image)
    c = synthesize_cxr([1, 2, 4], size=96)
    assert np.abs(a.image - c.image).mean() > 0.02
    assert a.image.dtype == np.float32 and a.image.shape == (96, 96) and not a.mask.any() and a.lesion == "none"
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    with pytest.raises(ValueError, match="Unknown lesion"):
        synthesize_cxr(0, lesion="fracture")


def test_looks_like_a_chest_radiograph():
    # dark lungs either side of a bright mediastinum; dark air beside the lower body is not required
    imgs = np.stack([synthesize_cxr(i, size=128).image for i in range(12)])
    mean = imgs.mean(0)
    centre = mean[40:90, 58:70].mean()
    lungs = (mean[40:80, 25:45].mean() + mean[40:80, 83:103].mean()) / 2
    abdomen = mean[115:125, 40:88].mean()
    assert centre > lungs + 0.25 and abdomen > lungs + 0.25


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_lesion_mask_matches_the_change_from_the_twin(kind):
    for seed in (11, 12, 13):
        sick = synthesize_cxr(seed, size=128, lesion=kind)
        twin = synthesize_cxr(seed, size=128)
        s8, m8 = sick.to_uint8()
        t8, _ = twin.to_uint8()
        diff = np.abs(s8.astype(int) - t8.astype(int)) / 255.0
        inside, outside = diff[sick.mask], diff[~sick.mask]
        assert sick.mask.sum() >= 4 and set(np.unique(m8)) == {0, 255} and sick.lesion == kind
        # the lesion changes the image inside its mask, and next to nothing far from it (what remains there is the
        # tail of the radiograph processing's unsharp mask and 8-bit rounding)
        assert inside.mean() > 0.01, (kind, seed, inside.mean())
        assert inside.mean() > 10 * outside.mean(), (kind, seed, inside.mean(), outside.mean())
        ys, xs = np.nonzero(sick.mask)
        far = np.ones_like(sick.mask)
        far[max(ys.min() - 24, 0) : ys.max() + 25, max(xs.min() - 24, 0) : xs.max() + 25] = False
        if far.any():
            assert diff[far].max() <= 2 / 255 and diff[far].mean() < 1e-3, (kind, seed, diff[far].max())


def test_mean_image_baseline_is_weak_but_oracle_is_perfect():
    n = 64
    train = np.stack([synthesize_cxr([9, 1, i], size=n).image for i in range(60)])
    mean = train.mean(0)
    kinds = [LESION_KINDS[i % len(LESION_KINDS)] for i in range(30)]
    normal = [np.round(synthesize_cxr([9, 3, i], size=n).image * 255) / 255 for i in range(30)]
    sick = [synthesize_cxr([9, 4, i], size=n, lesion=k) for i, k in enumerate(kinds)]
    sick_img = [np.round(s.image * 255) / 255 for s in sick]
    twins = [np.round(synthesize_cxr([9, 4, i], size=n).image * 255) / 255 for i in range(30)]
    baseline = _auroc([np.abs(x - mean).mean() for x in normal], [np.abs(x - mean).mean() for x in sick_img])
    oracle = _auroc([0.0] * 30, [np.abs(x - t).mean() for x, t in zip(sick_img, twins)])
    assert baseline < 0.95, baseline
    assert oracle == 1.0


def test_generate_demo_dataset_deterministic_reused_and_consistent(tmp_path):
    p1 = generate_demo_dataset(tmp_path / "a", **SMALL)
    generate_demo_dataset(tmp_path / "b", **SMALL)
    d1, d2 = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert d1 == d2 and len(d1) == 3 + 2 + 2 + 5 + (2 + 5) + 3  # images, masks, datalist/README/manifest
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary folder left behind

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["params"] == SMALL and sum(manifest["lesion_counts"].values()) == 5

    test = load_datalist(p1, "test")
    assert [x["label"] for x in test] == [0, 0, 1, 1, 1, 1, 1]
    for x in test:
        m = load_mask(x["mask"])
        assert (m.sum() > 0) == (x["label"] == 1) and (x["lesion"] == "none") == (x["label"] == 0)
    img, meta = load_image(load_datalist(p1, "training")[0]["image"])
    assert img.shape == (1, 64, 64) and meta["bit_depth"] == 8
    assert len(load_datalist(p1, "validation")) == 2

    # a matching dataset is reused without rewriting; a damaged one is regenerated
    stamp = os.stat(p1).st_mtime_ns
    assert generate_demo_dataset(tmp_path / "a", **SMALL) == p1 and os.stat(p1).st_mtime_ns == stamp
    victim = tmp_path / "a" / "images" / "train_0000.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(victim)
    generate_demo_dataset(tmp_path / "a", **SMALL)
    assert _digests(tmp_path / "a") == d2

    # other parameters regenerate; the untouched splits stay identical
    generate_demo_dataset(tmp_path / "a", **{**SMALL, "n_test_abnormal": 6})
    d3 = _digests(tmp_path / "a")
    assert d3["images/train_0001.png"] == d2["images/train_0001.png"] and "images/test_abnormal_0005.png" in d3


def test_generate_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="manifest"):
        generate_demo_dataset(tmp_path, **SMALL)
    generate_demo_dataset(tmp_path, overwrite=True, **SMALL)
    assert (tmp_path / "mine.txt").read_text() == "user data" and (tmp_path / "datalist.json").is_file()


def test_default_dir_and_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDAD_DEMO_DIR", str(tmp_path / "cache"))
    assert default_demo_dir() == tmp_path / "cache"
    monkeypatch.delenv("MEDAD_DEMO_DIR")
    assert default_demo_dir().parts[-2:] == ("medad_monai", "demo_cxr")
    out = make_demo_figure(tmp_path / "fig" / "demo.png", n_normal=2, n_abnormal=6, size=64, columns=4)
    fig = np.asarray(Image.open(out).convert("RGB"))
    assert fig.shape == (2 * 68 + 4, 4 * 68 + 4, 3)
    red = (fig[..., 0] > 200) & (fig[..., 1] < 80) & (fig[..., 2] < 80)
    # tiles 0-1 are healthy, 2-7 abnormal: red contours only on the latter
    assert not red[:68, :140].any() and red[:68, 140:].any() and red[68:, :].any()
