"""The demo's pieces that run in-process: the trivial baseline and the side-by-side table."""

from __future__ import annotations

from medad_monai.data.phantoms import generate_demo_dataset
import csv
import json

from medad_monai.apps.demo import auroc_by_lesion, print_table, run_baseline


def test_mean_image_baseline_is_calibrated_and_evaluated(tmp_path):
    data = tmp_path / "data"
    generate_demo_dataset(str(data), n_train=12, n_val=6, n_test_normal=4, n_test_abnormal=4, size=64, seed=1)
    m = run_baseline(str(tmp_path / "out"), str(data), spatial_size=(32, 32))
    assert (tmp_path / "out" / "mean_image_baseline" / "metrics.json").is_file()
    assert 0.0 <= m["image_auroc"] <= 1.0 and 0.0 <= m["pixel_auroc"] <= 1.0
    assert m["n_normal"] == 4 and m["n_abnormal"] == 4
    kinds = {it["lesion"] for it in json.loads((data / "datalist.json").read_text())["test"] if it["label"] == 1}
    assert set(m["image_auroc_by_lesion"]) == kinds
    assert all(0.0 <= v <= 1.0 for v in m["image_auroc_by_lesion"].values())


def test_auroc_by_lesion_ranks_each_kind_against_the_normals(tmp_path):
    items = [{"image": f"images/n{i}.png", "label": 0} for i in range(3)]
    items += [{"image": "images/a0.png", "label": 1, "lesion": "nodule"}, {"image": "images/a1.png", "label": 1, "lesion": "nodule"}]
    items += [{"image": "images/b0.png", "label": 1, "lesion": "effusion"}]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "test": items}))
    scores = {"n0": 0.2, "n1": 0.4, "n2": 0.6, "a0": 0.9, "a1": 0.5, "b0": 0.1}
    with open(tmp_path / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "pred_score", "pred_label"])
        for name, v in scores.items():
            w.writerow([str(tmp_path / "images" / f"{name}.png"), v, 0])
    got = auroc_by_lesion(str(tmp_path / "scores.csv"), str(tmp_path / "datalist.json"))
    # nodule: 0.9 beats all 3 normals, 0.5 beats 2 of 3 -> 5/6; effusion 0.1 beats none -> 0
    assert set(got) == {"effusion", "nodule"}
    assert got["effusion"] == 0.0 and abs(got["nodule"] - 5 / 6) < 1e-9


def test_table_aligns_every_method_and_marks_missing_values():
    results = {"a_long_method_name": {"image_auroc": 0.5, "train_s": 3.0}, "b": {"image_auroc": 0.75}}
    lines = print_table(results).splitlines()
    assert len({len(line) for line in lines}) == 1  # every row as wide as the header
    assert lines[0].split() == ["method", "image_auroc", "train_s", "evaluate_s", "inference_s"]
    assert lines[2].split() == ["a_long_method_name", "0.500", "3.000", "-", "-"]
    assert lines[3].split() == ["b", "0.750", "-", "-", "-"]
    custom = print_table({"m": {"nodule": 0.7}}, keys=["nodule", "effusion"]).splitlines()
    assert custom[0].split() == ["method", "nodule", "effusion"] and custom[2].split() == ["m", "0.700", "-"]


def test_pca_baseline_is_calibrated_and_evaluated(tmp_path):
    data = tmp_path / "data"
    generate_demo_dataset(str(data), n_train=24, n_val=8, n_test_normal=6, n_test_abnormal=6, size=64, seed=2)
    m = run_baseline(str(tmp_path / "out"), str(data), spatial_size=(32, 32), name="pca_baseline")
    assert (tmp_path / "out" / "pca_baseline" / "metrics.json").is_file()
    assert 0.0 <= m["image_auroc"] <= 1.0 and m["n_normal"] == 6 and m["n_abnormal"] == 6
    with open(tmp_path / "out" / "pca_baseline" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    from medad_monai.evaluation.metrics import image_auroc

    auroc = image_auroc([float(r["pred_score"]) for r in rows], [int(r["label"]) for r in rows])
    assert len(rows) == 12 and auroc == m["image_auroc"]  # the per-image scores are the evaluated ones
