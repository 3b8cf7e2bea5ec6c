"""Checkpoints: exact resume of a training, safe loading, and the best-model saver whose state survives a resume.

A resumable checkpoint (``checkpoint_epoch=N.pt``, one per epoch, written atomically by ignite's ``DiskSaver``) holds
everything a training needs to continue as if it had never stopped:

- the network, the optimizer and any learning-rate scheduler (``state_dict`` of each);
- the trainer's epoch and iteration;
- the best-model saver (which validation value ``model.pt`` holds) and the validator's best metric, so the first
  validation after a resume does not overwrite a better ``model.pt``;
- early stopping (best value, validations without improvement);
- the random number generators (torch, CUDA, numpy, Python), so data-loader shuffling, worker seeds and random masks
  continue the same sequence.

It is written last among the trainer's end-of-epoch handlers, after validation and early stopping, so the state it
holds is the state the next epoch starts from. A training killed at any moment and resumed with ``--resume true``
therefore ends with the same weights, ``model.pt`` and ``calibration.json`` as the run that was never interrupted
(tested bit for bit on CPU, ``tests/test_exact_resume.py``).

Everything in it is a tensor, a number, a string or a container of those, so it loads with
``torch.load(weights_only=True)``: a planted file that would run code while unpickling is refused.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import random
import re
import zipfile
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader

__all__ = [
    "AtomicFileSaver",
    "RandomState",
    "BestModelSaver",
    "ResumableCheckpoint",
    "WeightsLoader",
    "load_resume_checkpoint",
    "check_weights_file",
    "latest_checkpoint",
    "checkpoint_epoch",
]

logger = logging.getLogger("medad_monai")

_EPOCH_RE = re.compile(r"(\d+)\.pt$")


def checkpoint_epoch(path: str) -> int:
    """The epoch number in a ``checkpoint_epoch=N.pt`` file name (-1 when there is none)."""
    m = _EPOCH_RE.search(os.path.basename(path))
    return int(m.group(1)) if m else -1


def latest_checkpoint(ckpt_dir: str, pattern: str = "checkpoint_*.pt") -> str:
    """The newest resumable checkpoint in ``ckpt_dir`` (highest trailing number), for ``--resume true``.

    Raises:
        FileNotFoundError: naming the folder, when it holds no checkpoint to resume from.
    """
    files = glob.glob(os.path.join(ckpt_dir, pattern))
    if not files:
        raise FileNotFoundError(
            f"--resume was requested but {os.path.abspath(ckpt_dir)} holds no '{pattern}' checkpoint; "
            "train once without --resume first (or point --ckpt_dir at the folder of the run to continue)."
        )
    return max(files, key=lambda p: (checkpoint_epoch(p), os.path.getmtime(p)))


def load_resume_checkpoint(path: str) -> dict[str, Any]:
    """A resumable checkpoint read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
    only, as :class:`ResumableCheckpoint` writes them. Anything else in the file (a pickled object that would run
    code while loading) is refused.

    Raises:
        ValueError: naming the file, when it holds more than weights and plain state or is not a checkpoint at all.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"Refusing to resume from {path}: it holds objects other than weights and plain training state, and "
            f"loading them could run code ({str(e).splitlines()[0][:200]}). Remove the file or point --ckpt_dir at "
            "the folder of the run to continue."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"Cannot resume from {path}: not a readable checkpoint ({type(e).__name__}: {e}).") from None
    if not isinstance(obj, dict):
        raise ValueError(f"Cannot resume from {path}: expected a dict of state dicts, found {type(obj).__name__}.")
    return obj


def check_weights_file(path: str) -> str:
    """``path`` when it is a complete ``torch.save`` file, else an error naming the file and the fix.

    ``torch.save`` writes a zip archive whose directory comes last, so a copy cut short (an interrupted download or
    disk-full write) has no readable directory; this is checked without reading the weights. Legacy (non-zip)
    files are passed on to ``torch.load``.

    Raises:
        FileNotFoundError: when there is no file; the message says to train first or to point ``--ckpt_dir`` at it.
        ValueError: when the file is empty or truncated, with its size.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No trained weights at {path}: train the bundle first (python -m monai.bundle run --config_file "
            "configs/train.json ...), or point --ckpt_dir at the folder holding model.pt."
        )
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if size == 0 or (magic[:2] == b"PK" and not zipfile.is_zipfile(path)):
        raise ValueError(
            f"The weights file {path} is damaged ({size} bytes; truncated or empty): copy it again, or re-run the "
            "training that wrote it."
        )
    return path


def load_error_detail(error: BaseException, limit: int = 400) -> str:
    """The informative part of a failed ``torch.load``/``load_state_dict``: torch's first line is only "Error(s) in
    loading state_dict for X:", the lines after it name the missing keys or the shapes on both sides (``size mismatch
    for pos_embed: copying a param with shape [1, 16, 32] from checkpoint, the shape in current model is [1, 64,
    32]``)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    detail = " ".join(lines[1:3]) if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
    return detail[:limit]


class WeightsLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (``weights_only=True``, same arguments) that names the file and the fix when it
    cannot load it: missing, truncated, or holding the weights of another network.

    Args:
        load_path: the weights file (``model.pt``).
        load_dict: ``{key: object}`` to load into, as for ``CheckpointLoader``.
        kwargs: passed to ``monai.handlers.CheckpointLoader`` (``strict``, ``map_location``, ...).
    """

    def __call__(self, engine: Engine) -> None:
        check_weights_file(self.load_path)
        try:
            super().__call__(engine)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            raise RuntimeError(
                f"Cannot load the weights {self.load_path} ({os.path.getsize(self.load_path)} bytes): "
                f"{load_error_detail(e)} The file is damaged or was trained with other network settings than this "
                "run's; pass the settings it was trained with (e.g. the same override file), or re-run the training."
            ) from e


class RandomState:
    """The random number generators as checkpoint state: torch (CPU and every CUDA device), numpy and Python.

    ``state_dict`` stores plain tensors and numbers only, so it loads with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss": gauss},
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class AtomicFileSaver(BaseSaveHandler):
    """ignite save handler that writes ``<name>`` whole or not at all: ``torch.save`` into ``.<name>.partial`` in the
    same folder, then ``os.replace``. A process killed while saving leaves the previous file intact.

    (MONAI's ``CheckpointSaver`` writes in place, ``atomic=False``, so a kill during a save leaves a truncated
    checkpoint that the next ``--resume`` would pick.)

    Args:
        dirname: the folder, created when missing.
        filename: a fixed file name (``model.pt``) written instead of the name ignite makes up; the previous file is
            then replaced, never removed first.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        self.dirname = str(dirname)
        self.filename = filename
        os.makedirs(self.dirname, exist_ok=True)

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        path = os.path.join(self.dirname, self.filename or filename)
        partial = os.path.join(self.dirname, f".{os.path.basename(path)}.partial")
        torch.save(checkpoint, partial)
        os.replace(partial, path)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            path = os.path.join(self.dirname, filename)
            if os.path.exists(path):
                os.remove(path)

    def remove_partial(self) -> None:
        """Deletes ``.*.partial`` files a killed run left behind."""
        for stale in glob.glob(os.path.join(self.dirname, ".*.partial")):
            os.remove(stale)


class BestModelSaver:
    """Writes ``model.pt`` whenever the validator's key metric improves, with a state that survives a resume.

    MONAI's ``CheckpointSaver(save_key_metric=True)`` remembers the best value only in memory, and the validator's
    ``best_metric`` restarts at -1: after a resume the first validation would overwrite ``model.pt`` even when it
    is worse, and log it as a new best. Put this saver in :class:`ResumableCheckpoint`'s ``save_dict`` and both are
    checkpointed and restored. It writes atomically (:class:`AtomicFileSaver`) and on rank 0 only, so distributed
    configs need not disable it.

    Args:
        save_dir: folder of ``model.pt``.
        save_dict: ``{"model": network}``.
        key_metric_name: the metric in ``engine.state.metrics``; default: the engine's key metric.
        key_metric_filename: the file name (``model.pt``).
        key_metric_negative_sign: ``True`` when lower is better (a validation loss).
    """

    def __init__(self, save_dir: str, save_dict: dict, key_metric_name: str | None = None,
                 key_metric_filename: str = "model.pt", key_metric_negative_sign: bool = True) -> None:
        from ignite.handlers import Checkpoint

        self.key_metric_name = key_metric_name
        self.sign = -1.0 if key_metric_negative_sign else 1.0
        self.checkpoint = Checkpoint(
            to_save=dict(save_dict), save_handler=AtomicFileSaver(save_dir, key_metric_filename),
            score_function=self._score, score_name="key_metric", n_saved=1,
        )
        self.engine: Engine | None = None

    def _score(self, engine: Engine) -> float:
        name = self.key_metric_name or engine.state.key_metric_name
        return self.sign * float(engine.state.metrics[name])

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        if idist.get_rank() == 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.checkpoint)

    def state_dict(self) -> dict[str, Any]:
        state = self.engine.state if self.engine is not None else None
        best = getattr(state, "best_metric", -1)
        return {
            "saved": self.checkpoint.state_dict(),
            "best_metric": float(best.item() if isinstance(best, torch.Tensor) else best),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.checkpoint.load_state_dict(state_dict["saved"])
        if self.engine is not None:
            self.engine.state.best_metric = state_dict["best_metric"]
            self.engine.state.best_metric_epoch = state_dict["best_metric_epoch"]


class ResumableCheckpoint:
    """Saves a resumable checkpoint every epoch and, with ``resume=True``, continues exactly from the newest one.

    The trainer, the random number generators and, under ``--amp fp16``, the trainer's gradient scaler (its loss
    scale) are added to ``save_dict`` by the handler itself (a JSON config cannot reference the trainer from inside
    its own handler list). Handlers attached to the trainer keep their own
    state in ``engine.state`` under a key they add to ``engine.state_dict_user_keys`` (ignite's mechanism; early
    stopping does), so it is saved with the trainer.

    Loading and saving are set up when the trainer starts, once every handler is attached: the checkpoint is the
    last end-of-epoch handler, so that epoch's validation, best model and early stopping are in it. Resuming a run
    that has reached ``max_epochs`` (or stopped early) trains nothing and says so, so a script can always pass
    ``--resume true``.

    Args:
        ckpt_dir: folder of ``checkpoint_epoch=N.pt`` files.
        save_dict: objects with ``state_dict``/``load_state_dict`` to save besides the trainer, e.g.
            ``{"model": net, "optimizer": opt, "best_model": best_model_saver}``.
        resume: load the newest checkpoint of ``ckpt_dir`` before training starts; the configured ``max_epochs``
            still applies, so ``--resume true --max_epochs 600`` extends a finished 500-epoch run.
        n_saved: how many resumable checkpoints to keep.
    """

    def __init__(self, ckpt_dir: str, save_dict: dict, resume: bool = False, n_saved: int = 1) -> None:
        self.ckpt_dir = ckpt_dir
        self.save_dict = dict(save_dict)
        self.resume = bool(resume)
        self.n_saved = n_saved
        self.loaded_from: str | None = None
        self._started = False

    def attach(self, engine: Engine) -> None:
        self._objects = {**self.save_dict, "rng": RandomState(), "trainer": engine}
        engine.add_event_handler(Events.STARTED, self._start)

    def _start(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint

        if self._started:
            return
        self._started = True
        # MONAI's trainers create their float16 gradient scaler in run(), after the handlers are attached; its loss
        # scale and growth tracker are training state, so that a resumed fp16 run goes on with the scale it had
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            self._objects["grad_scaler"] = scaler
        if self.resume:
            self._load(engine)
        if idist.get_rank() != 0:
            return
        files = AtomicFileSaver(self.ckpt_dir)
        files.remove_partial()
        saver = Checkpoint(to_save=self._objects, save_handler=files, filename_prefix="",
                           score_function=lambda e: e.state.epoch, score_name="epoch", n_saved=self.n_saved)
        engine.add_event_handler(Events.EPOCH_COMPLETED, saver)
        # the saver only tracks its own files; drop those left by the run we resumed from
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._prune)

    def _load(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint

        path = latest_checkpoint(self.ckpt_dir)
        checkpoint = load_resume_checkpoint(path)
        trainer_state = dict(checkpoint.get("trainer", {}))
        missing = sorted(k for k in self._objects if k not in checkpoint)
        missing += [f"trainer.{k}" for k in engine.state_dict_user_keys if k not in trainer_state]
        if missing:
            logger.warning(
                "%s holds no %s state (written by an older version of medad-monai): resuming without it, so the run "
                "may not continue exactly as it would have.", path, ", ".join(missing),
            )
        for k in engine.state_dict_user_keys:
            trainer_state.setdefault(k, getattr(engine.state, k))
        checkpoint["trainer"] = trainer_state
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load={k: v for k, v in self._objects.items() if k in checkpoint},
                                checkpoint=checkpoint)
        self.loaded_from = path
        if max_epochs is not None and engine.state.epoch >= max_epochs:
            logger.info(
                "Nothing left to train: %s is at epoch %d and --max_epochs is %d. Pass a larger --max_epochs to train "
                "on.", path, engine.state.epoch, max_epochs,
            )
        else:
            logger.info("Resumed from %s at epoch %d", path, engine.state.epoch)
        # ignite's loop then runs nothing when the loaded epoch is already the last one
        engine.state.max_epochs = max(max_epochs or 0, engine.state.epoch)

    def _prune(self, engine: Engine) -> None:
        files = sorted(glob.glob(os.path.join(self.ckpt_dir, "checkpoint_epoch=*.pt")), key=checkpoint_epoch)
        for old in files[: -self.n_saved]:
            os.remove(old)
