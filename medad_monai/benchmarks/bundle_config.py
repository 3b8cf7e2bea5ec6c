"""The bundles' own configurations, parsed in-process for the benchmark (so its figures follow the real bundles)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.bundle import ConfigParser

from medad_monai.apps.demo import bundles_dir

__all__ = ["CONFIGURATIONS", "bundle_parser", "config_files", "parsed"]

#: ``configuration -> extra config files`` on top of ``train.json`` / ``inference.json``: "paper" is the bundle's own
#: configuration, "demo" adds ``configs/demo.json`` (the 2-core CPU sizes of ``python -m medad_monai demo``).
CONFIGURATIONS: dict[str, tuple[str, ...]] = {"paper": (), "demo": ("demo.json",)}


def config_files(bundle: str, base: str, configuration: str) -> list[str]:
    """Paths of ``base`` (e.g. ``"train.json"``) plus the files of ``configuration`` in ``bundles/<bundle>/configs``."""
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"benchmark: configuration must be one of {sorted(CONFIGURATIONS)}, got {configuration!r}.")
    root = os.path.join(bundles_dir(), bundle)
    return [os.path.join(root, "configs", n) for n in (base, *CONFIGURATIONS[configuration])]


def bundle_parser(
    bundle: str, base: str, configuration: str, device: torch.device | str = "cpu", overrides: dict | None = None
) -> ConfigParser:
    """A parsed ``ConfigParser`` of ``bundles/<bundle>/configs/<base>`` (+ the configuration's files).

    Args:
        bundle: ``"morphaeus"`` or ``"memmc_mae"``.
        base: ``"train.json"`` or ``"inference.json"``.
        configuration: a key of :data:`CONFIGURATIONS`.
        device: replaces the config's ``device``.
        overrides: further ``id -> value`` replacements (as ``--id value`` on the bundle command line). The
            healthy map normalisation is off unless given here: it needs a calibration's statistics, which a timing
            run has not got, and costs one subtraction and one division per map pixel.

    Example::

        >>> parser = bundle_parser("morphaeus", "train.json", "demo")
        >>> parser.get_parsed_content("batch_size")
        8
    """
    files = config_files(bundle, base, configuration)
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = os.path.dirname(os.path.dirname(files[0]))
    parser["device"] = torch.device(device)
    for key, value in {"map_normalization": "none", **(overrides or {})}.items():
        parser[key] = value
    parser.parse()
    return parser


def parsed(parser: ConfigParser, keys: Sequence[str]) -> dict:
    """``key -> parsed value`` for the given plain settings of a parser."""
    return {k: parser.get_parsed_content(k) for k in keys}
