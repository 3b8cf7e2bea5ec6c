"""A lesion-insertion test set on held-out **real** healthy chest radiographs: every lesion is synthetic, the anatomy,
texture and noise around it are real.

The healthy radiographs of a prepared source's ``test`` section (``data/real/kermany``: 100 children whose patient
keys never occur in ``training`` / ``validation``) are each used twice, as a matched pair: once as a **normal** test
image and once with one inserted lesion as an **abnormal** one. Both copies then go through their own random
acquisition: pose (rotation, scale, translation) and exposure (gamma, contrast, brightness, a little detector
noise), drawn from the same distribution for normals and abnormals, so neither the jitter nor the mere presence of
processing gives the label away; only the lesion does.

Lesion kinds (all our modelling choices; sizes in pixels of a 224 px image, scaled with the image):

- ``opacity``: a soft, patchy, consolidation-like blob inside a lung field, blended towards a smooth soft-tissue
  brightness, so it both brightens and attenuates the rib and vessel texture underneath (radius 8-12 / 13-20 /
  21-32 px for small / medium / large); envelope and patchiness as the phantoms' ``consolidation``.
- ``nodule``: a small, dense, round, slightly lobulated lesion in a lung field (radius 2.5-4 / 4-6 / 6-9 px),
  profile as the phantoms' ``nodule``.
- ``device``: a foreign body with a sharp, bright edge anywhere over the chest: a tube or wire (a bent line,
  1-2.5 px wide, 25-45 / 45-80 / 80-140 px long) or a ring (an ECG electrode with its snap; radius 3-4 / 5-7 /
  8-11 px).
- ``lucency``: a darker, texture-poor region inside a lung field (a bulla or cavity; radius 6-9 / 10-15 / 16-24 px),
  with a thin brighter wall in half of them.

Lung fields are not annotated in the source; lesions that belong in a lung are placed where a fixed prior of the two
lung regions of a frontal radiograph meets the darker half of the smoothed image (:func:`lung_field`), at a point
whose neighbourhood of the lesion's size lies inside it. Masks are the lesion's support as written (before the
acquisition jitter, then warped with the image; ``0``/``255``). Normal images have no mask file: they have no
lesion pixel, and the pixel metrics take a normal image without a mask as all zero.

Determinism: every image is a function of the seed, its role and index, and the source pixels (numpy only, float64,
no BLAS, no threads), written with the package's own PNG encoder, so the same source, seed and numpy version give
byte-identical files.

Output (``<out_dir>``, default ``data/real/kermany_lesions``)::

    images/normal/<source stem>.png, images/lesion/<source stem>.png   8-bit grey, the source's size
    masks/<source stem>.png                                            0/255, one per lesion image
    manifest.csv    one row per image: files, hashes, source, lesion kind/size/area and the acquisition parameters
    datalist.json   section ``test``: every image with label and lesion (``none`` or the kind); lesion images
                    also with mask and lesion_size
    README.md, LICENSE.txt

::

    python -m medad_monai prepare_lesion_task                    # data/real/kermany -> data/real/kermany_lesions
    python -m medad_monai real_benchmark_datalist                 # adds the section test_lesions
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..datalist import write_datalist
from ..phantoms import gaussian_blur_shifted, sigmoid, smoothstep
from ._common import (
    check_patient_disjoint,
    prepare_out_dir,
    read_manifest,
    sha256_file,
    write_manifest,
    write_png_gray8,
)
from .benchmark import real_data_dir

__all__ = [
    "INSERTED_LESION_KINDS",
    "LESION_SIZES",
    "LESION_TASK_VERSION",
    "lung_field",
    "insert_lesion",
    "acquisition_jitter",
    "prepare_lesion_task",
]

#: version of the lesion and acquisition models; recorded in the datalist and README.
LESION_TASK_VERSION = "1.0"
#: the inserted lesion kinds, in the order in which abnormal images are assigned.
INSERTED_LESION_KINDS: tuple[str, ...] = ("opacity", "nodule", "device", "lucency")
#: the size classes of every kind.
LESION_SIZES: tuple[str, ...] = ("small", "medium", "large")

#: the image side the size ranges below refer to (the committed Kermany images are 224 x 224).
_REF_SIDE = 224.0
# size class -> (low, high) radius or length in reference pixels
_RADIUS = {
    "opacity": {"small": (8, 12), "medium": (13, 20), "large": (21, 32)},
    "nodule": {"small": (2.5, 4), "medium": (4, 6), "large": (6, 9)},
    "lucency": {"small": (6, 9), "medium": (10, 15), "large": (16, 24)},
    "ring": {"small": (3, 4), "medium": (5, 7), "large": (8, 11)},
    "line": {"small": (25, 45), "medium": (45, 80), "large": (80, 140)},
}
# acquisition: the ranges every test image draws from (normals and abnormals alike)
_ROTATION_DEG = 5.0
_SCALE = (0.95, 1.05)
_SHIFT = 0.03  # of the image side
_GAMMA = (0.8, 1.25)
_CONTRAST = (0.9, 1.1)
_BRIGHTNESS = 0.04
_ROLE = {"normal": 1, "lesion": 2, "kinds": 3, "order": 4}


# ---------------------------------------------------------------------------------------------------- numpy helpers
# float64, shifted sums only (no BLAS, no FFT), so results do not depend on thread counts; the Gaussian blur and the
# smoothstep are the phantoms' (medad_monai.data.phantoms.gaussian_blur_shifted, smoothstep)


def _bilinear(a: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Samples ``a`` at fractional (row, col) positions (pixel centres at integers), mirrored outside."""
    h, w = a.shape

    def mirror(x: np.ndarray, n: int) -> np.ndarray:
        period = 2.0 * n
        x = np.mod(x + 0.5, period)
        return np.where(x >= n, period - x, x) - 0.5

    rows, cols = np.clip(mirror(rows, h), 0, h - 1), np.clip(mirror(cols, w), 0, w - 1)
    r0, c0 = np.floor(rows).astype(np.intp), np.floor(cols).astype(np.intp)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = rows - r0, cols - c0
    top = a[r0, c0] * (1.0 - fc) + a[r0, c1] * fc
    bottom = a[r1, c0] * (1.0 - fc) + a[r1, c1] * fc
    return top * (1.0 - fr) + bottom * fr


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """A smooth random field in [-1, 1] with about ``cells`` features across the longer side."""
    h, w = shape
    grid = rng.standard_normal((cells + 3, cells + 3))
    step = max(h, w) / float(cells)
    rows = (np.arange(h) + 0.5) / step + 1.0
    cols = (np.arange(w) + 0.5) / step + 1.0
    field = _bilinear(grid, *np.broadcast_arrays(rows[:, None], cols[None, :]))
    field = gaussian_blur_shifted(field, 0.35 * step)
    return field / (np.abs(field).max() + 1e-9)


