"""Exact resume: a training killed with SIGKILL and resumed ends where the uninterrupted run ends, bit for bit.

Both bundles run through the real ``python -m monai.bundle run`` CLI in a subprocess. The interrupted run is killed
(SIGKILL, no clean-up) as soon as its second epoch's checkpoint is on disk, i.e. somewhere in epoch 3; it is then
resumed with ``--resume True``. Final weights, ``model.pt`` (the best epoch's weights) and ``calibration.json`` must
equal those of the run that was never stopped. A second ``--resume True`` on the finished run does nothing and says so.

The best-model saver's state across a resume is also checked on ignite engines directly, with a validation sequence
where the epoch after the resume is worse than the best before it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import _bundle_cli
import pytest
import torch
from ignite.engine import Engine, Events

from medad_monai.engine.checkpoints import BestModelSaver, ResumableCheckpoint, RandomState
from medad_monai.data.phantoms import generate_demo_dataset
from medad_monai.engine.handlers import TrainerEarlyStop

EPOCHS = 4
SETTINGS = {
    # num_workers=2: worker seeds come from the restored generator too; shuffle is on in train.json
    "morphaeus": _bundle_cli.tiny("morphaeus", batch_size=4, num_workers=2, warmup_epochs=1, perceptual_weight=0.0,
                                  progress_bar=False, cache_rate=0.0),
    # MemMC-MAE draws a random mask for every training image: the generator state is what makes it resumable
    "memmc_mae": _bundle_cli.tiny("memmc_mae", batch_size=4, num_workers=2, warmup_epochs=1, progress_bar=False,
                                  cache_rate=0.0),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("phantoms")
    generate_demo_dataset(str(d), n_train=14, n_val=6, n_test_normal=2, n_test_abnormal=2, size=64, seed=11)
    return str(d)


def _command(bundle: str, ckpt, out, dataset: str, **extra) -> list[str]:
    cdir = _bundle_cli.configs_dir(bundle)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", os.path.join(cdir, "train.json"),
           "--meta_file", os.path.join(cdir, "metadata.json"), "--logging_file", os.path.join(cdir, "logging.conf")]
    settings = {**SETTINGS[bundle], "dataset_dir": dataset, "ckpt_dir": ckpt, "output_dir": out,
                "max_epochs": EPOCHS, **extra}
    for k, v in settings.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def _run(cmd, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max |diff| {(a[k].float() - b[k].float()).abs().max()})"


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["morphaeus", "memmc_mae"])
def test_sigkill_and_resume_is_bit_identical(bundle, dataset, tmp_path):
    ref_ckpt = tmp_path / "ref" / "models"
    _run(_command(bundle, ref_ckpt, tmp_path / "ref" / "out", dataset), tmp_path)

    ckpt = tmp_path / "killed" / "models"
    out = tmp_path / "killed" / "out"
    proc = subprocess.Popen(_command(bundle, ckpt, out, dataset), cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    target = ckpt / "checkpoint_epoch=2.pt"
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.exists() and proc.poll() is None, "the run ended (or stalled) before it could be killed in epoch 3"
    os.killpg(proc.pid, signal.SIGKILL)  # the data-loader workers too, as the OOM killer or a dead node would
    proc.wait()
    assert not (ckpt / "calibration.json").exists()

    log = _run(_command(bundle, ckpt, out, dataset, resume=True), tmp_path)
    assert "Resumed from" in log.stdout + log.stderr

    final = f"checkpoint_epoch={EPOCHS}.pt"
    _assert_same_tensors(_state(ref_ckpt / final)["model"], _state(ckpt / final)["model"], "final weights")
    _assert_same_tensors(_state(ref_ckpt / "model.pt"), _state(ckpt / "model.pt"), "model.pt")
    assert json.loads((ref_ckpt / "calibration.json").read_text()) == json.loads((ckpt / "calibration.json").read_text())
    assert sorted(os.listdir(ckpt)) == sorted(os.listdir(ref_ckpt))

    # a script that always passes --resume True can run again: nothing left to do, nothing rewritten
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.glob("*.pt")}
    again = _run(_command(bundle, ckpt, out, dataset, resume=True), tmp_path)
    assert "Nothing left to train" in again.stdout + again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.glob("*.pt")} == before


def _engines(values: list[float], weights: torch.nn.Linear, tmp_path, max_epochs: int, resume: bool):
    """A trainer whose epoch k sets the weights to k, validated by an engine that reports ``values[k - 1]``; set up
    as MONAI's ``SupervisedTrainer`` is (``max_epochs`` known before the handlers attach)."""

    def step(engine, batch):
        with torch.no_grad():
            weights.weight.fill_(float(engine.state.epoch))

    trainer = Engine(step)
    trainer.state.max_epochs, trainer.state.epoch_length = max_epochs, 1
    evaluator = Engine(lambda e, b: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1, -1

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(engine):
        engine.state.metrics["val_loss"] = values[trainer.state.epoch - 1]
        engine.state.epoch = trainer.state.epoch
        if engine.state.best_metric_epoch == -1 or engine.state.metrics["val_loss"] < engine.state.best_metric:
            engine.state.best_metric = engine.state.metrics["val_loss"]
            engine.state.best_metric_epoch = trainer.state.epoch

    saver = BestModelSaver(str(tmp_path), {"model": weights}, key_metric_name="val_loss")
    saver.attach(evaluator)
    early = TrainerEarlyStop(evaluator, patience=5, metric="val_loss")
    # the order of train.json: the checkpoint first, validation, then early stopping
    ResumableCheckpoint(str(tmp_path), {"model": weights, "best_model": saver}, resume=resume).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
    early.attach(trainer)
    return trainer, evaluator, early


def test_best_model_and_early_stop_survive_a_resume(tmp_path):
    values = [0.5, 0.3, 0.4, 0.35]
    trainer, _, _ = _engines(values, torch.nn.Linear(1, 1), tmp_path, max_epochs=2, resume=False)
    trainer.run([0])
    assert _state(tmp_path / "model.pt")["weight"].item() == 2.0

    trainer, evaluator, early = _engines(values, torch.nn.Linear(1, 1), tmp_path, max_epochs=4, resume=True)
    resumed = {}
    trainer.add_event_handler(Events.EPOCH_STARTED(once=3), lambda e: resumed.update(
        best=(evaluator.state.best_metric, evaluator.state.best_metric_epoch), early=(early.best, early.counter)))
    trainer.run([0])
    assert resumed == {"best": (0.3, 2), "early": (0.3, 0)}
    assert trainer.state.epoch == 4 and evaluator.state.epoch == 4
    # epochs 3 and 4 are worse than epoch 2: model.pt still holds epoch 2's weights
    assert _state(tmp_path / "model.pt")["weight"].item() == 2.0
    assert evaluator.state.best_metric == 0.3 and early.counter == 2


def test_an_fp16_runs_gradient_scaler_is_saved_and_resumed(tmp_path):
    """MONAI's ``SupervisedTrainer`` creates its gradient scaler in ``run()`` (a CUDA one under ``--amp fp16``); the
    resumable checkpoint saves the scaler's loss scale and a resumed run continues from it, not from the default.
    CPU stand-in for the GPU: the trainer's scaler is a CPU ``GradScaler`` that doubles its scale every step, which
    MONAI's own amp iteration then drives (scale, step, update)."""
    from monai.engines import SupervisedTrainer

    def trainer(max_epochs: int, resume: bool) -> SupervisedTrainer:
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 1)
        data = [{"image": torch.rand(2, 4), "label": torch.rand(2, 1)} for _ in range(3)]
        t = SupervisedTrainer(
            device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=data, network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.01), loss_function=torch.nn.MSELoss(), amp=True,
        )
        t.add_event_handler(Events.STARTED, lambda e: setattr(
            e, "scaler", torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)))
        ResumableCheckpoint(str(tmp_path), {"model": net}, resume=resume).attach(t)
        return t

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's CUDA autocast and scaler warn on a machine without CUDA
        first = trainer(max_epochs=1, resume=False)
        first.run()
        assert first.scaler.get_scale() == 2.0**7  # 3 steps, each doubling
        assert _state(tmp_path / "checkpoint_epoch=1.pt")["grad_scaler"]["scale"] == 2.0**7
        resumed = trainer(max_epochs=2, resume=True)
        resumed.run()
    assert resumed.state.epoch == 2 and resumed.scaler.get_scale() == 2.0**10


