"""Writes a MONAI Label app folder for the medad-monai bundles (no ``monailabel`` import needed).

Layout made by :func:`init_app`::

    <app_dir>/main.py            imports medad_monai.apps.label.main.MedADApp (MONAI Label looks for the app class here)
    <app_dir>/model/<name>/      a link to (or a copy of) each bundle folder

Linking keeps one copy of the bundle: weights trained through MONAI Label land in the bundle's own ``models/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence

__all__ = ["init_app", "main"]

MAIN_PY = '''"""MONAI Label app entry point written by `python -m medad_monai.apps.label init`."""

from medad_monai.apps.label.main import MedADApp  # noqa: F401  (MONAI Label picks the MONAILabelApp subclass in main.py)
'''


def init_app(app_dir: str, bundles: Sequence[str], copy: bool = False, force: bool = False) -> dict[str, str]:
    """Creates (or updates) ``app_dir`` with ``main.py`` and ``model/<name>`` for each bundle.

    Args:
        app_dir: the app folder to write.
        bundles: bundle folders (each with ``configs/inference.json``); ``name=path`` picks the served name,
            otherwise it is the folder's name.
        copy: copy the bundles instead of symlinking them.
        force: replace an existing ``model/<name>``.

    Returns:
        ``{name: path inside the app}``.

    Raises:
        FileNotFoundError: a bundle folder lacks ``configs/inference.json``.
        FileExistsError: ``model/<name>`` exists and points elsewhere (without ``force``).

    Example::

        >>> init_app("/tmp/medad_app", ["bundles/memmc_mae", "bundles/morphaeus"])
        {'memmc_mae': '/tmp/medad_app/model/memmc_mae', 'morphaeus': '/tmp/medad_app/model/morphaeus'}
    """
    app_dir = os.path.abspath(app_dir)
    model_dir = os.path.join(app_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(app_dir, "main.py"), "w") as f:
        f.write(MAIN_PY)
    out = {}
    for spec in bundles:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        src = os.path.abspath(os.path.expanduser(path))
        name = name or os.path.basename(os.path.normpath(src))
        if not os.path.isfile(os.path.join(src, "configs", "inference.json")):
            raise FileNotFoundError(f"medad_monai.apps.label: {src} is not a bundle (no configs/inference.json).")
        dst = os.path.join(model_dir, name)
        if os.path.lexists(dst):
            same = os.path.islink(dst) and os.path.realpath(dst) == os.path.realpath(src)
            if same and not copy:
                out[name] = dst
                continue
            if not force:
                raise FileExistsError(f"medad_monai.apps.label: {dst} exists; pass --force to replace it.")
            if os.path.islink(dst) or os.path.isfile(dst):
                os.unlink(dst)
            else:
                shutil.rmtree(dst)
        if copy:
            shutil.copytree(src, dst, symlinks=False)
        else:
            os.symlink(src, dst, target_is_directory=True)
        out[name] = dst
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medad_monai.apps.label", description="Set up a MONAI Label app folder serving medad-monai bundles."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write <app_dir>/main.py and link bundles into <app_dir>/model/")
    p.add_argument("app_dir")
    p.add_argument("bundles", nargs="+", help="bundle folders; NAME=PATH to serve one under another name")
    p.add_argument("--copy", action="store_true", help="copy the bundles instead of symlinking them")
    p.add_argument("--force", action="store_true", help="replace existing model/<name> entries")
    args = parser.parse_args(argv)
    made = init_app(args.app_dir, args.bundles, copy=args.copy, force=args.force)
    for name, path in made.items():
        print(f"{name}: {path} -> {os.path.realpath(path)}")
    print(
        f"Start: monailabel start_server --app {os.path.abspath(args.app_dir)} --studies <images> "
        f"--conf models {','.join(made)} --host 127.0.0.1 --port 8000\n"
        "(inference only; add --conf profile train to annotate and train through the server, and read "
        "docs/monailabel.md \"Security\" before binding to anything but 127.0.0.1)"
    )
    return 0