def _noise_level(img: np.ndarray) -> float:
    """Robust standard deviation of the finest texture (image minus a 1 px blur): the noise a lesion that
    attenuates texture has to give back, so that it is not recognisable by being smoother than its surroundings."""
    return float(1.4826 * np.median(np.abs(img - gaussian_blur_shifted(img, 1.0))))


def _coords(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    return np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")


# ---------------------------------------------------------------------------------------------------- placement


def lung_field(image: np.ndarray) -> np.ndarray:
    """A soft map (0..1) of where the lung fields of a frontal chest radiograph probably are.

    A fixed prior of the two lung regions (ellipses centred at 29 % and 71 % of the width and 46 % of the height,
    semi-axes 18 % and 36 %; our reading of the framing of the Kermany radiographs) is multiplied by "darker than
    the median of the smoothed image inside the prior" (the aerated lung is darker than mediastinum, heart,
    diaphragm and soft tissue), then smoothed.

    Args:
        image: ``(H, W)`` float image in ``[0, 1]``.

    Returns:
        ``(H, W)`` float64 map in ``[0, 1]``.
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    s = min(h, w) / _REF_SIDE
    rr, cc = _coords((h, w))
    y, x = (rr + 0.5) / h, (cc + 0.5) / w
    prior = np.zeros((h, w))
    for cx in (0.29, 0.71):
        q = ((x - cx) / 0.18) ** 2 + ((y - 0.46) / 0.36) ** 2
        prior = np.maximum(prior, smoothstep((1.0 - q) / 0.25))
    smooth = gaussian_blur_shifted(img, 4.0 * s)
    inside = prior > 0.5
    threshold = float(np.median(smooth[inside]))
    spread = float(np.std(smooth[inside])) + 1e-6
    dark = sigmoid((threshold - smooth) / (0.25 * spread))
    return np.clip(gaussian_blur_shifted(prior * dark, 2.0 * s), 0.0, 1.0)


def _pick_centre(rng: np.random.Generator, field: np.ndarray, radius: float) -> tuple[float, float]:
    """A pixel chosen uniformly among those whose neighbourhood of ``radius`` lies deepest in ``field``."""
    depth = gaussian_blur_shifted(field, max(1.0, 0.8 * radius)) * field
    top = float(depth.max())
    if top <= 0.0:
        raise ValueError("No lung field found to place a lesion in (is the image a frontal chest radiograph?).")
    idx = np.flatnonzero(depth >= 0.85 * top)
    i = int(idx[int(rng.integers(idx.size))])
    r, c = divmod(i, field.shape[1])
    return float(r) + float(rng.uniform(-0.5, 0.5)), float(c) + float(rng.uniform(-0.5, 0.5))


def _thorax_field(shape: tuple[int, int]) -> np.ndarray:
    """Where a device may lie: the chest region of the frame (10-90 % of the width, 5-85 % of the height)."""
    h, w = shape
    rr, cc = _coords(shape)
    y, x = (rr + 0.5) / h, (cc + 0.5) / w
    return smoothstep((0.4 - np.abs(x - 0.5)) / 0.05) * smoothstep((0.4 - np.abs(y - 0.45)) / 0.05)


# ---------------------------------------------------------------------------------------------------- lesions


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float], s: float = 1.0, floor: float = 1.5) -> float:
    """A size drawn in reference pixels, scaled to the image (``s``), at least ``floor`` pixels (small images)."""
    return max(floor, float(rng.uniform(lo_hi[0], lo_hi[1])) * s)


def _opacity(img, rng, size, s, lungs):
    r = _uniform(rng, _RADIUS["opacity"][size], s)
    cy, cx = _pick_centre(rng, lungs, r)
    rr, cc = _coords(img.shape)
    rot = rng.uniform(0, math.pi)
    a, b = r * rng.uniform(0.85, 1.25), r * rng.uniform(0.7, 1.05)
    dy, dx = rr - cy, cc - cx
    u = (dx * math.cos(rot) + dy * math.sin(rot)) / a
    v = (-dx * math.sin(rot) + dy * math.cos(rot)) / b
    ragged = 0.35 * _smooth_noise(rng, img.shape, max(6, int(round(img.shape[1] / (0.8 * r)))))
    env = np.clip(1.0 - (u * u + v * v) + ragged, 0.0, 1.0)
    patchy = 0.7 + 0.3 * _smooth_noise(rng, img.shape, max(10, int(round(img.shape[1] / (0.35 * r)))))
    support = smoothstep(env / 0.5) * np.clip(patchy, 0.0, 1.0) * np.clip(1.6 * lungs, 0.0, 1.0)
    fill = rng.uniform(0.6, 0.9)
    alpha = fill * support
    # the opacity fills the air spaces: towards a smooth soft-tissue brightness, keeping a little fine texture
    base = gaussian_blur_shifted(img, 1.5 * s)
    target = np.clip(gaussian_blur_shifted(img, 1.2 * r) + rng.uniform(0.15, 0.3), 0.0, 0.95)
    filled = target + 0.15 * (img - base)
    out = (1.0 - alpha) * img + alpha * filled + 0.85 * alpha * _noise_level(img) * rng.standard_normal(img.shape)
    return out, support > 0.35, {"radius_px": round(r, 2)}


def _nodule(img, rng, size, s, lungs):
    r = _uniform(rng, _RADIUS["nodule"][size], s)
    cy, cx = _pick_centre(rng, lungs, 2.0 * r)
    rr, cc = _coords(img.shape)
    dy, dx = rr - cy, cc - cx
    rho = np.sqrt(dx * dx + dy * dy)
    k, lobe, phase = int(rng.integers(3, 7)), rng.uniform(0.04, 0.15), rng.uniform(0, 2 * math.pi)
    rad = r * (1.0 + lobe * np.sin(k * np.arctan2(dy, dx) + phase))
    prof = np.clip(1.0 - (rho / rad) ** 2, 0.0, None)
    dens = gaussian_blur_shifted(np.sqrt(prof) * smoothstep(prof / 0.15), 0.5 * s)
    amp = rng.uniform(0.3, 0.55)
    out = img + amp * dens * (1.0 - img)
    return out, rho < rad, {"radius_px": round(r, 2)}


def _line_distance(shape, points: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the nearest of ``points`` ((N, 2) row/col samples spaced < 0.5 px)."""
    rr, cc = _coords(shape)
    dist = np.full(shape, np.inf)
    for chunk in range(0, len(points), 64):
        p = points[chunk : chunk + 64]
        d = np.sqrt((rr[..., None] - p[:, 0]) ** 2 + (cc[..., None] - p[:, 1]) ** 2).min(axis=-1)
        dist = np.minimum(dist, d)
    return dist


def _device(img, rng, size, s, lungs):
    thorax = _thorax_field(img.shape)
    level = rng.uniform(0.88, 1.0)
    if rng.random() < 0.5:  # tube or wire: a bent line with a sharp, bright edge
        detail = "line"
        length = _uniform(rng, _RADIUS["line"][size], s)
        half_width = max(0.5, rng.uniform(0.5, 1.25) * s)
        cy, cx = _pick_centre(rng, thorax, 0.25 * length)
        ang = rng.uniform(0, math.pi)
        d = np.array([math.sin(ang), math.cos(ang)])
        n = np.array([d[1], -d[0]])
        bend = rng.uniform(-0.25, 0.25) * length
        p0, p2 = np.array([cy, cx]) - 0.5 * length * d, np.array([cy, cx]) + 0.5 * length * d
        p1 = np.array([cy, cx]) + bend * n
        t = np.linspace(0.0, 1.0, int(math.ceil(2.5 * length)) + 2)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        dist = _line_distance(img.shape, pts)
        prof = smoothstep(half_width + 0.5 - dist)
        extent = {"length_px": round(length, 2), "width_px": round(2 * half_width, 2)}
    else:  # ECG electrode: a ring with its central snap
        detail = "ring"
        radius = _uniform(rng, _RADIUS["ring"][size], s)
        half_width = max(0.5, rng.uniform(0.5, 0.9) * s)
        cy, cx = _pick_centre(rng, thorax, radius + 2.0)
        rr, cc = _coords(img.shape)
        rho = np.sqrt((rr - cy) ** 2 + (cc - cx) ** 2)
        ring = smoothstep(half_width + 0.5 - np.abs(rho - radius))
        snap = smoothstep(max(1.0, 0.25 * radius) + 0.5 - rho)
        prof = np.maximum(ring, snap)
        extent = {"radius_px": round(radius, 2), "width_px": round(2 * half_width, 2)}
    opacity = rng.uniform(0.75, 1.0)
    out = img + opacity * prof * (level - img)
    return out, prof > 0.5, {"device": detail, **extent}


def _lucency(img, rng, size, s, lungs):
    r = _uniform(rng, _RADIUS["lucency"][size], s)
    cy, cx = _pick_centre(rng, lungs, r)
    rr, cc = _coords(img.shape)
    dy, dx = rr - cy, cc - cx
    rot = rng.uniform(0, math.pi)
    a, b = r * rng.uniform(0.9, 1.15), r * rng.uniform(0.8, 1.0)
    u = (dx * math.cos(rot) + dy * math.sin(rot)) / a
    v = (-dx * math.sin(rot) + dy * math.cos(rot)) / b
    ragged = 0.15 * _smooth_noise(rng, img.shape, max(6, int(round(img.shape[1] / (0.8 * r)))))
    q = u * u + v * v - ragged
    soft = smoothstep((1.0 - q) / 0.35)
    # air instead of lung tissue along the ray: darker (ribs in front of it stay visible) and without the fine
    # vessel texture
    depth = rng.uniform(0.06, 0.14)
    fine = img - gaussian_blur_shifted(img, 1.5 * s)
    out = img - soft * (depth * (0.7 + 0.3 * img) + 0.6 * fine)
    out = out + 0.6 * soft * _noise_level(img) * rng.standard_normal(img.shape)
    wall = 0.0
    if rng.random() < 0.5:  # the thin wall of a bulla or cavity
        wall = rng.uniform(0.05, 0.12)
        rim = np.exp(-0.5 * ((np.sqrt(np.maximum(q, 0.0)) - 1.0) * r / (0.7 * s)) ** 2)
        out = out + wall * rim * (1.0 - out)
    return out, soft > 0.5, {"radius_px": round(r, 2), "wall": round(wall, 3)}


_RENDER = {"opacity": _opacity, "nodule": _nodule, "device": _device, "lucency": _lucency}


def insert_lesion(
    image: np.ndarray, kind: str, size: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draws one synthetic lesion into a real radiograph.

    Args:
        image: ``(H, W)`` float image in ``[0, 1]`` (a frontal chest radiograph).
        kind: one of :data:`INSERTED_LESION_KINDS`.
        size: one of :data:`LESION_SIZES`.
        rng: the random generator of this lesion (place, shape, contrast).

    Returns:
        ``(image, mask, info)``: the float image with the lesion (clipped to ``[0, 1]``), its boolean mask (never
        empty) and a dict of the drawn parameters (``radius_px`` / ``length_px``, the ``device`` type, ...).

    Raises:
        ValueError: unknown ``kind`` or ``size``, or no lung field found.
    """
    if kind not in _RENDER:
        raise ValueError(f"Unknown lesion kind {kind!r}; choose from {INSERTED_LESION_KINDS}.")
    if size not in LESION_SIZES:
        raise ValueError(f"Unknown lesion size {size!r}; choose from {LESION_SIZES}.")
    img = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    s = min(img.shape) / _REF_SIDE
    out, mask, info = _RENDER[kind](img, rng, size, s, lung_field(img))
    if not mask.any():
        raise AssertionError(f"The {size} {kind} drew an empty mask; this is a bug of the lesion model.")
    return np.clip(out, 0.0, 1.0), mask, info


# ---------------------------------------------------------------------------------------------------- acquisition


def acquisition_jitter(
    image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """Random pose and exposure of one acquisition, the same distribution for every test image.

    Pose: rotation uniform in +-5 degrees, isotropic scale in [0.95, 1.05] and a shift of up to 3 % of the side in
    each direction, about the image centre, sampled bilinearly with mirrored borders (the mask with the same map,
    kept where the warped mask is >= 0.5). Exposure: gamma log-uniform in [0.8, 1.25], contrast in [0.9, 1.1]
    about mid-grey, brightness +-0.04; the result is clipped to ``[0, 1]``. No noise is added: the source's own
    noise and JPEG texture stay (the lesions that attenuate texture give its noise back). All ranges are our
    choice: small, like the spread of framing and exposure among the source radiographs.

    Args:
        image: ``(H, W)`` float image in ``[0, 1]``.
        mask: ``(H, W)`` boolean lesion mask, or None.
        rng: the random generator of this acquisition.

    Returns:
        ``(image, mask, params)``; ``params`` holds ``rotation_deg, scale, shift_x_px, shift_y_px, gamma, contrast,
        brightness``.
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    angle = rng.uniform(-_ROTATION_DEG, _ROTATION_DEG)
    scale = rng.uniform(*_SCALE)
    ty, tx = rng.uniform(-_SHIFT, _SHIFT) * h, rng.uniform(-_SHIFT, _SHIFT) * w
    gamma = math.exp(rng.uniform(math.log(_GAMMA[0]), math.log(_GAMMA[1])))
    contrast = rng.uniform(*_CONTRAST)
    brightness = rng.uniform(-_BRIGHTNESS, _BRIGHTNESS)

    # output pixel p = c + t + scale * R(angle) (q - c); sample the source at q
    rr, cc = _coords((h, w))
    c_r, c_c = (h - 1) / 2.0, (w - 1) / 2.0
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    y, x = rr - c_r - ty, cc - c_c - tx
    src_r = c_r + cos * y - sin * x
    src_c = c_c + sin * y + cos * x
    warped = _bilinear(img, src_r, src_c)
    out_mask = None if mask is None else _bilinear(np.asarray(mask, dtype=np.float64), src_r, src_c) >= 0.5
    out = np.power(np.clip(warped, 0.0, 1.0), gamma)
    out = (out - 0.5) * contrast + 0.5 + brightness
    params = {
        "rotation_deg": round(angle, 3),
        "scale": round(scale, 4),
        "shift_x_px": round(tx, 2),
        "shift_y_px": round(ty, 2),
        "gamma": round(gamma, 4),
        "contrast": round(contrast, 4),
        "brightness": round(brightness, 4),
    }
    return np.clip(out, 0.0, 1.0), out_mask, params


# ---------------------------------------------------------------------------------------------------- the command

MANIFEST_FIELDS = (
    "file",
    "mask",
    "label",
    "lesion",
    "lesion_size",
    "lesion_detail",
    "lesion_area_px",
    "source_file",
    "source_sha256",
    "patient_id",
    "rotation_deg",
    "scale",
    "shift_x_px",
    "shift_y_px",
    "gamma",
    "contrast",
    "brightness",
    "width",
    "height",
    "license",
    "sha256",
    "mask_sha256",
)


def _rng(seed: int, role: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _ROLE[role], int(index)]))


