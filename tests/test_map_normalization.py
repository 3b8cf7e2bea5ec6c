"""Healthy map normalisation and the signed-residual map: statistics, leave-one-out, the wrapper and the bundle CLI."""

from __future__ import annotations

import os

import numpy as np

import torch

from medad_monai.networks import AnomalyMapNet
from medad_monai.networks.map_normalization import HealthyMapStatistics, MapNormalizer


def _stats(maps: torch.Tensor, chunks: int = 3) -> HealthyMapStatistics:
    s = HealthyMapStatistics()
    for part in maps.chunk(chunks):
        s.update(part)
    return s


def test_statistics_equal_the_direct_mean_and_std():
    maps = torch.rand(20, 1, 6, 7, generator=torch.Generator().manual_seed(0))
    mean, std = _stats(maps).mean_std()
    torch.testing.assert_close(mean.float(), maps.mean(0))
    torch.testing.assert_close(std.float(), maps.std(0))


def test_leave_one_out_equals_refitting_without_the_image():
    maps = torch.rand(15, 1, 5, 5, generator=torch.Generator().manual_seed(1)) ** 2
    stats = _stats(maps)
    floor = stats.std_floor()
    z = stats.leave_one_out(maps, floor)
    for i in (0, 6, 14):
        others = torch.cat([maps[:i], maps[i + 1 :]])
        expected = ((maps[i] - others.mean(0)) / others.std(0).clamp_min(floor)).clamp_min(0)
        torch.testing.assert_close(z[i], expected, atol=1e-5, rtol=1e-5)
    # in-sample normalisation is biased low: the image is part of its own mean
    in_sample = MapNormalizer().fit(stats)(maps)
    assert z.amax() > in_sample.amax()


def test_normalizer_state_round_trips_and_refuses_unfitted_or_other_sizes():
    maps = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    norm = MapNormalizer().fit(_stats(maps))
    again = MapNormalizer().load_state(norm.state())
    assert torch.equal(norm(maps), again(maps))
    assert norm(maps).min() >= 0
    try:
        MapNormalizer()(maps)
    except RuntimeError as e:
        assert "--map_normalization healthy" in str(e) and "calibration" in str(e)
    else:
        raise AssertionError("an unfitted normaliser ran")
    try:
        norm(torch.rand(2, 1, 8, 8))
    except ValueError as e:
        assert "[1, 4, 4]" in str(e) and "[1, 8, 8]" in str(e)
    else:
        raise AssertionError("a map of another size was normalised")
    bad = dict(norm.state(), std=[0.0] * 16)
    try:
        MapNormalizer().load_state(bad, source="x/calibration.json")
    except ValueError as e:
        assert "x/calibration.json" in str(e)
    else:
        raise AssertionError("a damaged state was accepted")


class _Shift(torch.nn.Module):
    """A 'reconstruction' that is the input minus a fixed pattern."""

    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pattern", pattern)

    def reconstruct(self, x):
        return x - self.pattern


def test_signed_residual_cancels_alternating_texture_but_keeps_a_one_signed_region():
    h = w = 64
    stripes = torch.zeros(1, 1, h, w)
    stripes[..., ::2, :] = 0.2
    stripes[..., 1::2, :] = -0.2  # texture misfit: alternating sign
    blob = torch.zeros(1, 1, h, w)
    blob[..., 28:36, 28:36] = 0.1  # a consolidation: one sign over a region
    x = torch.zeros(1, 1, h, w)
    abs_net = AnomalyMapNet(_Shift(stripes + blob), smooth_sigma=2.0, map_residual="abs")
    signed_net = AnomalyMapNet(_Shift(stripes + blob), smooth_sigma=2.0, map_residual="signed")
    a, s = abs_net(x)[0, 0], signed_net(x)[0, 0]
    # |residual| smoothed: the stripes dominate everywhere; signed then |.|: the blob stands out
    # (10, 10): away from the blob and further than the kernel's radius (8 px) from the image border
    assert a[32, 32] < 1.5 * a[10, 10]
    assert s[32, 32] > 5 * s[10, 10]


