"""The phantom renderer: numpy helpers, the patient model, anatomy, lesions and :func:`synthesize_cxr`.

Design, variability, lesion models and determinism: see :mod:`medad_monai.data.phantoms`. The helpers
:func:`gaussian_blur_shifted`, :func:`smoothstep` and :func:`sigmoid` are shared with the inserted lesions of
:mod:`medad_monai.data.sources.lesions`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "GENERATOR_VERSION",
    "LESION_KINDS",
    "PhantomSample",
    "synthesize_cxr",
    "seed_sequence",
    "gaussian_blur_shifted",
    "smoothstep",
    "sigmoid",
]

# Version of the generator, recorded in the demo dataset's manifest: bump it when the images or the dataset change.
GENERATOR_VERSION = "1.0"
LESION_KINDS = ("nodule", "consolidation", "effusion", "pneumothorax", "cardiomegaly")


# ----------------------------------------------------------------------------------------------------------------
# small numerical helpers: numpy only, float32, no BLAS (results do not depend on thread counts)

_F = np.float32


@functools.lru_cache(maxsize=32)
def _lerp_table(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of linear interpolation from m to n samples (pixel centres aligned)."""
    pos = np.clip((np.arange(n) + 0.5) * (m / n) - 0.5, 0, m - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, m - 1)
    return lo, hi, (pos - lo).astype(_F)


def _upsample(a: np.ndarray, n0: int, n1: int) -> np.ndarray:
    """Separable linear interpolation of a small 2D array to (n0, n1)."""
    lo, hi, t = _lerp_table(n0, a.shape[0])
    rows = a[lo] * (1.0 - t)[:, None] + a[hi] * t[:, None]
    lo, hi, t = _lerp_table(n1, a.shape[1])
    return rows[:, lo] * (1.0 - t)[None, :] + rows[:, hi] * t[None, :]


def gaussian_blur_shifted(
    a: np.ndarray, sigma: float, truncate: float = 3.0, dtype: Any = np.float64, fit_radius: bool = True
) -> np.ndarray:
    """Separable Gaussian blur of a 2D array by shifted sums, with mirrored (``"symmetric"``) borders.

    The one Gaussian of the synthetic data (the phantoms here, the inserted lesions of
    :mod:`medad_monai.data.sources.lesions`): no BLAS and no FFT, so the result does not depend on thread counts
    and generated files are byte-identical across machines.

    Args:
        a: ``(H, W)`` array.
        sigma: standard deviation in pixels; ``<= 0.05`` returns an unblurred copy.
        truncate: the kernel radius is ``max(1, ceil(truncate * sigma))`` pixels.
        dtype: the dtype of the kernel, the sums and the result (the phantoms use float32, the lesions float64).
        fit_radius: cap the radius at the shorter side minus one (a kernel wider than the image would mirror it
            more than once); the phantoms were generated without the cap.

    Returns:
        the blurred ``(H, W)`` array in ``dtype``.

    Example::

        >>> float(gaussian_blur_shifted(np.eye(4), 1.0).sum().round(6))  # mirrored borders keep the mass
        4.0
    """
    a = np.asarray(a).astype(dtype, copy=False)
    if sigma <= 0.05:
        return a.copy()
    r = max(1, int(math.ceil(truncate * sigma)))
    if fit_radius:
        r = min(r, max(1, min(a.shape) - 1))
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    w = (w / w.sum()).astype(dtype)
    p = np.pad(a, r, mode="symmetric")
    n0, n1 = a.shape
    tmp = w[0] * p[:, 0:n1]
    for o in range(1, 2 * r + 1):
        tmp += w[o] * p[:, o : o + n1]
    out = w[0] * tmp[0:n0, :]
    for o in range(1, 2 * r + 1):
        out += w[o] * tmp[o : o + n0, :]
    return out