def _plan_kinds(n: int, kinds: Sequence[str], seed: int) -> list[tuple[str, str]]:
    """``(kind, size)`` of each abnormal image: kinds in equal shares (the remainder to the first kinds), sizes
    cycling small / medium / large within a kind, in a seeded order."""
    plan = [(kinds[i % len(kinds)], "") for i in range(n)]
    seen: dict[str, int] = {}
    for i, (kind, _) in enumerate(plan):
        plan[i] = (kind, LESION_SIZES[seen.get(kind, 0) % len(LESION_SIZES)])
        seen[kind] = seen.get(kind, 0) + 1
    order = _rng(seed, "kinds", 0).permutation(n)
    return [plan[int(i)] for i in order]


def _source_rows(source: Path, section: str) -> tuple[list[dict[str, str]], dict[str, set[str]]]:
    manifest = source / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"'{source}' has no manifest.csv; give a folder written by a prepare command, e.g. data/real/kermany "
            "(python -m medad_monai prepare_kermany)."
        )
    rows = read_manifest(manifest)
    needed = {"file", "patient_id", "label", "section", "sha256"}
    if rows and not needed <= set(rows[0]):
        raise ValueError(f"{manifest} lacks the column(s) {sorted(needed - set(rows[0]))}.")
    patients: dict[str, set[str]] = {}
    for r in rows:
        patients.setdefault(r["section"], set()).add(r["patient_id"])
    healthy = [r for r in rows if r["section"] == section and r["label"] == "0"]
    if not healthy:
        raise ValueError(
            f"{manifest} has no healthy image (label 0) in section {section!r} (sections: {sorted(patients)}); "
            "give --section with held-out healthy images."
        )
    if section in ("training", "validation"):
        raise ValueError(f"section {section!r} is used to train the models; give a held-out one such as 'test'.")
    return sorted(healthy, key=lambda r: r["file"]), patients


