"""Resuming reads checkpoints with ``torch.load(weights_only=True)``: a planted pickle is refused, not run."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from medad_monai.engine.handlers import load_resume_checkpoint


class _Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint_epoch=999.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    with pytest.raises(ValueError, match="Refusing to resume from .*checkpoint_epoch=999.pt"):
        load_resume_checkpoint(str(path))
    assert not marker.exists()


def test_plain_training_state_loads(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "trainer": {"epoch": 2, "iteration": 10, "max_epochs": 5, "epoch_length": 5},
    }
    path = tmp_path / "checkpoint_epoch=2.pt"
    torch.save(state, path)
    loaded = load_resume_checkpoint(str(path))
    assert loaded["trainer"]["epoch"] == 2
    assert torch.equal(loaded["model"]["weight"], net.state_dict()["weight"])


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "checkpoint_epoch=1.pt"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict()}, path)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(ValueError, match="checkpoint_epoch=1.pt"):
        load_resume_checkpoint(str(path))


def test_weights_loader_names_a_damaged_or_foreign_file(tmp_path):
    from ignite.engine import Engine

    from medad_monai.engine.checkpoints import WeightsLoader

    def run(path, model):
        engine = Engine(lambda e, b: None)
        WeightsLoader(str(path), {"model": model}).attach(engine)
        engine.run([0], max_epochs=1)

    net, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    run(path, other)
    assert torch.equal(other.weight, net.weight)  # loads as MONAI's CheckpointLoader does

    with pytest.raises(RuntimeError, match=r"Cannot load the weights .*model\.pt .*other network settings"):
        run(path, torch.nn.Linear(4, 2))  # weights of another architecture

    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(ValueError, match=r"model\.pt is damaged \(\d+ bytes; truncated or empty\)"):
        run(path, other)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"model\.pt is damaged \(0 bytes"):
        run(path, other)
    with pytest.raises(FileNotFoundError, match="absent.pt: train the bundle first"):
        run(tmp_path / "absent.pt", other)
