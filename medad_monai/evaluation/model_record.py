"""What a calibration was fitted for, so that a model run with other settings is refused instead of mislabelling.

A fully convolutional MorphAEus trained at 64×64 loads without complaint into the same network built for 128×128, and
a ``calibration.json`` copied next to another bundle's ``model.pt`` would be read as if it belonged there: both give
every image the same label, silently. :func:`network_record` describes the network and its input when the
calibration is fitted (stored as ``calibration.json["model"]``); :func:`check_network_record` compares a run with it
before the first result is written and refuses with both values and the command that fixes it.

The record holds the network's class, a fingerprint of its parameter and buffer names and shapes (architecture
settings such as channels, depth, patch size or memory slots change it; the weights' values do not), the parameter
count and the input shape ``(channels, height, width)``; the bundle (:func:`bundle_identity`: ``metadata.json``
name and version), checked by name (a version bump keeps a calibration valid); and, for the reader, a fingerprint of
the calibration image list (:func:`list_fingerprint`) and the versions that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from medad_monai.engine.distributed import unwrap_network

__all__ = [
    "network_record",
    "check_network_record",
    "ModelRecordMismatch",
    "bundle_identity",
    "item_hash",
    "list_fingerprint",
    "fingerprint_of",
]


class ModelRecordMismatch(ValueError):
    """The run's network or input differs from what the calibration was fitted for."""


def _inner(network: torch.nn.Module) -> torch.nn.Module:
    net = unwrap_network(network)
    inner = getattr(net, "model", None)  # AnomalyMapNet wraps the reconstruction network
    return inner if isinstance(inner, torch.nn.Module) else net


def network_record(network: torch.nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """The record of ``network`` (unwrapped from DDP and :class:`~medad_monai.networks.AnomalyMapNet`) fed inputs of
    ``input_shape`` = ``(channels, height, width)``."""
    net = _inner(network)
    lines = [f"{k}:{tuple(v.shape)}" for k, v in net.state_dict().items()]
    return {
        "network": type(net).__name__,
        "fingerprint": hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16],
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
        "input_shape": [int(s) for s in input_shape],
    }


def bundle_identity(bundle_root: str | os.PathLike | None) -> dict[str, str] | None:
    """``{"name", "version"}`` of the bundle at ``bundle_root`` (its ``configs/metadata.json``), or ``None`` when
    there is none (a network used outside a bundle)."""
    if not bundle_root:
        return None
    try:
        with open(os.path.join(os.fspath(bundle_root), "configs", "metadata.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    name = meta.get("name") if isinstance(meta, dict) else None
    return {"name": str(name), "version": str(meta.get("version", "unknown"))} if name else None


#: hashes per item of :func:`list_fingerprint` are this many bits, so a sum over a million items fits in int64
_ITEM_BITS = 40


def item_hash(item: str) -> int:
    """The per-item part of :func:`list_fingerprint` (summed, so ranks can add their shards' sums)."""
    return int(hashlib.sha256(str(item).encode()).hexdigest()[: _ITEM_BITS // 4], 16)


def list_fingerprint(n_items: int, hash_sum: int) -> dict[str, Any]:
    """``{"n_items", "fingerprint"}`` of a list of items (image paths) from their count and the sum of their
    :func:`item_hash`: independent of order and of how the list was sharded across ranks, so the same calibration
    list gives the same fingerprint on one process or many."""
    digest = hashlib.sha256(f"{int(n_items)}:{int(hash_sum)}".encode()).hexdigest()[:16]
    return {"n_items": int(n_items), "fingerprint": digest}


def fingerprint_of(items: Iterable[str]) -> dict[str, Any]:
    """:func:`list_fingerprint` of ``items`` in one process."""
    items = list(items)
    return list_fingerprint(len(items), sum(item_hash(i) for i in items))


def _describe(record: dict[str, Any]) -> str:
    shape = "×".join(str(s) for s in record.get("input_shape", [])) or "?"
    return (f"{record.get('network', '?')} on {shape} inputs ({record.get('n_parameters', '?')} parameters, "
            f"fingerprint {record.get('fingerprint', '?')})")


def check_network_record(
    record: dict[str, Any] | None,
    network: torch.nn.Module,
    input_shape: Sequence[int] | None,
    source: str = "the calibration",
    bundle: dict[str, str] | None = None,
) -> None:
    """Refuses a run whose network or input differs from ``record``; a missing record (a calibration written before
    records existed) passes. ``input_shape=None`` (a configuration that keeps each image's own size) compares the
    network alone. ``bundle`` (:func:`bundle_identity` of the run) is compared by name with the record's.

    Raises:
        ModelRecordMismatch: naming what the calibration was fitted for, what this run uses, and the fix.
    """
    if not record:
        return
    theirs, ours = (record.get("bundle") or {}).get("name"), (bundle or {}).get("name")
    if theirs and ours and theirs != ours:
        raise ModelRecordMismatch(
            f"{source} was fitted for the bundle {theirs!r} (version {record['bundle'].get('version')}), but this run "
            f"is the bundle {ours!r} (version {bundle.get('version')}): it belongs to another model. Use the "
            f"calibration.json trained with this bundle's model.pt, or calibrate this one: python -m monai.bundle run "
            "calibration --config_file configs/train.json <the settings of the training>."
        )
    current = network_record(network, () if input_shape is None else input_shape)
    keys = ("network", "fingerprint") + (() if input_shape is None else ("input_shape",))
    if all(record.get(k) == current[k] for k in keys if k in record):
        return
    raise ModelRecordMismatch(
        f"{source} was fitted for {_describe(record)}, but this run uses {_describe(current)}: its thresholds (and, "
        "for another architecture or size, the weights) do not belong to this run, and every label would be wrong. "
        "Run with the settings the model was trained with (the same --spatial_size / --channels / network settings, "
        "or the same override file, e.g. --config_file \"['configs/inference.json','configs/demo.json']\"), or, to "
        "use these settings on purpose, re-calibrate with them: python -m monai.bundle run calibration "
        "--config_file configs/train.json <the same settings> (or, for a bundle evaluation, `run recalibrate` "
        "instead of `run`: re-fits the thresholds on the validation list with these settings, then evaluates)."
    )