def _source_terms(source: Path, healthy: list[dict[str, str]]) -> tuple[str, str]:
    """``(licence, citation)`` of a prepared source: its ``datalist.json`` keys, else the manifest's licence."""
    content: dict[str, Any] = {}
    if (source / "datalist.json").is_file():
        with open(source / "datalist.json", encoding="utf-8") as f:
            content = json.load(f)
    licence = str(content.get("license") or healthy[0].get("license", ""))
    if not licence:
        raise ValueError(f"{source} records no licence (datalist.json 'license' or a manifest 'license' column).")
    return licence, str(content.get("citation", ""))


def _readme(summary: dict[str, Any], command: str, origin: str, n_bytes: int) -> str:
    table = "\n".join(
        f"| {kind} | " + " | ".join(str(summary["counts"][kind].get(sz, 0)) for sz in LESION_SIZES) + " |"
        for kind in summary["kinds"]
    )
    return f"""# Synthetic lesions on real healthy chest radiographs ({origin}, held out)

A lesion-insertion test set for unsupervised anomaly detection: {summary['n_normal']} normal and
{summary['n_abnormal']} abnormal test images, {n_bytes / 1e6:.1f} MB. **The lesions are synthetic** (drawn by
`medad_monai.data.sources.lesions`, version {LESION_TASK_VERSION}); the radiographs under them are real.

- **Images**: the {summary['n_sources']} healthy radiographs of the `{summary['section']}` section of `{origin}`
  (one per child; no patient of its `training` or `validation` sections). Each is used twice, as a matched pair:
  once as a normal image (`images/normal/`) and once with one inserted lesion (`images/lesion/`).
- **Acquisition**: every image (normal and abnormal alike) gets its own random pose (rotation +-5 degrees, scale
  0.95-1.05, shift up to 3 % of the side; mirrored borders) and exposure (gamma 0.8-1.25, contrast 0.9-1.1,
  brightness +-0.04), drawn after the lesion is inserted.
- **Lesions**: opacity (soft patchy consolidation-like blob attenuating the texture), nodule (small dense round),
  device (a bright sharp tube/wire line or an ECG-electrode ring), lucency (darker texture-poor region, half with
  a thin wall); three size classes each, placed in a lung field (devices anywhere over the chest).
- **Masks**: `masks/` (0/255 PNG, the image's size), one per lesion image; normal images have none (no lesion
  pixel; the pixel metrics count a normal image without a mask as all zero).
- **Seed**: {summary['seed']}. Rebuild: `{command}` (same numpy version: byte-identical files).
- **Licence**: the underlying radiographs are {summary['license']} (attribution in `LICENSE.txt` and in the README of
  `{origin}`); the changes (lesions drawn in, pose and exposure altered) are ours and marked here.

| lesion | {' | '.join(LESION_SIZES)} |
|---|{'---|' * len(LESION_SIZES)}
{table}

Files: `manifest.csv` (file, mask, label, lesion, lesion_size, lesion_detail, lesion_area_px, source_file,
source_sha256, patient_id, the acquisition parameters, width, height, license, sha256, mask_sha256) and
`datalist.json` (section `test` with `label` and `lesion`, lesion images also `mask` and `lesion_size`). Method
and caveats: `docs/data_sources.md` of medad-monai.
"""


