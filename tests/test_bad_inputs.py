"""One bad-input policy through the real bundle CLI (issue 10): what a user sees for each kind of bad input.

- The dataset is checked before work starts: a test item without ``label``, an image listed twice, a path outside
  the dataset folder (unless ``--allow_outside_dataset_dir True``) are refused with the item and the fix.
- Files that cannot be read during the run (corrupt, missing) are skipped, logged with the real reason, counted in
  the summary, listed in ``skipped.csv`` and in ``metrics.json`` (``n_skipped``), also when worker processes read
  them; ``--strict True`` fails the job instead.
- Items where only some carry an optional key (``lesion``) evaluate; ``--input_dir`` picks up every format the
  readers support and ignores folders whose names look like images.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from _bundle_cli import configs_dir, tiny
from PIL import Image

from medad_monai.data.phantoms import generate_demo_dataset

pytestmark = pytest.mark.slow

BUNDLE = "morphaeus"
RUN = tiny(BUNDLE, batch_size=4, warmup_epochs=0, progress_bar=False, perceptual_weight=0.0)


def _cli(cwd, configs, expect_ok=True, **overrides) -> subprocess.CompletedProcess:
    cdir = configs_dir(BUNDLE)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    cmd += ["[" + ",".join(repr(os.path.join(cdir, c)) for c in configs) + "]"]
    cmd += ["--meta_file", os.path.join(cdir, "metadata.json"), "--logging_file", os.path.join(cdir, "logging.conf")]
    for k, v in {**RUN, **overrides}.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, out[-6000:]
    else:
        assert proc.returncode != 0, out[-3000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    generate_demo_dataset(str(d), n_train=8, n_val=4, n_test_normal=4, n_test_abnormal=4, size=64, seed=5)
    return d


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory):
    work = tmp_path_factory.mktemp("bad_inputs_run")
    _cli(work, ["train.json"], dataset_dir=data, ckpt_dir=work / "models", output_dir=work / "eval", max_epochs=1,
         num_workers=0)
    return work / "models"


def _datalist(data, name: str, test: list) -> str:
    with open(data / "datalist.json") as f:
        dl = json.load(f)
    dl["test"] = test
    path = data / name
    path.write_text(json.dumps(dl))
    return str(path)


def _test_items(data) -> list:
    with open(data / "datalist.json") as f:
        return json.load(f)["test"]


def _evaluate(data, ckpt, tmp_path, datalist, expect_ok=True, **overrides):
    out = tmp_path / "eval"
    proc = _cli(
        tmp_path, ["train.json", "evaluate.json"], expect_ok=expect_ok, dataset_dir=data, datalist=datalist,
        ckpt_dir=ckpt, output_dir=out, **overrides,
    )
    return out, proc.stdout + proc.stderr


def test_unreadable_and_missing_files_are_skipped_and_reported(data, ckpt, tmp_path):
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    items = _test_items(data)
    shutil.copy(data / items[0]["image"], data / "images" / "wrong_mask.png")
    Image.new("L", (16, 16), 255).save(data / "images" / "wrong_mask_mask.png")  # the image is 64x64
    bad = [
        {"image": "images/corrupt.png", "label": 1},
        {"image": "images/missing.png", "label": 0},
        {"image": "images/wrong_mask.png", "label": 1, "mask": "images/wrong_mask_mask.png"},
    ]
    datalist = _datalist(data, "dl_unreadable.json", items[:3] + bad + items[3:])
    out, log = _evaluate(data, ckpt, tmp_path, datalist, num_workers=2)  # skips recorded in worker processes too
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == len(items) and metrics["n_skipped"] == 3
    reasons = {os.path.basename(s["image"]): s["reason"] for s in metrics["skipped"]}
    assert sorted(reasons) == ["corrupt.png", "missing.png", "wrong_mask.png"]
    assert "size" in reasons["wrong_mask.png"]
    assert "Cannot read image" in reasons["corrupt.png"] and "applying transform" not in reasons["corrupt.png"]
    assert "missing.png" in reasons["missing.png"]
    with open(out / "test_results" / "skipped.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(os.path.basename(r["image"]) for r in rows) == ["corrupt.png", "missing.png", "wrong_mask.png"]
    assert "Skipping" in log and "corrupt.png: Cannot read image" in log
    assert "3 skipped" in log
    # --strict: the same list fails the job
    (tmp_path / "strict").mkdir()
    _, log = _evaluate(data, ckpt, tmp_path / "strict", datalist, expect_ok=False, strict=True, num_workers=0)
    assert "--strict True" in log


@pytest.mark.parametrize(
    "case, text",
    [
        ("no_label", "no 'label'"),
        ("duplicate", "is listed again"),
        ("outside", "outside the dataset folder"),
        ("bad_label", "'label' must be 0 or 1"),
    ],
)
def test_bad_datalists_are_refused_before_work(data, ckpt, tmp_path, case, text):
    items = _test_items(data)
    if case == "no_label":
        test = items[1:] + [{"image": items[0]["image"]}]
    elif case == "duplicate":
        test = items + [dict(items[0])]
    elif case == "outside":
        shutil.copy(data / items[0]["image"], data.parent / "outside.png")
        test = items + [{"image": "../outside.png", "label": 0}]
    else:
        test = items[1:] + [{"image": items[0]["image"], "label": 2}]
    datalist = _datalist(data, f"dl_{case}.json", test)
    out, log = _evaluate(data, ckpt, tmp_path, datalist, expect_ok=False, num_workers=0)
    assert text in log and "item" in log
    assert not (out / "metrics.json").exists()


def test_paths_outside_the_dataset_folder_when_allowed(data, ckpt, tmp_path):
    items = _test_items(data)
    shutil.copy(data / items[0]["image"], data.parent / "outside_ok.png")
    datalist = _datalist(data, "dl_outside_ok.json", items[1:] + [{"image": "../outside_ok.png", "label": 0}])
    out, _ = _evaluate(data, ckpt, tmp_path, datalist, allow_outside_dataset_dir=True, num_workers=0)
    assert json.loads((out / "metrics.json").read_text())["n_images"] == len(items)


def test_optional_keys_on_some_items(data, ckpt, tmp_path):
    items = _test_items(data)
    test = [dict(it) for it in items]
    for it in test[::2]:
        it.pop("lesion", None)
        it.pop("mask", None)
    test[1]["note"] = "only this one"
    datalist = _datalist(data, "dl_optional.json", test)
    out, _ = _evaluate(data, ckpt, tmp_path, datalist, num_workers=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == len(items) and metrics["n_skipped"] == 0


def test_inference_reads_every_supported_format_and_reports_missing_files(data, ckpt, tmp_path):
    in_dir = tmp_path / "in"
    (in_dir / "looks_like.png").mkdir(parents=True)  # a folder with an image-like name is not an input
    src = Image.open(data / _test_items(data)[0]["image"])
    src.save(in_dir / "a.png")
    src.save(in_dir / "b.gif")
    src.save(in_dir / "c.webp")
    out = tmp_path / "pred"
    _cli(tmp_path, ["inference.json"], ckpt_dir=ckpt, input_dir=in_dir, output_dir=out, num_workers=0)
    with open(out / "scores.csv") as f:
        names = sorted(os.path.basename(r["image"]) for r in csv.DictReader(f))
    assert names == ["a.png", "b.gif", "c.webp"]
    # a missing file in --files is skipped and reported, the others are scored
    files = tmp_path / "files.txt"
    files.write_text(f"{in_dir / 'a.png'}\n{in_dir / 'gone.png'}\n")
    out2 = tmp_path / "pred2"
    proc = _cli(tmp_path, ["inference.json"], ckpt_dir=ckpt, files=files, output_dir=out2, num_workers=0)
    with open(out2 / "scores.csv") as f:
        assert [os.path.basename(r["image"]) for r in csv.DictReader(f)] == ["a.png"]
    with open(out2 / "skipped.csv") as f:
        rows = list(csv.DictReader(f))
    assert [os.path.basename(r["image"]) for r in rows] == ["gone.png"] and rows[0]["reason"]
    assert "1 skipped" in proc.stdout + proc.stderr


def test_a_truncated_model_is_named(data, ckpt, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(ckpt, broken)
    weights = broken / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = _cli(
        tmp_path, ["train.json", "evaluate.json"], expect_ok=False, dataset_dir=data, ckpt_dir=broken,
        output_dir=tmp_path / "eval", num_workers=0,
    )
    out = proc.stdout + proc.stderr
    assert f"The weights file {weights} is damaged" in out and "copy it again, or re-run the training" in out


def _three_inputs(data, tmp_path):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    for item, name in zip(_test_items(data), ("a.png", "b.png", "c.png")):
        shutil.copy(data / item["image"], in_dir / name)
    return in_dir


def test_resumed_inference_redoes_a_torn_row_and_leaves_no_orphan(data, ckpt, tmp_path):
    in_dir, out = _three_inputs(data, tmp_path), tmp_path / "pred"
    args = dict(ckpt_dir=ckpt, input_dir=in_dir, output_dir=out, num_workers=0, batch_size=1)
    _cli(tmp_path, ["inference.json"], **args)
    full = (out / "scores.csv").read_text()
    # killed while writing the last row: its map and overlay are on disk, the row is cut short
    (out / "scores.csv").write_text(full[: full.rstrip().rfind("\n") + 12])
    proc = _cli(tmp_path, ["inference.json"], resume=True, **args)
    assert "Resuming: 2 of 3 images already in" in proc.stdout + proc.stderr
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(os.path.basename(r["image"]) for r in rows) == ["a.png", "b.png", "c.png"]
    assert all(r["pred_score"] and r["pred_label"] in ("0", "1") for r in rows)
    assert sorted(p.name for p in (out / "maps").iterdir()) == [f"{s}_anomaly_map.nii.gz" for s in "abc"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"{s}_overlay.png" for s in "abc"]


def test_a_second_run_on_a_busy_output_folder_is_refused(data, ckpt, tmp_path):
    from medad_monai.io.outputs import OutputDirLock

    in_dir, out = _three_inputs(data, tmp_path), tmp_path / "pred"
    with OutputDirLock(out, "inference"):  # this process stands for the first run
        proc = _cli(tmp_path, ["inference.json"], expect_ok=False, ckpt_dir=ckpt, input_dir=in_dir,
                    output_dir=out, num_workers=0)
    assert f"{out} is in use by another run (pid {os.getpid()}, inference)" in proc.stdout + proc.stderr
    assert not (out / "scores.csv").exists()


def test_masks_that_contradict_their_label_leave_the_pixel_metrics(data, ckpt, tmp_path):
    items = [dict(it) for it in _test_items(data)]
    abnormal = next(it for it in items if it["label"] == 1 and it.get("mask"))
    Image.new("L", Image.open(data / abnormal["mask"]).size, 0).save(data / "images" / "empty_mask.png")
    abnormal["mask"] = "images/empty_mask.png"
    datalist = _datalist(data, "dl_empty_mask.json", items)
    out, log = _evaluate(data, ckpt, tmp_path, datalist, num_workers=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == len(items) and metrics["n_pixel_excluded"] == 1
    excluded = metrics["pixel_excluded"][0]
    assert excluded["image"].endswith(abnormal["image"]) and "marks no pixel" in excluded["reason"]
    assert "Leaving" in log and "out of the pixel metrics" in log
    (tmp_path / "strict").mkdir()
    _, log = _evaluate(data, ckpt, tmp_path / "strict", datalist, expect_ok=False, strict=True, num_workers=0)
    assert "--strict True" in log and "marks no pixel" in log


def test_a_model_run_at_another_size_is_refused(data, ckpt, tmp_path):
    in_dir = _three_inputs(data, tmp_path)
    proc = _cli(tmp_path, ["inference.json"], expect_ok=False, ckpt_dir=ckpt, input_dir=in_dir,
                output_dir=tmp_path / "pred", num_workers=0, spatial_size="[64,64]")
    out = proc.stdout + proc.stderr
    assert "was fitted for MorphAEus on 1×32×32 inputs" in out and "this run uses MorphAEus on 1×64×64 inputs" in out
    assert "python -m monai.bundle run calibration" in out
    assert not (tmp_path / "pred" / "scores.csv").exists() or len(
        (tmp_path / "pred" / "scores.csv").read_text().splitlines()) == 1


def test_without_calibration_results_say_uncalibrated(data, ckpt, tmp_path):
    bare = tmp_path / "models"
    bare.mkdir()
    shutil.copy(ckpt / "model.pt", bare / "model.pt")
    out, log = _evaluate(data, ckpt=bare, tmp_path=tmp_path, datalist=str(data / "datalist.json"), num_workers=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibrated"] is False and "image_auroc" in metrics and "image_threshold" not in metrics
    assert "No calibration.json next to the model" in log
    with open(out / "test_results" / "scores.csv") as f:
        assert {r["pred_label"] for r in csv.DictReader(f)} == {"-1"}
    (tmp_path / "calibrated").mkdir()
    out2, _ = _evaluate(data, ckpt, tmp_path / "calibrated", str(data / "datalist.json"), num_workers=0)
    assert json.loads((out2 / "metrics.json").read_text())["calibrated"] is True


def test_training_leaves_out_unreadable_files_and_says_so(data, tmp_path):
    with open(data / "datalist.json") as f:
        dl = json.load(f)
    (data / "images" / "corrupt_train.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    dl["training"] = dl["training"] + [{"image": "images/corrupt_train.png"}, {"image": "images/gone_train.png"}]
    path = data / "dl_bad_training.json"
    path.write_text(json.dumps(dl))
    run = dict(dataset_dir=data, datalist=path, output_dir=tmp_path / "out", max_epochs=1, num_workers=0)
    proc = _cli(tmp_path, ["train.json"], ckpt_dir=tmp_path / "models", **run)
    log = proc.stdout + proc.stderr
    assert "Skipping training item" in log and "corrupt_train.png: Cannot read image" in log and "gone_train.png" in log
    assert f"2 of {len(dl['training'])} 'training' item(s) cannot be read and are left out" in log
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "calibration.json").is_file()
    proc = _cli(tmp_path, ["train.json"], expect_ok=False, ckpt_dir=tmp_path / "strict", strict=True, **run)
    assert "--strict True: 2 of" in proc.stdout + proc.stderr
    assert not (tmp_path / "strict" / "model.pt").exists()