def test_random_state_round_trip_loads_weights_only(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3), np.random.normal()
    state = RandomState().state_dict()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    RandomState().load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_resume_after_early_stop_trains_nothing(tmp_path, caplog):
    values = [0.5, 0.6, 0.7, 0.8]
    trainer, _, early = _engines(values, torch.nn.Linear(1, 1), tmp_path, max_epochs=4, resume=False)
    early.patience = 1
    trainer.run([0])
    assert trainer.state.epoch == 2 and early.counter == 1

    trainer, _, early = _engines(values, torch.nn.Linear(1, 1), tmp_path, max_epochs=4, resume=True)
    early.patience = 1
    epochs = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    with caplog.at_level("INFO", logger="medad_monai"):
        trainer.run([0])
    assert epochs == [] and "Nothing left to train: this run stopped early" in caplog.text
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint_epoch=2.pt", "model.pt"]


class _Payload:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_planted_checkpoint_is_refused_by_the_cli(dataset, tmp_path):
    import pickle

    ckpt = tmp_path / "models"
    ckpt.mkdir()
    marker = tmp_path / "payload_ran"
    with open(ckpt / "checkpoint_epoch=999.pt", "wb") as f:
        pickle.dump({"model": _Payload(str(marker)), "trainer": {"epoch": 999}}, f)
    cmd = _command("morphaeus", ckpt, tmp_path / "out", dataset, resume=True)
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Refusing to resume from" in proc.stdout + proc.stderr and "checkpoint_epoch=999.pt" in proc.stderr
    assert not marker.exists()
