"""Multi-process training with each bundle's ``configs/multi_gpu_train.json`` (DDP), run on CPU with gloo.

The training command is the documented one, ``torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run
--config_file "['train.json','multi_gpu_train.json']"``, with 2 processes on the CPU. Checks:

- it trains, and ``model.pt``, the resumable checkpoint, ``calibration.json`` and TensorBoard files are written by
  rank 0 only;
- the validation metric gathered over 2 processes, with 5 validation images (odd, so the shards are uneven: 3 and 2,
  and with small validation batches the ranks also run different numbers of iterations), equals a single-process
  evaluation of the same saved weights, and so do the calibration thresholds;
- :func:`medad_monai.engine.distributed.all_gather_uneven` with 2 real gloo processes.

The calibration pass of the 2-process run needs ``CalibrationHandler`` to gather shards of different lengths once, at
the end (``all_gather_uneven``); a per-iteration ``idist.all_gather`` stops gloo with "Received data size doesn't
match expected size" when the shards differ.

torchrun gives every process ``OMP_NUM_THREADS=1``; the single-process reference runs with one thread too, because a
different CPU thread count changes float32 reduction order (measured: 5e-8 on MemMC-MAE's val_loss with 2 threads).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from _bundle_cli import tiny
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = ("memmc_mae", "morphaeus")
N_VAL = 5
EPOCHS = 2

TINY = {
    "memmc_mae": tiny("memmc_mae", batch_size=4, num_workers=0, warmup_epochs=1, progress_bar=False),
    "morphaeus": tiny(
        "morphaeus", batch_size=4, num_workers=0, warmup_epochs=1, perceptual_weight=0, progress_bar=False
    ),
}

# Validation batch size per bundle. MemMC-MAE's eval forward picks the fixed mask of a sample from its position in the
# batch (``arange(batch) % K``), so its val_loss depends on how images are batched; with batches of 1 every image
# gets mask 0 in both runs and the comparison isolates the cross-rank reduction. MorphAEus' criterion is per image,
# so it uses batches of 2 (rank 0: 2 + 1 images, rank 1: 2; single process: 2 + 2 + 1).
VAL_BATCH = {"memmc_mae": 1, "morphaeus": 2}

# Extra configs used only by these tests. They record metrics to JSON; everything else comes from the bundle files.
RECORD_TRAIN = {
    "validate#dataloader#batch_size": None,  # set per bundle
    "+run": [
        "$medad_monai.engine.bundle_utils.write_json({'val_loss': @validate#evaluator.state.best_metric, "
        "'best_epoch': @validate#evaluator.state.best_metric_epoch, 'n_local': len(@validate#dataloader.sampler)}, "
        "@output_dir + '/record/rank' + os.environ['RANK'] + '.json')"
    ],
}
EVAL_SINGLE = {
    # train.json imports the losses package only through the loss component, which an evaluation never builds
    "+imports": ["$import medad_monai.losses"],
    "validate#dataloader#batch_size": None,  # set per bundle
    "validate#handlers": [
        {
            "_target_": "CheckpointLoader",
            "load_path": "$@ckpt_dir + '/model.pt'",
            "load_dict": {"model": "@network_def"},
        }
    ],
    "run": [
        "$@validate#evaluator.run()",
        "$medad_monai.engine.bundle_utils.write_json({'val_loss': @validate#evaluator.state.metrics['val_loss']}, "
        "@output_dir + '/single.json')",
        "$@calibrate#evaluator.run()",
    ],
}


def _configs(bundle: str) -> str:
    return os.path.join(ROOT, "bundles", bundle, "configs")


def _cli_value(v) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, tuple)) else str(v)


def _torchrun(bundle: str, configs: list[str], cwd, timeout: int = 300, **overrides) -> str:
    """The documented multi-process command; returns its output (stdout + stderr)."""
    cdir = _configs(bundle)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["-m", "monai.bundle", "run"]
    cmd += ["--config_file", "[" + ",".join(repr(os.path.join(cdir, c)) for c in configs) + "]"]
    cmd += ["--meta_file", os.path.join(cdir, "metadata.json"), "--logging_file", os.path.join(cdir, "logging.conf")]
    for k, v in {**TINY[bundle], **overrides}.items():
        cmd += [f"--{k}", _cli_value(v)]
    proc = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{proc.stdout[-5000:]}\nSTDERR:\n{proc.stderr[-8000:]}"
    return proc.stdout + proc.stderr


def _run_single_process(bundle: str, configs: list[str], **overrides) -> None:
    """``monai.bundle.run`` in this process with one CPU thread, as torchrun gives each worker (OMP_NUM_THREADS=1).

    In-process saves a second interpreter start; the RNG state and thread count of the test process are restored.
    """
    import random

    import numpy as np
    from monai.bundle import run

    cdir = _configs(bundle)
    threads, rng = torch.get_num_threads(), (torch.get_rng_state(), np.random.get_state(), random.getstate())
    torch.set_num_threads(1)
    try:
        run(
            run_id="run",
            config_file=[os.path.join(cdir, c) for c in configs],
            meta_file=os.path.join(cdir, "metadata.json"),
            logging_file=False,
            **{**TINY[bundle], **overrides},
        )
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])


def _write(obj: dict, path) -> str:
    with open(path, "w") as f:
        json.dump(obj, f, indent=4)
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from medad_monai.data.phantoms import generate_demo_dataset

    d = tmp_path_factory.mktemp("phantoms")
    generate_demo_dataset(str(d), n_train=16, n_val=N_VAL, n_test_normal=2, n_test_abnormal=2, size=64, seed=7)
    return str(d)


def _gather_worker(rank: int, world: int, init_file: str, queue) -> None:
    from medad_monai.engine.distributed import all_gather_uneven

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = 3 if rank == 0 else 2
        values = torch.arange(n, dtype=torch.float64) + 10 * rank
        maps = torch.full((n, 1, 2, 2), float(rank))
        flags = torch.tensor([rank == 0] * n)
        empty = torch.zeros((0 if rank == 1 else 1), 4)
        out = [all_gather_uneven(t) for t in (values, maps, flags, empty)]
        queue.put((rank, [(o.dtype, o.tolist()) for o in out]))
    finally:
        dist.destroy_process_group()


def test_all_gather_uneven(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "store"), queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    assert results[0] == results[1]
    (d_values, values), (_, maps), (d_flags, flags), (_, empty) = results[0]
    assert d_values == torch.float64 and values == [0.0, 1.0, 2.0, 10.0, 11.0]
    assert torch.tensor(maps).shape == (5, 1, 2, 2) and torch.tensor(maps)[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1]
    assert d_flags == torch.bool and flags == [True, True, True, False, False]
    assert torch.tensor(empty).shape == (1, 4)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_ddp_training_matches_single_process(bundle, dataset, tmp_path):
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    val_batch = {"validate#dataloader#batch_size": VAL_BATCH[bundle]}
    record = _write({**RECORD_TRAIN, **val_batch}, tmp_path / "record_train.json")
    common = dict(dataset_dir=dataset, ckpt_dir=str(ckpt), output_dir=str(out))

    log = _torchrun(bundle, ["train.json", "multi_gpu_train.json", record], tmp_path, max_epochs=EPOCHS, **common)

    # trained, and every file written once, by rank 0
    assert sorted(os.listdir(ckpt)) == sorted(["model.pt", f"checkpoint_epoch={EPOCHS}.pt", "calibration.json"])
    events = glob.glob(str(out / "runs" / "events.out.tfevents.*"))
    writer_pids = {os.path.basename(e).split(".")[-2] for e in events}
    assert events and len(writer_pids) == 1, f"TensorBoard files from several processes: {events}"
    assert log.count(f"Calibration on {N_VAL} healthy images") == 1, "calibration must be logged once, by rank 0"
    assert len(re.findall(rf"Epoch\[{EPOCHS}\] Metrics -- val_loss", log)) == 1, "StatsHandler must run on rank 0 only"

    ranks = [json.loads((out / "record" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["n_local"] for r in ranks) == [2, 3], f"validation shards are not 3 + 2 images: {ranks}"
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"], f"ranks disagree on the gathered val_loss: {ranks}"
    multi_cal = json.loads((ckpt / "calibration.json").read_text())

    # the same saved weights (model.pt = best epoch, whose val_loss is best_metric), one process, all 5 images
    single_cfg = _write({**EVAL_SINGLE, **val_batch}, tmp_path / "eval_single.json")
    single_cal_path = tmp_path / "single_calibration.json"
    _run_single_process(bundle, ["train.json", single_cfg], calibration_file=str(single_cal_path), **common)
    single = json.loads((out / "single.json").read_text())
    single_cal = json.loads(single_cal_path.read_text())

    print(
        f"\n{bundle}: val_loss 2 processes {ranks[0]['val_loss']!r} (best epoch {ranks[0]['best_epoch']}), "
        f"1 process {single['val_loss']!r}; image threshold {multi_cal['image_threshold']!r} vs "
        f"{single_cal['image_threshold']!r}; pixel threshold {multi_cal['pixel_threshold']!r} vs "
        f"{single_cal['pixel_threshold']!r}"
    )
    assert abs(ranks[0]["val_loss"] - single["val_loss"]) <= 1e-6, (ranks, single)
    assert multi_cal["n_images"] == single_cal["n_images"] == N_VAL
    assert multi_cal["n_pixels"] == single_cal["n_pixels"] == N_VAL * 32 * 32
    for key in ("image_threshold", "pixel_threshold"):
        tol = 1e-6 * max(1.0, abs(single_cal[key]))
        assert abs(multi_cal[key] - single_cal[key]) <= tol, (key, multi_cal, single_cal)
