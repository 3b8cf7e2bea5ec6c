"""Inference over a list with 2 processes (``multi_gpu_inference.json`` under ``torchrun``, gloo on CPU) writes the
same outputs as the single-process run: one ``scores.csv`` in input order, the same map and overlay names (also for
two inputs with the same file name), one ``skipped.csv``; and a run stopped before the merge resumes without
duplicates or orphans.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import _bundle_cli
import pytest
from _bundle_cli import bundle_run, tiny

from medad_monai.data.phantoms import generate_demo_dataset

pytestmark = pytest.mark.slow

BUNDLE = "morphaeus"
RUN = tiny(BUNDLE, batch_size=2, warmup_epochs=0, progress_bar=False, perceptual_weight=0.0, num_workers=0)


def _torchrun(cwd, **overrides) -> subprocess.CompletedProcess:
    cdir = _bundle_cli.configs_dir(BUNDLE)
    configs = "[" + ",".join(repr(os.path.join(cdir, c)) for c in ("inference.json", "multi_gpu_inference.json")) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", configs, "--meta_file", os.path.join(cdir, "metadata.json"),
           "--logging_file", os.path.join(cdir, "logging.conf")]
    for k, v in {**RUN, **overrides}.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp_inference")
    data = work / "data"
    generate_demo_dataset(str(data), n_train=8, n_val=4, n_test_normal=4, n_test_abnormal=3, size=64, seed=4)
    bundle_run(BUNDLE, work, ["train.json"], dataset_dir=data, ckpt_dir=work / "models", output_dir=work / "train",
               max_epochs=1, **RUN)
    images = sorted((data / "images").glob("test_*.png"))
    images = [p for p in images if "mask" not in p.name]
    inputs = work / "inputs"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    listed = []
    for i, src in enumerate(images[:5]):
        dst = inputs / f"img{i}.png"
        shutil.copy(src, dst)
        listed.append(dst)
    for sub, src in zip("ab", images[5:7]):  # two inputs named img.png
        shutil.copy(src, inputs / sub / "img.png")
        listed.insert(2 if sub == "a" else 5, inputs / sub / "img.png")
    (inputs / "broken.png").write_bytes(b"not a picture")
    listed.insert(4, inputs / "broken.png")
    files = work / "files.txt"
    files.write_text("\n".join(str(p) for p in listed) + "\n")
    single = work / "single"
    bundle_run(BUNDLE, work, ["inference.json"], ckpt_dir=work / "models", files=files, output_dir=single, **RUN)
    return {"work": work, "files": files, "listed": [str(p) for p in listed], "single": single}


def _assert_same_as_single(out, single):
    rows, ref = _rows(out / "scores.csv"), _rows(single / "scores.csv")
    assert [r["image"] for r in rows] == [r["image"] for r in ref]  # input order
    for r, s in zip(rows, ref):
        assert abs(float(r["pred_score"]) - float(s["pred_score"])) <= 1e-5 * max(1.0, abs(float(s["pred_score"])))
        assert r["pred_label"] == s["pred_label"]
    assert _names(out / "maps") == _names(single / "maps")
    assert _names(out / "overlays") == _names(single / "overlays")
    assert [r["image"] for r in _rows(out / "skipped.csv")] == [r["image"] for r in _rows(single / "skipped.csv")]
    assert not list(out.glob("scores.part*.csv"))


def test_two_processes_write_what_one_does(setup):
    out = setup["work"] / "ddp"
    proc = _torchrun(setup["work"], ckpt_dir=setup["work"] / "models", files=setup["files"], output_dir=out)
    assert "Merged the rows of 2 processes" in proc.stdout + proc.stderr
    rows = _rows(out / "scores.csv")
    assert [r["image"] for r in rows] == [p for p in setup["listed"] if not p.endswith("broken.png")]
    assert "b_img_anomaly_map.nii.gz" in _names(out / "maps") and "img_anomaly_map.nii.gz" in _names(out / "maps")
    _assert_same_as_single(out, setup["single"])
    assert (out / "summary.png").is_file()


def test_a_stopped_distributed_run_resumes_without_duplicates(setup):
    out = setup["work"] / "ddp_resumed"
    shutil.copytree(setup["single"], out)
    # what a run killed before the merge leaves: part files (one with a torn last row), no scores.csv, and maps and
    # overlays of images whose rows were never written
    lines = (out / "scores.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "scores.csv").unlink()
    (out / "skipped.csv").unlink()
    (out / "scores.part0.csv").write_text("".join(lines[:3]), encoding="utf-8")
    (out / "scores.part1.csv").write_text(lines[0] + lines[3] + lines[4][:10], encoding="utf-8")
    proc = _torchrun(setup["work"], ckpt_dir=setup["work"] / "models", files=setup["files"], output_dir=out,
                     resume=True)
    log = proc.stdout + proc.stderr
    assert "Resuming: 3 of 8 images already in" in log
    _assert_same_as_single(out, setup["single"])
