"""Experiment tracking with MLflow through MONAI's bundle option ``--tracking`` (MLFlowHandler), for both bundles.

``--tracking mlflow`` alone adds MONAI's default handlers, whose trainer ``output_transform``
(``from_engine(['loss'], first=True)``) expects decollated output; our trainers run with ``decollate=False``, so it
gets a tuple and stops with ``float() argument must be ... not 'tuple'``. Each bundle therefore ships
``configs/mlflow_tracking.json`` (MONAI's default settings with the trainer logging every loss term through
:func:`medad_monai.engine.handlers.loss_terms` and the run's hyper-parameters), and this test runs that shipped file.
MLflow 3.13+ refuses the plain file store (``file://``), so the store is a local SQLite file with artifacts next to it.

Checked through ``mlflow.tracking.MlflowClient``: one finished run with the requested name, its parameters, the
per-iteration training loss terms, the per-epoch ``val_loss`` (equal to what the StatsHandler printed) and the executed
config logged as an artifact.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from _bundle_cli import tiny

mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'mlflow>=3.15.2')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2
N_TRAIN, BATCH = 16, 4

TINY = {
    "memmc_mae": tiny("memmc_mae", warmup_epochs=1),
    "morphaeus": tiny("morphaeus", warmup_epochs=1, perceptual_weight=0),
}

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from medad_monai.data.phantoms import generate_demo_dataset

    d = tmp_path_factory.mktemp("phantoms")
    generate_demo_dataset(str(d), n_train=N_TRAIN, n_val=4, n_test_normal=2, n_test_abnormal=2, size=64, seed=11)
    return str(d)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for both bundles: creating its tables (MLflow's migrations) takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["memmc_mae", "morphaeus"])
def test_mlflow_tracking(bundle, dataset, store, tmp_path):
    settings_file = os.path.join(ROOT, "bundles", bundle, "configs", "mlflow_tracking.json")  # the shipped one
    tracking_uri, experiment_name, run_name = store, f"medad_tests_{bundle}", f"{bundle}_tiny"

    cdir = os.path.join(ROOT, "bundles", bundle, "configs")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", os.path.join(cdir, "train.json")]
    cmd += ["--meta_file", os.path.join(cdir, "metadata.json"), "--logging_file", os.path.join(cdir, "logging.conf")]
    cmd += ["--tracking", str(settings_file), "--tracking_uri", tracking_uri]
    cmd += ["--experiment_name", experiment_name, "--run_name", run_name]
    # MONAI builds the artifact path as `<output_dir> + '/config_<time>.json'`, which is only a valid expression
    # while output_dir is one ("$@bundle_root + '/eval'"); with --output_dir given as a plain path, name the file
    cmd += ["--save_execute_config", str(tmp_path / "eval" / "executed_config.json")]
    overrides = {
        **TINY[bundle],
        "dataset_dir": dataset,
        "ckpt_dir": tmp_path / "models",
        "output_dir": tmp_path / "eval",
        "max_epochs": EPOCHS,
        "batch_size": BATCH,
        "num_workers": 0,
        "progress_bar": False,
    }
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{log[-8000:]}"

    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.run_name == run_name and run.info.status == "FINISHED"

    params = run.data.params
    assert params["max_epochs"] == str(EPOCHS)
    assert params["epoch_length"] == str(N_TRAIN // BATCH)
    assert params["batch_size"] == str(BATCH) and params["spatial_size"] == "[32, 32]"
    assert params["world_size"] == "1" and float(params["learning_rate"]) > 0
    with open(os.path.join(cdir, "metadata.json")) as f:
        assert params["bundle_version"] == json.load(f)["version"]

    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val] == list(range(1, EPOCHS + 1))
    printed = [float(v) for v in re.findall(r"Epoch\[\d+\] Metrics -- val_loss: ([0-9.]+)", log)]
    assert len(printed) == EPOCHS
    for m, p in zip(val, printed):
        assert abs(m.value - p) <= 5e-5, (m.value, p)  # StatsHandler prints 4 decimals

    # training loss terms, one value per iteration, equal to what the StatsHandler printed for the first iteration
    first = re.search(r"Epoch: 1/\d+, Iter: 1/\d+ -- (\w+): ([-0-9.e]+)", log)
    assert first, "no iteration line from the StatsHandler"
    term, value = first.group(1), float(first.group(2))
    history = client.get_metric_history(run.info.run_id, term)
    assert [m.step for m in history] == list(range(1, EPOCHS * N_TRAIN // BATCH + 1)), (term, len(history))
    assert abs(history[0].value - value) <= 5e-5, (term, history[0].value, value)

    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "executed_config.json" in artifacts, artifacts
    print(f"\n{bundle}: MLflow run {run.info.run_id}, params {sorted(params)}, metrics {sorted(run.data.metrics)}, "
          f"val_loss {[round(m.value, 6) for m in val]}")