# ----------------------------------------------------------------------------------------------- through the bundle CLI
import csv  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import _bundle_cli  # noqa: E402
import pytest  # noqa: E402
from _bundle_cli import tiny  # noqa: E402

from medad_monai.data.phantoms import generate_demo_dataset  # noqa: E402

RECIPE = {"map_residual": "signed", "map_normalization": "healthy", "map_sigma": 1.5, "score_method": "max"}


def _scores(path) -> dict[str, float]:
    with open(path) as f:
        return {r["image"]: float(r["pred_score"]) for r in csv.DictReader(f)}


@pytest.mark.slow
def test_healthy_normalisation_through_the_morphaeus_cli(tmp_path):
    """Calibration fits the statistics (leave-one-out) and stores them; evaluation and inference use them as stored,
    never refitting on what they score; a run asking for other maps is refused with both values and the fix."""
    data = tmp_path / "data"
    generate_demo_dataset(str(data), n_train=12, n_val=6, n_test_normal=3, n_test_abnormal=3, size=64, seed=3)
    ckpt = tmp_path / "models"
    common = dict(dataset_dir=data, ckpt_dir=ckpt, **tiny("morphaeus", num_workers=0, progress_bar=False), **RECIPE)
    _bundle_cli.bundle_run("morphaeus", tmp_path, ["train.json"], output_dir=tmp_path / "e", max_epochs=1,
                           batch_size=4, warmup_epochs=1, perceptual_weight=0, **common)
    cal = json.loads((ckpt / "calibration.json").read_text())
    assert cal["map_residual"] == "signed" and cal["map_sigma"] == 1.5
    norm = cal["map_normalization"]
    assert norm["n_images"] == 6 and norm["shape"] == [1, 32, 32] and len(norm["mean"]) == 32 * 32
    assert "leave-one-out" in cal["description"]

    out = tmp_path / "eval"
    _bundle_cli.bundle_run("morphaeus", tmp_path, ["train.json", "evaluate.json"], output_dir=out, **common)
    evaluated = _scores(out / "test_results" / "scores.csv")
    assert len(evaluated) == 6
    # inference on a folder of only two of the test images gives the same scores: nothing is fitted at test time
    folder = tmp_path / "two"
    folder.mkdir()
    picked = sorted(evaluated)[:2]
    for p in picked:
        shutil.copy(p, folder / os.path.basename(p))
    pred = tmp_path / "pred"
    _bundle_cli.bundle_run("morphaeus", tmp_path, ["inference.json"], output_dir=pred, input_dir=folder,
                           **{k: v for k, v in common.items() if k != "dataset_dir"})
    inferred = {os.path.basename(k): v for k, v in _scores(pred / "scores.csv").items()}
    for p in picked:
        assert inferred[os.path.basename(p)] == pytest.approx(evaluated[p], rel=1e-5)

    with pytest.raises(AssertionError, match=r"map_normalization='none' \(calibration: 'healthy'\).*--map_normalization healthy"):
        _bundle_cli.bundle_run("morphaeus", tmp_path, ["train.json", "evaluate.json"], output_dir=tmp_path / "x",
                               **{**common, "map_normalization": "none"})


def test_the_recipe_study_development_set_uses_validation_images_only(tmp_path):
    """The demo's map recipe was chosen on lesions drawn into real *validation* radiographs, never a test image."""
    from medad_monai.data.sources import read_manifest, real_data_dir
    from medad_monai.apps.map_recipe_study import build_development_set

    source = real_data_dir() / "kermany"
    items = build_development_set(source, tmp_path, seed=7, n_fit=96)
    sections = {os.path.basename(r["file"]): r["section"] for r in read_manifest(source / "manifest.csv")}
    assert len(items["fit"]) == 96 and len(items["dev"]) == 8
    assert {sections[os.path.basename(it["image"])] for it in items["fit"] + items["dev"]} == {"validation"}
    fit = {os.path.basename(it["image"]) for it in items["fit"]}
    assert not fit & {os.path.basename(it["image"]) for it in items["dev"]}
    assert [it["label"] for it in items["dev"]] == [0, 1] * 4
    from PIL import Image

    for it in items["dev"][1::2]:
        assert it["lesion"] != "none" and (np.asarray(Image.open(it["mask"])) > 0).any()


