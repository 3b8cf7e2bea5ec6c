"""Runs a bundle's configs through the real ``python -m monai.bundle run`` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def configs_dir(bundle: str) -> str:
    return os.path.join(ROOT, "bundles", bundle, "configs")


def bundle_run(bundle: str, cwd, configs, run_id=None, timeout=600, bundle_dir=None, **overrides) -> subprocess.CompletedProcess:
    """``monai.bundle run`` of ``configs`` (names in the bundle's configs folder: the project's ``bundles/<bundle>``,
    or the copy at ``bundle_dir``) with ``--key value`` overrides; asserts exit status 0."""
    cdir = os.path.join(str(bundle_dir), "configs") if bundle_dir is not None else configs_dir(bundle)
    cfg = "[" + ",".join(repr(os.path.join(cdir, n)) for n in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else [])
    cmd += ["--config_file", cfg, "--meta_file", os.path.join(cdir, "metadata.json")]
    cmd += ["--logging_file", os.path.join(cdir, "logging.conf")]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


# Tiny architectures of both bundles (the same keys exist in train.json and inference.json, so a model.pt trained
# with them loads into the inference network too); tests add their run-time overrides with `tiny(...)`.
TINY_NETWORKS = {
    "memmc_mae": {
        "spatial_size": [32, 32],
        "patch_size": 8,
        "hidden_size": 32,
        "mlp_dim": 64,
        "num_layers": 2,
        "num_heads": 2,
        "decoder_hidden_size": 32,
        "decoder_mlp_dim": 64,
        "decoder_num_layers": 1,
        "decoder_num_heads": 2,
        "num_memory_slots": 4,
    },
    "morphaeus": {"spatial_size": [32, 32], "network_channels": [8, 16, 32, 64, 64]},
}


def tiny(bundle: str, **overrides) -> dict:
    """The tiny network overrides of ``bundle`` plus ``overrides``."""
    return {**TINY_NETWORKS[bundle], **overrides}