_LICENCE_URLS = {"CC BY 4.0": "https://creativecommons.org/licenses/by/4.0/"}


def _license_text(origin: str, licence: str, citation: str) -> str:
    url = f" ({_LICENCE_URLS[licence]})" if licence in _LICENCE_URLS else ""
    return f"""The radiographs in this folder are adapted from the healthy test images of the medad-monai data folder
'{origin}' (its README.md and LICENSE.txt name the collection), licensed under {licence}{url}.

Attribution: {citation or "see the LICENSE.txt of " + origin}

Changes: synthetic lesions (opacities, nodules, devices, lucencies) were drawn into the images and every image was
given a random pose and exposure change, by medad_monai (python -m medad_monai prepare_lesion_task). The lesions
are not real findings. No endorsement by the licensors is implied.
"""


def prepare_lesion_task(
    source_dir: str | None = None,
    out_dir: str | None = None,
    seed: int = 0,
    section: str = "test",
    n_normal: int | None = None,
    n_abnormal: int | None = None,
    kinds: str | Sequence[str] = INSERTED_LESION_KINDS,
) -> dict[str, Any]:
    """Writes the lesion-insertion test set (see the module docstring for the method and the layout).

    Args:
        source_dir: a prepared source folder (``manifest.csv`` + ``images/``); default ``data/real/kermany``.
        out_dir: output folder; new, empty, or written by an earlier run (its ``images/`` and ``masks/`` are
            replaced); default ``data/real/kermany_lesions``.
        seed: the one seed of every random choice (lesion kinds' order, places, shapes, acquisitions).
        section: the manifest section whose healthy images are used; must not be ``training`` or ``validation``.
        n_normal: normal test images (default: every healthy image of ``section``).
        n_abnormal: abnormal test images (default: every healthy image of ``section``); at most one lesion image
            per source image.
        kinds: lesion kinds, a subset of :data:`INSERTED_LESION_KINDS` (comma-separated or a list).

    Returns:
        the datalist dict that was written.

    Raises:
        FileNotFoundError: no ``manifest.csv`` in ``source_dir``.
        ValueError: a source file's sha256 differs from its manifest, the section has too few healthy images, an
            unknown kind, or a section that is used for training.
    """
    from PIL import Image

    source = Path(source_dir).expanduser() if source_dir else real_data_dir() / "kermany"
    out_path = Path(out_dir).expanduser() if out_dir else real_data_dir() / "kermany_lesions"
    kinds = [k.strip() for k in kinds.split(",") if k.strip()] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in INSERTED_LESION_KINDS]
    if unknown or not kinds:
        raise ValueError(f"Unknown lesion kind(s) {unknown or kinds}; choose from {INSERTED_LESION_KINDS}.")
    healthy, patients = _source_rows(source, section)
    n_normal = len(healthy) if n_normal is None else int(n_normal)
    n_abnormal = len(healthy) if n_abnormal is None else int(n_abnormal)
    if not (0 <= n_normal <= len(healthy)) or not (1 <= n_abnormal <= len(healthy)):
        raise ValueError(
            f"n_normal={n_normal} and n_abnormal={n_abnormal} must lie in [0, {len(healthy)}] and [1, {len(healthy)}]: "
            f"section {section!r} of {source} has {len(healthy)} healthy images (one lesion image per source image)."
        )
    held_out = {r["patient_id"] for r in healthy}
    trained_on = {s: patients.get(s, set()) for s in ("training", "validation")}
    check_patient_disjoint({**trained_on, section: held_out})
    bad = [
        r["file"]
        for r in healthy
        if not (source / r["file"]).is_file() or sha256_file(source / r["file"]) != r["sha256"]
    ]
    if bad:
        raise ValueError(
            f"{len(bad)} source image(s) are missing or differ from {source / 'manifest.csv'} (first: {bad[0]}); "
            "rebuild the source with its prepare command."
        )

    normal_idx = sorted(int(i) for i in _rng(seed, "order", 1).permutation(len(healthy))[:n_normal])
    lesion_idx = sorted(int(i) for i in _rng(seed, "order", 2).permutation(len(healthy))[:n_abnormal])
    plan = _plan_kinds(n_abnormal, kinds, int(seed))

    out = prepare_out_dir(out_path, owned=("images", "masks"))
    license_name, citation = _source_terms(source, healthy)
    rows: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    n_bytes = 0
    jobs = [("normal", i, None) for i in normal_idx] + [("lesion", i, plan[k]) for k, i in enumerate(lesion_idx)]
    for role, i, kind_size in jobs:
        src = healthy[i]
        with Image.open(source / src["file"]) as im:
            gray = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
        rng = _rng(seed, role, i)
        mask = np.zeros(gray.shape, dtype=bool)
        kind, size, info = "none", "", {}
        if kind_size is not None:
            kind, size = kind_size
            gray, mask, info = insert_lesion(gray, kind, size, rng)
        img, warped, params = acquisition_jitter(gray, mask, rng)
        if kind_size is not None and not warped.any():
            raise AssertionError(f"The {size} {kind} of {src['file']} left the frame; this is a bug.")
        stem = Path(src["file"]).stem
        rel = f"images/{role}/{stem}.png"
        arr = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
        digest = write_png_gray8(out / rel, arr)
        n_bytes += (out / rel).stat().st_size
        rel_mask = mask_digest = ""
        if kind_size is not None:  # a normal image has no lesion pixel: no mask file (the metrics take it as zero)
            rel_mask = f"masks/{stem}.png"
            mask_digest = write_png_gray8(out / rel_mask, warped.astype(np.uint8) * 255)
            n_bytes += (out / rel_mask).stat().st_size
        label = 0 if kind_size is None else 1
        detail = info.get("device", "") if kind == "device" else ("wall" if info.get("wall") else "")
        rows.append(
            {
                "file": rel,
                "mask": rel_mask,
                "label": label,
                "lesion": kind,
                "lesion_size": size,
                "lesion_detail": detail,
                "lesion_area_px": int(warped.sum()),
                "source_file": src["file"],
                "source_sha256": src["sha256"],
                "patient_id": src["patient_id"],
                **params,
                "width": arr.shape[1],
                "height": arr.shape[0],
                "license": license_name,
                "sha256": digest,
                "mask_sha256": mask_digest,
            }
        )
        item: dict[str, Any] = {"image": rel, "label": label, "lesion": kind}
        if rel_mask:
            item.update(mask=rel_mask, lesion_size=size)
        items.append(item)
    write_manifest(out / "manifest.csv", rows, MANIFEST_FIELDS)

    origin = source.name
    command = f"python -m medad_monai prepare_lesion_task <source_dir> <out_dir> --seed {int(seed)} --section {section}"
    if n_normal != len(healthy) or n_abnormal != len(healthy):
        command += f" --n_normal {n_normal} --n_abnormal {n_abnormal}"
    if list(kinds) != list(INSERTED_LESION_KINDS):
        command += f" --kinds {','.join(kinds)}"
    datalist: dict[str, Any] = {
        "description": f"Synthetic lesions ({', '.join(kinds)}) inserted into held-out real healthy chest radiographs "
        f"({origin}, section {section}), with pose and exposure jitter on every image; labels, masks and lesion "
        "kinds. The lesions are synthetic.",
        "source": f"{source.name}_lesions",
        "license": license_name,
        "citation": citation,
        "generated_by": command,
        "origin": f"{origin} (section {section}), medad_monai lesion task version {LESION_TASK_VERSION}",
        "test": items,
    }
    write_datalist(datalist, out / "datalist.json")

    counts = {
        k: {sz: sum(r["lesion"] == k and r["lesion_size"] == sz for r in rows) for sz in LESION_SIZES} for k in kinds
    }
    summary = {
        "n_normal": n_normal,
        "n_abnormal": n_abnormal,
        "n_sources": len(healthy),
        "section": section,
        "seed": int(seed),
        "kinds": kinds,
        "counts": counts,
        "license": license_name,
    }
    (out / "README.md").write_text(_readme(summary, command, origin, n_bytes), encoding="utf-8")
    (out / "LICENSE.txt").write_text(
        _license_text(origin, license_name, citation), encoding="utf-8"
    )
    print(
        f"prepare_lesion_task: {n_normal} normal + {n_abnormal} abnormal images ({n_bytes / 1e6:.1f} MB) from "
        f"{len(healthy)} healthy '{section}' images of {source} -> {out}\n  " + json.dumps(counts),
        flush=True,
    )
    return datalist