def test_the_real_development_set_is_the_labelled_development_section():
    """Settings are compared on the source's labelled development section, with the healthy statistics fitted on the
    validation images as a calibration does; no test image and no training image takes part."""
    from medad_monai.data.sources import read_manifest, real_data_dir
    from medad_monai.apps.map_recipe_study import real_development_set

    source = real_data_dir() / "kermany"
    items = real_development_set(source)
    rows = {str(source / r["file"]): r for r in read_manifest(source / "manifest.csv")}
    assert {rows[it["image"]]["section"] for it in items["fit"]} == {"validation"} and len(items["fit"]) == 100
    assert {rows[it["image"]]["section"] for it in items["dev"]} == {"development"}
    assert [it["label"] for it in items["dev"]].count(1) == 50 and [it["label"] for it in items["dev"]].count(0) == 60
    assert all(it["label"] == int(rows[it["image"]]["label"]) for it in items["dev"])
    assert {it["lesion"] for it in items["dev"]} == {"none", "bacterial", "viral"}
    # the source's test folder (distributed as the test images), never a child of the test section
    assert all(rows[it["image"]]["source_file"].startswith("test/") for it in items["dev"])
    test_children = {r["patient_id"] for r in rows.values() if r["section"] == "test"}
    assert not {rows[it["image"]]["patient_id"] for it in items["dev"]} & test_children


@pytest.mark.slow
def test_map_recipe_study_on_the_real_development_set(tmp_path):
    """The study end to end on the committed development section with a MorphAEus checkpoint in the demo layout (its
    initial weights: the study's mechanics, not a result), every recipe times every score, the baselines included;
    a source without a development section is refused with the fix."""
    from monai.bundle import ConfigParser

    from medad_monai.apps.demo import bundles_dir
    from medad_monai.apps.map_recipe_study import RECIPES, map_recipe_study
    from medad_monai.data.sources import real_data_dir

    configs = os.path.join(bundles_dir(), "morphaeus", "configs")
    parser = ConfigParser()
    parser.read_config([os.path.join(configs, f) for f in ("train.json", "demo.json")])
    parser["bundle_root"] = os.path.join(bundles_dir(), "morphaeus")
    torch.manual_seed(0)
    models = tmp_path / "runs" / "morphaeus" / "models"
    models.mkdir(parents=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), models / "model.pt")

    result = map_recipe_study(runs_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "out"), methods="morphaeus",
                              development="real", score_methods="max,mean", n_resamples=20)
    assert set(result["auroc"]) == {"morphaeus", "mean_image_baseline", "pca_baseline"}
    assert len(result["recipes"]) == 2 * len(RECIPES) and result["selected"] in result["recipes"]
    for model, values in result["auroc"].items():
        assert set(values) == set(result["recipes"]) and all(0.0 <= v <= 1.0 for v in values.values()), model
        # pneumonia kinds are scored separately against the same healthy images
        assert set(result["by_kind"][model][result["selected"]]) == {"bacterial", "viral"}
    assert json.loads((tmp_path / "out" / "map_recipe_study.json").read_text())["selected"] == result["selected"]
    assert "| signed sigma=2 healthy | mean |" in (tmp_path / "out" / "map_recipe_study.md").read_text()
    some = map_recipe_study(runs_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "some"), methods="morphaeus",
                            development="real", recipes="ssim:1.5:none,signed:2:healthy_lungs")
    assert some["recipes"] == ["ssim sigma=1.5 none | max", "signed sigma=2 healthy_lungs | max"]
    # every other recipe against the demo's, per model, on the same resampled development images
    assert some["reference"] == "signed sigma=2 healthy_lungs | max"
    for model, auroc in some["auroc"].items():
        d = some["paired"][model]["ssim sigma=1.5 none | max"]
        assert d["difference"] == pytest.approx(auroc["ssim sigma=1.5 none | max"] - auroc[some["reference"]])
        assert d["low"] <= d["difference"] <= d["high"] and d["n_resamples"] == 1000
    text = (tmp_path / "some" / "map_recipe_study.md").read_text()
    assert "AUROC minus the reference recipe's (signed sigma=2 healthy_lungs | max)" in text
    assert text.count("| ssim sigma=1.5 none | max |") == 2
    alone = map_recipe_study(runs_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "alone"), methods="morphaeus",
                             development="real", recipes="ssim:1.5:none", n_resamples=20)
    assert alone["reference"] is None and alone["paired"] == {}
    with pytest.raises(ValueError, match=r"recipes: \['ssim:9:none'\] are not among"):
        map_recipe_study(runs_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "o4"), methods="morphaeus",
                         development="real", recipes="ssim:9:none")

    old = tmp_path / "old_source"
    shutil.copytree(real_data_dir() / "kermany", old)
    datalist = json.loads((old / "datalist.json").read_text())
    del datalist["development"]
    (old / "datalist.json").write_text(json.dumps(datalist))
    with pytest.raises(ValueError, match="no labelled section 'development'.*prepare_kermany"):
        map_recipe_study(runs_dir=str(tmp_path / "runs"), source_dir=str(old), output_dir=str(tmp_path / "o2"),
                         methods="morphaeus", development="real")
    with pytest.raises(ValueError, match="memmc_inference: expected K:ratio"):
        map_recipe_study(runs_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "o3"), methods="morphaeus",
                         development="real", memmc_inference="4")


