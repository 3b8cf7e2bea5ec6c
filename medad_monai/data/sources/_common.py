"""Shared steps of the ``prepare_<source>`` commands: grey 8-bit and RGB 8-bit conversion, downsampling, a
deterministic PNG encoder (grey and RGB), sha256 manifests, output-folder safety and split checks.

Bit-identical output: the PNG bytes written here depend only on the pixel array, numpy and Python's ``zlib``
(level 9, one IDAT chunk, no timestamps or other metadata chunks), not on Pillow's encoder or its settings, so a
rebuild on another machine reproduces the committed files as long as its zlib is the classic zlib (CPython on Linux
links the system zlib; a zlib-ng build would compress differently while still decoding to the same pixels).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medad_monai.io.outputs import sha256_file  # noqa: F401 - re-exported: the sources' manifests use it

__all__ = [
    "MAX_SIZE",
    "to_gray8",
    "downsample",
    "encode_png_gray8",
    "write_png_gray8",
    "to_rgb8",
    "encode_png_rgb8",
    "write_png_rgb8",
    "sha256_file",
    "write_manifest",
    "read_manifest",
    "prepare_out_dir",
    "check_patient_disjoint",
    "rel_posix",
]

#: longest side of every committed image (pixels).
MAX_SIZE = 256


def to_gray8(img) -> np.ndarray:
    """A PIL image as a ``(H, W)`` uint8 array.

    8-bit modes go through Pillow's ``convert("L")`` (ITU-R BT.601 luminance for RGB, the alpha channel dropped);
    16/32-bit integer and float images are min-max scaled to 0..255 (rounded), as :mod:`medad_monai.data.readers`
    scales them for the models.
    """
    mode = img.mode
    if mode in ("L", "1", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"Unsupported image mode {mode!r} with shape {arr.shape}.")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_rgb8(img) -> np.ndarray:
    """A PIL image as an ``(H, W, 3)`` uint8 array (Pillow's ``convert("RGB")``: grey repeated, alpha dropped)."""
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def downsample(arr: np.ndarray, max_size: int = MAX_SIZE) -> np.ndarray:
    """Shrinks a ``(H, W)`` or ``(H, W, 3)`` uint8 image so that its longest side is at most ``max_size`` (aspect
    ratio kept, sides rounded, Pillow's Lanczos filter); smaller images are returned unchanged (never upsampled)."""
    from PIL import Image

    h, w = arr.shape[:2]
    if max(h, w) <= max_size:
        return arr
    scale = max_size / float(max(h, w))
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    pil = Image.fromarray(arr, mode="L") if arr.ndim == 2 else Image.fromarray(arr)
    return np.asarray(pil.resize(size, Image.LANCZOS), dtype=np.uint8).copy()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _encode_png(a: np.ndarray, colour_type: int) -> bytes:
    """PNG bytes of a uint8 ``(H, W)`` (colour type 0) or ``(H, W, 3)`` (colour type 2) array: bit depth 8, no
    interlace, no ancillary chunks. Each row gets the PNG filter (None, Sub, Up, Average, Paeth) with the smallest sum
    of absolute filtered values (the usual heuristic of the PNG specification), then the whole stream is deflated with
    zlib level 9."""
    h, w = a.shape[:2]
    bpp = 1 if a.ndim == 2 else a.shape[2]  # bytes per pixel: the distance of the "left" neighbour
    x = a.reshape(h, w * bpp).astype(np.int16)
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    up = np.zeros_like(x)
    up[1:] = x[:-1]
    upleft = np.zeros_like(x)
    upleft[1:, bpp:] = x[:-1, :-bpp]
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    filtered = np.stack([x, x - left, x - up, x - (left + up) // 2, x - paeth]).astype(np.uint8)  # wraps mod 256
    cost = np.abs(filtered.astype(np.int8).astype(np.int32)).sum(axis=2)  # (5, H)
    choice = cost.argmin(axis=0)
    rows = filtered[choice, np.arange(h)]
    raw = np.concatenate([choice.astype(np.uint8)[:, None], rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def encode_png_gray8(arr: np.ndarray) -> bytes:
    """PNG bytes of a ``(H, W)`` uint8 array (colour type 0, bit depth 8, no interlace, no ancillary chunks).

    Each row gets the PNG filter (None, Sub, Up, Average, Paeth) with the smallest sum of absolute filtered values
    (the usual heuristic of the PNG specification), then the whole stream is deflated with zlib level 9.
    """
    a = np.ascontiguousarray(arr)
    if a.dtype != np.uint8 or a.ndim != 2 or a.size == 0:
        raise ValueError(f"encode_png_gray8 expects a non-empty (H, W) uint8 array, got {a.dtype} {a.shape}.")
    return _encode_png(a, 0)


def encode_png_rgb8(arr: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W, 3)`` uint8 array (colour type 2, 8 bits a channel); same filters and compression as
    :func:`encode_png_gray8`, so the bytes depend only on the pixels."""
    a = np.ascontiguousarray(arr)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.size == 0:
        raise ValueError(f"encode_png_rgb8 expects a non-empty (H, W, 3) uint8 array, got {a.dtype} {a.shape}.")
    return _encode_png(a, 2)


def write_png_gray8(path: str | os.PathLike, arr: np.ndarray) -> str:
    """Writes ``arr`` with :func:`encode_png_gray8` (creating folders) and returns the sha256 of the bytes."""
    data = encode_png_gray8(arr)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_png_rgb8(path: str | os.PathLike, arr: np.ndarray) -> str:
    """Writes ``arr`` with :func:`encode_png_rgb8` (creating folders) and returns the sha256 of the bytes."""
    data = encode_png_rgb8(arr)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_manifest(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> Path:
    """CSV with a header, ``\\n`` line ends and the rows in the given order (byte-stable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), lineterminator="\n", extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def prepare_out_dir(out_dir: str | os.PathLike, owned: Iterable[str] = ("images",)) -> Path:
    """Creates ``out_dir``; a folder written before by a prepare command (it holds ``manifest.csv``) has its
    ``owned`` sub-folders removed first, so no stale image survives a rebuild. A non-empty folder without a
    manifest is refused rather than written into."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"Output '{out}' exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "manifest.csv").is_file():
            raise FileExistsError(
                f"Output folder '{out}' is not empty and holds no manifest.csv of an earlier prepare run; "
                "give an empty or new folder."
            )
        for name in owned:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_patient_disjoint(patients_by_section: Mapping[str, Iterable[str]]) -> None:
    """Raises ``AssertionError`` naming the sections and a patient if two sections share a patient."""
    names = list(patients_by_section)
    sets = {k: set(v) for k, v in patients_by_section.items()}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = sets[a] & sets[b]
            if common:
                raise AssertionError(
                    f"Sections '{a}' and '{b}' share {len(common)} patient(s), e.g. {sorted(common)[0]!r}."
                )


def rel_posix(path: str | os.PathLike, start: str | os.PathLike) -> str:
    """``path`` relative to ``start`` with forward slashes, or absolute when no relative path exists."""
    path = os.path.abspath(str(path))
    try:
        return Path(os.path.relpath(path, os.path.abspath(str(start)))).as_posix()
    except ValueError:
        return Path(path).as_posix()
