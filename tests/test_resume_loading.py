"""Resuming reads checkpoints with ``torch.load(weights_only=True)``: a planted pickle is refused, not run."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from medad_monai.handlers import load_resume_checkpoint


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
