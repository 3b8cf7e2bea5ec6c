"""Runs bundle commands exactly as a user types them: ``python -m monai.bundle run ...`` in a subprocess.

One home for the command line the demo (:mod:`medad_monai.apps.demo`) and the paper-protocol evaluation
(:mod:`medad_monai.apps.paper_tasks`) build and run: the command is printed, its output goes to a log file, and a
failure raises with the log's last lines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["config_arg", "bundle_command", "run_logged"]


def config_arg(bundle_root: str, names: Sequence[str]) -> str:
    """``--config_file`` value for ``names`` in ``<bundle_root>/configs`` (a list literal for several files)."""
    paths = [os.path.join(bundle_root, "configs", n) for n in names]
    return paths[0] if len(paths) == 1 else "[" + ",".join(repr(p) for p in paths) + "]"


def bundle_command(bundle_root: str, configs: Sequence[str], run_id: str | None = None, **overrides) -> list[str]:
    """``python -m monai.bundle run [run_id] --config_file ... --meta_file ... --logging_file ... --key value...``."""
    cmd = [sys.executable, "-m", "monai.bundle", "run"]
    if run_id:
        cmd.append(run_id)
    cmd += [
        "--config_file",
        config_arg(bundle_root, configs),
        "--meta_file",
        os.path.join(bundle_root, "configs", "metadata.json"),
        "--logging_file",
        os.path.join(bundle_root, "configs", "logging.conf"),
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def run_logged(cmd: list[str], log_path: str) -> float:
    """Prints ``cmd``, runs it with its output appended to ``log_path``; returns the seconds it took.

    Raises:
        RuntimeError: the command failed; the message holds the log's last 40 lines.
    """
    print("$ " + " ".join(c if re.fullmatch(r"[\w./=:,+-]+", c) else f'"{c}"' for c in cmd), flush=True)
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-40:])
        raise RuntimeError(f"Command failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    print(f"  done in {dt:.1f} s (log: {log_path})", flush=True)
    return dt