def test_healthy_lungs_restricts_the_map_to_the_darkest_healthy_pixels():
    """``healthy_lungs``: the healthy z-map, 0 outside the pixels at or below the 40 % quantile of the healthy
    calibration images' mean intensity; the region travels in the calibration's state, scripts, and refuses colour."""
    from medad_monai.networks import fit_map_normalization
    from medad_monai.networks.map_normalization import LUNG_QUANTILE

    class Shrink(torch.nn.Module):
        def reconstruct(self, x):
            return 0.9 * x

    torch.manual_seed(0)
    x = torch.rand(20, 1, 16, 16)
    x[..., :, :6] *= 0.2  # a dark band: 96 of 256 pixels, 37.5 %
    net = AnomalyMapNet(Shrink(), smooth_sigma=1.0, map_residual="signed", map_normalization="healthy_lungs").eval()
    assert net.map_normalization == "healthy_lungs"
    assert fit_map_normalization(net, [x[:10], x[10:]], leave_one_out=False) == 20
    region = net.normalizer.region
    mean_image = x.mean(0)
    expected = (mean_image <= torch.quantile(mean_image.flatten(), LUNG_QUANTILE)).float()
    assert torch.equal(region, expected) and 100 <= int(region.sum()) <= 110
    assert bool(region[..., :, :6].all())  # the dark band is inside
    plain = AnomalyMapNet(Shrink(), smooth_sigma=1.0, map_residual="signed", map_normalization="healthy").eval()
    fit_map_normalization(plain, [x[:10], x[10:]], leave_one_out=False)
    y = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        restricted, full = net(y), plain(y)
    assert torch.equal(restricted, full * region) and float(restricted[..., region[0] == 0].abs().sum()) == 0.0

    state = net.normalizer.state()
    assert state["kind"] == "healthy_lungs" and sum(state["region"]) == int(region.sum())
    again = MapNormalizer().load_state(json.loads(json.dumps(state)))
    assert again.kind == "healthy_lungs" and torch.equal(again.region, region)
    scripted = torch.jit.script(net.normalizer)
    with torch.no_grad():
        raw = net.unnormalized_predict(y)[1]
    assert torch.allclose(scripted(raw), restricted)
    with pytest.raises(ValueError, match="not 0/1"):
        MapNormalizer().load_state({**state, "region": [2] * len(state["region"])})

    rgb = AnomalyMapNet(Shrink(), map_normalization="healthy_lungs").eval()
    with pytest.raises(ValueError, match="3 channels. Use --map_normalization healthy"):
        fit_map_normalization(rgb, [torch.rand(4, 3, 16, 16)], leave_one_out=False)
