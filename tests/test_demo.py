"""The demo's pieces that run in-process: the trivial baseline and the side-by-side table."""

from __future__ import annotations

from medad_monai.data.phantoms import generate_demo_dataset
from medad_monai.demo import print_table, run_baseline


def test_mean_image_baseline_is_calibrated_and_evaluated(tmp_path):
    data = tmp_path / "data"
    generate_demo_dataset(str(data), n_train=12, n_val=6, n_test_normal=4, n_test_abnormal=4, size=64, seed=1)
    m = run_baseline(str(tmp_path / "out"), str(data), spatial_size=(32, 32))
    assert (tmp_path / "out" / "mean_image_baseline" / "metrics.json").is_file()
    assert 0.0 <= m["image_auroc"] <= 1.0 and 0.0 <= m["pixel_auroc"] <= 1.0
    assert m["n_normal"] == 4 and m["n_abnormal"] == 4


def test_table_aligns_every_method_and_marks_missing_values():
    results = {"a_long_method_name": {"image_auroc": 0.5, "train_s": 3.0}, "b": {"image_auroc": 0.75}}
    lines = print_table(results).splitlines()
    assert len({len(line) for line in lines}) == 1  # every row as wide as the header
    assert lines[0].split() == ["method", "image_auroc", "train_s", "evaluate_s", "inference_s"]
    assert lines[2].split() == ["a_long_method_name", "0.500", "3.000", "-", "-"]
    assert lines[3].split() == ["b", "0.750", "-", "-", "-"]