def _blur_small(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian by shifted sums, for small sigma (pixels): float32, radius ``ceil(2.5 sigma)``."""
    return gaussian_blur_shifted(a, sigma, truncate=2.5, dtype=_F, fit_radius=False)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (sigma in pixels); large sigmas run on a block-averaged grid and are interpolated back."""
    if sigma <= 1.5:
        return _blur_small(a, sigma)
    n = a.shape[0]
    f = 1
    while sigma / f > 1.5 and n % (2 * f) == 0 and n // (2 * f) >= 8:
        f *= 2
    m = n // f
    low = a.reshape(m, f, m, f).mean(axis=(1, 3), dtype=_F)
    s_low = math.sqrt(max((sigma / f) ** 2 - 1.0 / 12.0, 0.09))  # block averaging is a box of variance f^2/12
    return _upsample(_blur_small(low, s_low), n, n)


def smoothstep(x: np.ndarray) -> np.ndarray:
    """The cubic smoothstep ``3x^2 - 2x^3`` of ``x`` clipped to [0, 1]: the soft edges of the synthetic anatomy
    and lesions (phantoms and :mod:`medad_monai.data.sources.lesions`), in the input's floating dtype."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function ``1 / (1 + exp(-x))``, with ``-x`` clipped to [-30, 30] (no overflow warning), in the
    input's floating dtype."""
    return 1.0 / (1.0 + np.exp(np.clip(-x, -30, 30)))


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth random field scaled to [-1, 1] with about ``cells`` features across the image."""
    g = _blur_small(rng.standard_normal((cells + 4, cells + 4)).astype(_F), 0.7)
    big = int(round(n * (cells + 4) / cells))
    off = (big - n) // 2
    field = _upsample(g, big, big)[off : off + n, off : off + n]
    return field / (np.abs(field).max() + 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# patient model


@dataclass
class _Patient:
    cx: float
    cy: float
    scale: float
    theta: float
    lw: float  # lung half width of the image-left lung (patient right)
    lw_ratio: float  # image-right lung width / image-left lung width
    apex_y: float
    apex_x: float
    apex_r: float  # share of the lung height over which the lateral border reaches full width
    base_y: float  # lowest point of the image-right lung (patient left)
    base_dy: float  # how much higher the image-left lung base (right hemidiaphragm) is
    dome_h: float
    med_w: float
    ctr: float  # cardiothoracic ratio
    heart_b: float
    heart_yc: float
    heart_right: float  # share of the heart width right of the midline in the image (patient left)
    heart_rot: float
    knob_r: float
    wall: float
    shoulder: float
    arms: bool
    arm_gap: float
    breast: float
    breast_r: float
    breast_y: float
    rib_sp: float
    rib_grow: float
    rib_y0: float
    rib_c1: float
    rib_c2: float
    rib_c4: float
    rib_w: float
    rib_amp: float
    clav_y: float
    clav_slope: float
    clav_w: float
    spine_amp: float
    air: float
    heart_amp: float
    vessel_amp: float
    vessel_hilum: float
    texture_amp: float
    bubble: float
    heel: float
    k: float
    d_lo: float
    d_hi: float
    gamma: float
    unsharp: float
    unsharp_sigma: float
    blur: float
    noise: float
    marker: int  # 0 none, 1 top left, 2 top right
    marker_letter: str


def _sample_patient(rng: np.random.Generator) -> _Patient:
    u = rng.uniform
    apex_y = u(-0.44, -0.36)
    base_y = u(0.22, 0.34)
    return _Patient(
        cx=0.5 + rng.normal(0, 0.02),
        cy=0.5 + rng.normal(0, 0.025),
        scale=u(0.88, 1.02),
        theta=float(np.clip(rng.normal(0, 0.035), -0.09, 0.09)),
        lw=u(0.39, 0.46),
        lw_ratio=u(0.96, 1.05),
        apex_y=apex_y,
        apex_x=u(0.17, 0.23),
        apex_r=u(0.7, 0.9),
        base_y=base_y,
        base_dy=u(0.0, 0.05),
        dome_h=u(0.05, 0.10),
        med_w=u(0.06, 0.09),
        ctr=u(0.40, 0.50),
        heart_b=u(0.14, 0.18),
        heart_yc=base_y - u(0.10, 0.15),
        heart_right=u(0.64, 0.76),
        heart_rot=u(0.45, 0.8),
        knob_r=u(0.03, 0.045),
        wall=u(0.05, 0.11),
        shoulder=u(0.12, 0.26),
        arms=bool(rng.random() < 0.35),
        arm_gap=u(0.02, 0.08),
        breast=u(0.08, 0.2) if rng.random() < 0.45 else 0.0,
        breast_r=u(0.16, 0.24),
        breast_y=base_y - u(0.02, 0.1),
        rib_sp=(base_y - apex_y) * u(0.085, 0.10),
        rib_grow=u(0.0, 0.04),
        rib_y0=apex_y + u(-0.01, 0.03),
        rib_c1=u(0.18, 0.30),
        rib_c2=u(0.12, 0.22),
        rib_c4=u(0.08, 0.16),
        rib_w=u(0.013, 0.019),
        rib_amp=u(0.05, 0.10),
        clav_y=apex_y + u(0.10, 0.16),
        clav_slope=u(-0.28, -0.12),
        clav_w=u(0.016, 0.024),
        spine_amp=u(0.03, 0.08),
        air=u(0.66, 0.80),
        heart_amp=u(0.06, 0.14),
        vessel_amp=u(0.07, 0.13),
        vessel_hilum=u(0.06, 0.14),
        texture_amp=u(0.015, 0.04),
        bubble=u(0.3, 0.8) if rng.random() < 0.6 else 0.0,
        heel=u(-0.08, 0.08),
        k=u(1.3, 2.0),
        d_lo=u(0.0, 0.12),
        d_hi=u(1.4, 1.75),
        gamma=u(0.85, 1.3),
        unsharp=u(0.0, 0.5),
        unsharp_sigma=u(4.0, 10.0),
        blur=u(0.35, 0.85),
        noise=u(0.006, 0.02),
        marker=int(rng.integers(0, 3)),
        marker_letter="LR"[int(rng.integers(0, 2))],
    )


@dataclass
class PhantomSample:
    """One synthetic radiograph.

    Attributes:
        image: float32 ``(H, W)`` in ``[0, 1]`` (before 8-bit quantisation).
        mask: bool ``(H, W)`` lesion mask (all False for a healthy image).
        lesion: ``"none"`` or one of :data:`LESION_KINDS`.
    """

    image: np.ndarray
    mask: np.ndarray
    lesion: str

    def to_uint8(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns the 8-bit image and the 0/255 mask, as written to PNG."""
        img = np.clip(np.round(self.image * 255.0), 0, 255).astype(np.uint8)
        return img, self.mask.astype(np.uint8) * 255


class _Scene:
    """Patient-frame coordinates of every pixel, shared by anatomy and lesions."""

    def __init__(self, p: _Patient, n: int) -> None:
        self.p, self.n = p, n
        c = ((np.arange(n) + 0.5) / n).astype(_F)
        uu, vv = np.meshgrid(c - _F(p.cx), c - _F(p.cy))
        ct, st = _F(math.cos(p.theta)), _F(math.sin(p.theta))
        self.X = (uu * ct + vv * st) / _F(p.scale)
        self.Y = (-uu * st + vv * ct) / _F(p.scale)
        self.aX = np.abs(self.X)
        self.px = 1.0 / (p.scale * n)  # one pixel in patient units

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        p = self.p
        ct, st = math.cos(p.theta), math.sin(p.theta)
        u = p.cx + p.scale * (x * ct - y * st)
        v = p.cy + p.scale * (x * st + y * ct)
        return u * self.n - 0.5, v * self.n - 0.5

    def soft(self, d: np.ndarray, width_px: float = 0.7) -> np.ndarray:
        """Soft indicator of ``d < 0`` with an edge about ``width_px`` pixels wide (d in patient units)."""
        return sigmoid(d * _F(-1.0 / (width_px * self.px)))


def _lung_sdf(sc: _Scene, side: int, lw: float, base_y: float, shrink: tuple | None = None) -> np.ndarray:
    """Approximate signed distance (patient units, negative inside) to one lung; side -1 image left, +1 right."""
    p = sc.p
    X, Y = sc.X, sc.Y
    if shrink is not None:  # the lung shape scaled by f about (sx, sy): a collapsed lung
        sx, sy, f = shrink
        X = _F(sx) + (X - _F(sx)) / _F(f)
        Y = _F(sy) + (Y - _F(sy)) / _F(f)
    ax = X if side > 0 else -X
    dy = Y - _F(p.apex_y)
    # elliptical apex: the lateral border reaches the full width at ``apex_r`` of the lung height, the medial
    # border reaches the mediastinum much sooner
    height = base_y - p.apex_y
    q = 1.0 - np.clip(dy * _F(1 / (p.apex_r * height)), 0.0, 1.0)
    widen = 0.86 + 0.14 * np.clip(dy * _F(1 / height), 0.0, 1.0)  # lungs are widest at the base
    lat = _F(p.apex_x) + _F(lw - p.apex_x) * np.sqrt(1.0 - q * q) * widen
    q = 1.0 - np.clip(dy * _F(1 / 0.16), 0.0, 1.0)
    med = _F(p.apex_x) - _F(p.apex_x - p.med_w) * np.sqrt(1.0 - q * q)
    # mediastinal contours: hilar widening on both sides, aortic knob on the patient's left (image right)
    hy = (dy - _F(0.45 * height)) * _F(1 / 0.09)
    med = med + 0.02 * np.exp(-(hy * hy))
    if side > 0:
        ky = (Y - _F(p.apex_y + 0.22)) * _F(1 / 0.045)
        med = med + _F(0.9 * p.knob_r) * np.exp(-(ky * ky))
    q = np.minimum(((ax - _F(0.42 * lw)) * _F(1 / (0.72 * lw))) ** 2, 1.0)
    dome = _F(base_y) - _F(p.dome_h) * (1.0 - q)
    d = np.maximum(np.maximum(ax - lat, med - ax), np.maximum(Y - dome, _F(p.apex_y) - Y))
    return d


def _heart_sdf(sc: _Scene, heart: dict[str, float]) -> np.ndarray:
    X, Y = sc.X - _F(heart["xc"]), sc.Y - _F(heart["yc"])
    c, s = math.cos(heart["rot"]), math.sin(heart["rot"])
    xr = (X * _F(c) + Y * _F(s)) * _F(1 / heart["a"])
    yr = (-X * _F(s) + Y * _F(c)) * _F(1 / heart["b"])
    return (np.sqrt(xr * xr + yr * yr) - 1.0) * _F(min(heart["a"], heart["b"]))


def _heart_params(p: _Patient, ctr: float | None = None, grow_b: float = 1.0) -> dict[str, float]:
    ctr = p.ctr if ctr is None else ctr
    width = ctr * p.lw * (1 + p.lw_ratio)
    b = p.heart_b * grow_b
    c, s = math.cos(p.heart_rot), math.sin(p.heart_rot)
    # long semi-axis a such that the tilted ellipse spans ``width`` horizontally
    a = math.sqrt(max((0.5 * width) ** 2 - (b * s) ** 2, (0.6 * b) ** 2) / (c * c))
    return {"xc": width * (p.heart_right - 0.5), "yc": p.heart_yc, "a": a, "b": b, "rot": p.heart_rot}


def _splat(sc: _Scene, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Adds weights ``w`` at patient points (x, y) into an image with bilinear splatting."""
    p, n = sc.p, sc.n
    ct, st = math.cos(p.theta), math.sin(p.theta)
    col = (p.cx + p.scale * (x * ct - y * st)) * n - 0.5
    row = (p.cy + p.scale * (x * st + y * ct)) * n - 0.5
    c0, r0 = np.floor(col), np.floor(row)
    fc, fr = col - c0, row - r0
    c0, r0 = c0.astype(np.intp), r0.astype(np.intp)
    out = np.zeros(n * n, dtype=np.float64)
    for dr, dc, wt in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        ok = (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n)
        out += np.bincount(rr[ok] * n + cc[ok], weights=(w * wt)[ok], minlength=n * n)
    return out.reshape(n, n).astype(_F)


def _vessels(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Branching vascular trees fanning out from both hila; returns the vessel density and the hila.

    The trees grow generation by generation (vectorised): every branch is two slightly bent segments and splits into
    two thinner, shorter children. Segments are sampled every half pixel and splatted, then blurred with a width
    that follows the vessel calibre, so a vessel's integrated density is proportional to its diameter.
    """
    p, px = sc.p, sc.px
    hila, xs, ys, angs, lens, wids = [], [], [], [], [], []
    trunk_angles = np.array([-1.8, -1.2, -0.6, -0.1, 0.45, 1.0])
    for side in (-1, 1):
        lw = p.lw * (p.lw_ratio if side > 0 else 1.0)
        hx = side * (p.med_w + rng.uniform(0.03, 0.06))
        hy = p.apex_y + (p.base_y - p.apex_y) * rng.uniform(0.42, 0.52)
        hila.append((hx, hy))
        local = trunk_angles + rng.normal(0, 0.12, trunk_angles.size)
        xs.append(hx + side * np.abs(rng.normal(0, 0.02, local.size)))
        ys.append(hy + rng.normal(0, 0.035, local.size) + 0.03 * np.sin(local))
        angs.append(local if side > 0 else math.pi - local)
        lens.append(lw * rng.uniform(0.24, 0.34, local.size))
        wids.append(rng.uniform(0.007, 0.011, local.size))
    x, y, a = np.concatenate(xs), np.concatenate(ys), np.concatenate(angs)
    length, width = np.concatenate(lens), np.concatenate(wids)
    layers = {}
    for gen in range(6):
        pts_x, pts_y, pts_w = [], [], []
        for _ in range(2):  # two bent halves per branch
            a = a + rng.normal(0, 0.16, a.size)
            nx, ny = x + np.cos(a) * length * 0.5, y + np.sin(a) * length * 0.5
            steps = max(2, int(math.ceil(float(np.max(length)) * 0.5 / (0.5 * px))))
            t = (np.arange(steps) + 0.5) / steps
            pts_x.append((x[:, None] + (nx - x)[:, None] * t[None]).ravel())
            pts_y.append((y[:, None] + (ny - y)[:, None] * t[None]).ravel())
            seg_px = length * 0.5 / px
            pts_w.append(np.repeat(width / px * seg_px / steps, steps))
            x, y = nx, ny
        layer = 0 if gen < 2 else (1 if gen < 4 else 2)
        dens = _splat(sc, np.concatenate(pts_x), np.concatenate(pts_y), np.concatenate(pts_w))
        layers[layer] = layers.get(layer, 0) + dens
        spread = rng.uniform(0.3, 0.65, a.size)
        k = a.size
        a = np.concatenate([a - spread * rng.uniform(0.4, 1.0, k), a + spread * rng.uniform(0.4, 1.0, k)])
        x, y = np.concatenate([x, x]), np.concatenate([y, y])
        length = np.concatenate([length, length]) * rng.uniform(0.62, 0.8, 2 * k)
        width = np.concatenate([width, width]) * rng.uniform(0.6, 0.78, 2 * k)
    scale = sc.n / 256
    out = np.zeros((sc.n, sc.n), dtype=_F)
    for layer, sigma in ((0, 1.1), (1, 0.8), (2, 0.6)):
        out += _blur_small(layers[layer], sigma * scale)
    return out, hila


def _rib_pattern(sc: _Scene, uu: np.ndarray, warp: np.ndarray, width: np.ndarray, count: int) -> np.ndarray:
    """Bands centred where ``warp`` equals rib level i (i = 0..count-1), with spacing growing caudally."""
    p = sc.p
    t = (warp - _F(p.rib_y0)) * _F(1 / p.rib_sp)
    g = p.rib_grow
    idx = t if g < 1e-4 else (np.sqrt(np.maximum(1.0 + _F(4 * g) * t, 0.0)) - 1.0) * _F(1 / (2 * g))
    k = np.clip(np.round(idx), 0, count - 1)
    level = _F(p.rib_y0) + _F(p.rib_sp) * (k + _F(g) * k * k)
    d = (warp - level) / width
    d2 = d * d
    return np.exp(-(d2 * d2)) * (0.8 + 0.2 * np.minimum(d2, 1.0))


def _ribs(sc: _Scene, lw_l: float, lw_r: float) -> np.ndarray:
    p = sc.p
    lw = np.where(sc.X < 0, _F(lw_l), _F(lw_r))
    uu = sc.aX / lw
    u2 = uu * uu
    fade = smoothstep((1.16 - uu) * _F(1 / 0.12)) * smoothstep((uu - 0.08) * _F(1 / 0.10))
    # posterior ribs rise from the spine, arch, and fall steeply at the chest wall
    warp = sc.Y + _F(p.rib_c1) * uu - _F(p.rib_c2) * u2 - _F(p.rib_c4) * u2 * u2
    post = _rib_pattern(sc, uu, warp, _F(p.rib_w) * (1.0 + 0.3 * uu), 11)
    # anterior ribs: fainter, from the lateral end of each posterior rib down and medially
    lat_end = -p.rib_c1 + p.rib_c2 + p.rib_c4
    one = np.clip(1.0 - uu, 0.0, None)
    warp_a = sc.Y - _F(lat_end) - _F(0.15) * one * np.sqrt(one)
    ant = _rib_pattern(sc, uu, warp_a, _F(1.2 * p.rib_w), 9) * smoothstep((uu - 0.3) * _F(1 / 0.25))
    fade = fade * smoothstep((sc.Y - _F(p.apex_y - 0.06)) * _F(1 / 0.08))
    return (post + 0.4 * ant) * fade


def _render(p: _Patient, n: int, noise_rng: np.random.Generator, vessel_rng: np.random.Generator, lesion=None):
    """Renders a patient (and optionally a lesion) into an image in [0, 1] and a lesion mask."""
    sc = _Scene(p, n)
    X, Y, aX = sc.X, sc.Y, sc.aX
    lw_l, lw_r = p.lw, p.lw * p.lw_ratio
    base_l, base_r = p.base_y - p.base_dy, p.base_y

    heart = _heart_params(p)
    heart_l = heart
    if lesion is not None and lesion["kind"] == "cardiomegaly":
        heart_l = _heart_params(p, ctr=lesion["ctr"], grow_b=lesion["grow_b"])
    below = Y - _F(base_r - 0.5 * p.dome_h)  # the diaphragm cuts the heart
    heart_in = sc.soft(np.maximum(_heart_sdf(sc, heart), below), 0.9)
    heart_in_l = heart_in if heart_l is heart else sc.soft(np.maximum(_heart_sdf(sc, heart_l), below), 0.9)

    lung_l = sc.soft(_lung_sdf(sc, -1, lw_l, base_l), 0.8)
    lung_r = sc.soft(_lung_sdf(sc, 1, lw_r, base_r), 0.8)
    lung = np.minimum(lung_l + lung_r, 1.0)
    # air thickness: less at the periphery, so the edges of the lung fields are lighter
    depth = np.clip(0.3 + 0.8 * _blur(lung, 0.05 / sc.px), 0.0, 1.0)
    air = _F(p.air) * depth
    lung_vis = lung * (1.0 - 0.75 * heart_in_l)  # retrocardiac lung is mostly hidden

    # body soft tissue, shoulders, neck, arms, breasts
    shoulder = _F(p.shoulder) * smoothstep((-0.2 - Y) * _F(1 / 0.25))
    body_half = _F(max(lw_l, lw_r) + p.wall) + shoulder - 0.05 * np.clip(Y - 0.3, 0, None)
    q = aX / body_half
    q2 = q * q
    body = np.sqrt(np.clip(1.0 - q2 * q2, 0.0, None))
    neck = smoothstep((-0.35 - Y) * _F(1 / 0.1)) * np.sqrt(np.clip(1.0 - (aX * _F(1 / 0.17)) ** 2, 0, None))
    body = np.maximum(body, 0.9 * neck)
    if p.arms:
        arm_c = body_half + _F(p.arm_gap + 0.085)
        da = (aX - arm_c) * _F(1 / 0.08)
        arm = np.sqrt(np.clip(1.0 - da * da, 0, None)) * smoothstep((Y + 0.55) * _F(1 / 0.2))
        dh = (aX - arm_c) * _F(1 / 0.025)
        body = body + 0.75 * arm + 0.25 * np.exp(-(dh * dh) ** 2) * smoothstep((0.05 - Y) * _F(1 / 0.2))
    if p.breast > 0:
        bx = 0.62 * max(lw_l, lw_r)
        for side in (-1, 1):
            dx = (X - _F(side * bx)) * _F(1 / (1.25 * p.breast_r))
            dy = (Y - _F(p.breast_y)) * _F(1 / p.breast_r)
            # brightest towards the lower fold, fading upwards over the lung base
            body = body + _F(p.breast) * np.sqrt(np.clip(1.0 - dx * dx - dy * dy, 0, None)) * smoothstep(0.8 + dy)

    # mediastinum, trachea, aortic knob, spine
    xm = X * _F(1 / (p.med_w + 0.02))
    med = np.exp(-(xm * xm) ** 2)
    xt = X * _F(1 / 0.02)
    trachea = np.exp(-(xt * xt) ** 2) * smoothstep((_F(p.apex_y + 0.3) - Y) * _F(1 / 0.05))
    kx, ky = (X - _F(p.med_w + 0.01)) * _F(1 / p.knob_r), (Y - _F(p.apex_y + 0.22)) * _F(1 / p.knob_r)
    knob = np.sqrt(np.clip(1.0 - kx * kx - ky * ky, 0, None))
    phase = (Y - _F(p.rib_y0)) * _F(math.pi / (0.85 * p.rib_sp))
    cph = np.cos(phase)
    cph2 = cph * cph
    xs = X * _F(1 / 0.05)
    spine = np.exp(-(xs * xs) ** 2) * (0.6 + 0.4 * cph2)
    xp = (aX - 0.035) * _F(1 / 0.01)
    pedicles = np.exp(-(xp * xp)) * (cph2 * cph2) ** 2

    # bones
    ribs = _ribs(sc, lw_l, lw_r) * (0.2 + 0.8 * smoothstep((_F(base_r + 0.06) - Y) * _F(1 / 0.1)))
    clav = np.zeros_like(X)
    for side in (-1, 1):
        uu = X * _F(side) - 0.03
        yc = _F(p.clav_y) + _F(p.clav_slope) * uu + 0.025 * np.sin(_F(math.pi / 0.5) * np.clip(uu, 0, 0.5))
        dd = (Y - yc) * _F(1 / p.clav_w)
        clav += np.exp(-(dd * dd) ** 2) * smoothstep(uu * _F(1 / 0.03)) * smoothstep((0.6 - uu) * _F(1 / 0.05))
    hx = (aX - (body_half + _F(0.02 + p.arm_gap))) * _F(1 / 0.11)
    hy = (Y + 0.5) * _F(1 / 0.11)
    humeral = np.sqrt(np.clip(1.0 - hx * hx - hy * hy, 0, None))
    bubble = 0.0
    if p.bubble > 0:
        bx_, by_ = (X - _F(0.55 * lw_r)) * _F(1 / 0.09), (Y - _F(base_r + 0.08)) * _F(1 / 0.045)
        bubble = _F(p.bubble) * np.sqrt(np.clip(1.0 - bx_ * bx_ - by_ * by_, 0, None))
        bubble = bubble * smoothstep((Y - _F(base_r + 0.04)) * _F(1 / 0.02))

    vessels, hila = _vessels(sc, vessel_rng)
    hilum = np.zeros_like(X)
    for hx_, hy_ in hila:
        dx, dy = (X - _F(hx_)) * _F(1 / 0.05), (Y - _F(hy_)) * _F(1 / 0.07)
        hilum += np.exp(-(dx * dx + dy * dy))
    tex = 3.0 * _blur_small(noise_rng.standard_normal((n, n)).astype(_F), 1.1) + 0.6 * _smooth_noise(noise_rng, n, 24)
    white = noise_rng.standard_normal((n, n)).astype(_F)
    # all random draws of the patient are done: a lesion below changes nothing else in the image

    extra = np.zeros_like(X)
    vessel_vis = lung_vis
    mask = np.zeros((n, n), dtype=bool)
    if lesion is not None:
        extra, vessel_vis, mask = _apply_lesion(
            sc, lesion, air, lung_vis, lung_l, lung_r, heart_in, heart_in_l, (base_l, base_r), (lw_l, lw_r)
        )

    density = (
        body
        - air * lung_vis
        + 0.18 * med
        - 0.22 * trachea * (1.0 - lung)
        + 0.10 * knob
        + _F(p.heart_amp) * heart_in_l
        + _F(p.spine_amp) * (spine + 0.8 * pedicles)
        + _F(p.rib_amp) * ribs
        + 0.18 * clav
        + 0.3 * humeral
        - bubble * 0.35
        + (_F(p.vessel_amp) * vessels + _F(p.vessel_hilum) * hilum + _F(p.texture_amp) * tex) * vessel_vis
        + extra
    )
    density = np.clip(density * (1.0 + _F(p.heel) * Y), 0.0, None)
    i_lo, i_hi = 1.0 - math.exp(-p.k * p.d_lo), 1.0 - math.exp(-p.k * p.d_hi)
    img = np.clip((1.0 - np.exp(density * _F(-p.k)) - _F(i_lo)) * _F(1 / (i_hi - i_lo)), 1e-6, 1.0)
    img = np.exp(np.log(img) * _F(p.gamma))
    if p.unsharp > 0:
        img = img + _F(p.unsharp) * (img - _blur(img, p.unsharp_sigma * n / 256))
    img = _blur_small(img, p.blur * n / 256)
    img = img + _F(p.noise) * (0.5 + 0.8 * np.clip(img, 0, 1)) * white
    img = np.clip(img, 0.0, 1.0)
    if p.marker:
        img = _draw_marker(img, p, n)
    return img.astype(_F), mask


def _draw_marker(img: np.ndarray, p: _Patient, n: int) -> np.ndarray:
    """A lead side marker ("L"/"R") in a top corner, as on most radiographs."""
    from PIL import Image, ImageDraw

    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    s = max(8, n // 24)
    x = int(n * 0.05) if p.marker == 1 else int(n * 0.91) - s
    y = int(n * (0.04 + 2.0 * abs(p.cy - 0.5)))
    lw = max(1, s // 5)
    if p.marker_letter == "L":
        d.line([(x + 1, y), (x + 1, y + s), (x + s - 2, y + s)], fill=255, width=lw)
    else:
        d.line([(x + 1, y + s), (x + 1, y), (x + s - 3, y), (x + s - 3, y + s // 2), (x + 1, y + s // 2),
                (x + s - 2, y + s)], fill=255, width=lw)
    mm = np.asarray(m, dtype=_F) * _F(1 / 255)
    return np.maximum(img, 0.92 * mm)


# ----------------------------------------------------------------------------------------------------------------
# lesions


def _sample_lesion(rng: np.random.Generator, kind: str) -> dict[str, Any]:
    u = rng.uniform
    side = -1 if rng.random() < 0.5 else 1
    if kind == "nodule":
        count = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
        big = rng.random() < 0.35
        return {
            "kind": kind,
            "radii": [u(0.035, 0.065) if (big and i == 0) else u(0.014, 0.035) for i in range(count)],
            "amps": [u(0.25, 0.55) for _ in range(count)],
            "lobes": [(int(rng.integers(3, 7)), u(0.04, 0.15), u(0, 2 * math.pi)) for _ in range(count)],
            "pick": [float(rng.random()) for _ in range(count)],
        }
    if kind == "consolidation":
        return {
            "kind": kind,
            "side": side,
            "a": u(0.07, 0.16),
            "b": u(0.06, 0.13),
            "rot": u(0, math.pi),
            "fill": u(0.35, 0.75),
            "pick": float(rng.random()),
            "seed": int(rng.integers(0, 2**31 - 1)),
        }
    if kind == "effusion":
        return {"kind": kind, "side": side, "h": u(0.05, 0.24), "men": u(0.04, 0.12), "edge": u(0.008, 0.02),
                "fill": u(0.7, 1.0)}
    if kind == "pneumothorax":
        return {"kind": kind, "side": side, "f": u(0.76, 0.92), "dark": u(0.04, 0.12), "line": u(0.06, 0.14)}
    if kind == "cardiomegaly":
        return {"kind": kind, "ctr": u(0.58, 0.68), "grow_b": u(1.05, 1.2)}
    raise ValueError(f"Unknown lesion kind '{kind}'; expected one of {LESION_KINDS}.")


def _pick_point(score: np.ndarray, q: float, level: float = 0.92) -> tuple[int, int]:
    """Pixel number ``q`` (a fraction) among those whose score (interiorness) is at least ``level`` of the best."""
    top = float(score.max())
    if top <= 0:
        raise RuntimeError("no lung in the field of view to place a lesion in")
    idx = np.flatnonzero(score >= min(level, 0.98 * top))
    i = int(idx[min(int(q * idx.size), idx.size - 1)])
    return divmod(i, score.shape[1])


def _apply_lesion(sc, lesion, air, lung_vis, lung_l, lung_r, heart_in, heart_in_l, bases, widths):
    """Returns (extra density, vessel visibility, mask) of a lesion; see :func:`_sample_lesion` for parameters."""
    n, p = sc.n, sc.p
    X, Y = sc.X, sc.Y
    extra = np.zeros_like(X)
    kind = lesion["kind"]
    side = lesion.get("side", 1)
    side_lung = (lung_l if side < 0 else lung_r) * lung_vis
    base = bases[0] if side < 0 else bases[1]
    lw = widths[0] if side < 0 else widths[1]
    if kind == "nodule":
        mask = np.zeros((n, n), dtype=bool)
        for r, amp, (k, lobe, phase), q in zip(lesion["radii"], lesion["amps"], lesion["lobes"], lesion["pick"]):
            i, j = _pick_point(_blur(lung_vis, 1.2 * r / sc.px) * lung_vis, q)
            dx, dy = X - X[i, j], Y - Y[i, j]
            rr = np.sqrt(dx * dx + dy * dy)
            rad = _F(r) * (1.0 + _F(lobe) * np.sin(_F(k) * np.arctan2(dy, dx) + _F(phase)))
            prof = np.clip(1.0 - (rr / rad) ** 2, 0, None)
            extra += _F(amp * p.air) * np.sqrt(prof) * smoothstep(prof * _F(1 / 0.15))
            mask |= rr < rad
        return extra, lung_vis, mask
    if kind == "consolidation":
        i, j = _pick_point(side_lung, lesion["pick"], 0.95)
        c, s = _F(math.cos(lesion["rot"])), _F(math.sin(lesion["rot"]))
        dx, dy = X - X[i, j], Y - Y[i, j]
        xr, yr = (dx * c + dy * s) * _F(1 / lesion["a"]), (-dx * s + dy * c) * _F(1 / lesion["b"])
        env = np.clip(1.0 - (xr * xr + yr * yr), 0.0, None)
        rng = np.random.default_rng(lesion["seed"])
        # patchy, ill-defined air-space filling: a noisy field under a soft elliptical envelope
        patchy = 0.55 + 0.45 * _smooth_noise(rng, n, 10) + 0.3 * _smooth_noise(rng, n, 32)
        patch = np.clip(env * 1.6 * patchy, 0.0, 1.0) * side_lung
        extra += _F(lesion["fill"]) * air * patch
        return extra, lung_vis, patch > 0.3
    if kind == "effusion":
        level = _F(base - lesion["h"]) - _F(lesion["men"]) * np.clip(X * _F(side / lw), 0, 1.2) ** 2
        fluid = sigmoid((Y - level) * _F(1 / lesion["edge"]))
        extra += _F(lesion["fill"]) * air * fluid * side_lung
        mask = (fluid > 0.5) & (side_lung > 0.5)
        return extra, lung_vis * (1.0 - 0.8 * fluid * side_lung), mask
    if kind == "pneumothorax":
        centre = (side * (p.med_w + 0.05), base - 0.08, lesion["f"])
        shrunk = sc.soft(_lung_sdf(sc, side, lw, base, centre), 0.8)
        # air collects apically and laterally; the medial edge along the mediastinum stays attached
        where = np.maximum(smoothstep((X * _F(side) - _F(p.med_w + 0.05)) * _F(1 / 0.05)),
                           smoothstep((_F(p.apex_y + 0.1) - Y) * _F(1 / 0.05)))
        gap = side_lung * (1.0 - shrunk) * where
        inner = _blur_small(side_lung, 2.0) > 0.9
        m = _blur_small(shrunk, 0.8)
        line = 4.0 * m * (1.0 - m) * inner
        extra += -_F(lesion["dark"]) * gap + _F(lesion["line"]) * line
        return extra, lung_vis * (1.0 - gap), (gap > 0.5) & (side_lung > 0.5)
    if kind == "cardiomegaly":
        took = np.clip(heart_in_l - heart_in, 0, 1) * np.minimum(lung_l + lung_r, 1.0)
        return extra, lung_vis, took > 0.5
    raise ValueError(f"Unknown lesion kind '{kind}'.")


def seed_sequence(seed: int | Sequence[int]) -> np.random.SeedSequence:
    return np.random.SeedSequence(int(seed) if isinstance(seed, (int, np.integer)) else [int(s) for s in seed])


def synthesize_cxr(
    patient_seed: int | Sequence[int],
    size: int = 256,
    lesion: str | None = None,
    lesion_seed: int | Sequence[int] | None = None,
) -> PhantomSample:
    """Draws one chest-radiograph phantom, healthy or with a lesion.

    The patient (anatomy, acquisition, noise) depends on ``patient_seed`` only, so the same seed with
    ``lesion=None`` gives the lesion-free twin of an abnormal sample.

    Args:
        patient_seed: int or sequence of ints (``numpy.random.SeedSequence`` entropy).
        size: image side in pixels (square, a multiple of 8 of at least 64); anatomy scales with it.
        lesion: ``None`` (healthy) or one of :data:`LESION_KINDS`.
        lesion_seed: seed of the lesion's size, place and contrast; defaults to one derived from ``patient_seed``.

    Returns:
        a :class:`PhantomSample`.

    Example::

        >>> healthy = synthesize_cxr(7)
        >>> sick = synthesize_cxr(7, lesion="nodule")
        >>> bool(abs(sick.image - healthy.image)[sick.mask].mean() > 0.01)
        True
    """
    if size < 64 or size % 8:
        raise ValueError(f"size must be a multiple of 8 of at least 64 pixels, got {size}.")
    if lesion is not None and lesion not in LESION_KINDS:
        raise ValueError(f"Unknown lesion kind '{lesion}'; expected one of {LESION_KINDS} or None.")
    anat_ss, noise_ss, vessel_ss, lesion_ss = seed_sequence(patient_seed).spawn(4)
    patient = _sample_patient(np.random.default_rng(anat_ss))
    lesion_params = None
    if lesion is not None:
        lrng = np.random.default_rng(lesion_ss if lesion_seed is None else seed_sequence(lesion_seed))
        lesion_params = _sample_lesion(lrng, lesion)
    img, mask = _render(patient, size, np.random.default_rng(noise_ss), np.random.default_rng(vessel_ss), lesion_params)
    return PhantomSample(image=img, mask=mask, lesion=lesion or "none")
