"""Each bundle's metadata passes ``python -m monai.bundle verify_metadata`` offline (schema copy in eval/)."""

from __future__ import annotations

import os
import subprocess
import sys

import _bundle_cli
import pytest


@pytest.mark.parametrize("bundle", ["morphaeus", "memmc_mae"])
def test_verify_metadata_offline(bundle):
    root = os.path.join(_bundle_cli.ROOT, "bundles", bundle)
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json"]
    cmd += ["--filepath", "eval/schema.json"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "skipped downloading" in out and "metadata is verified with no error" in out
