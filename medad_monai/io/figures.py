"""Colour maps, contours and overlay figures for anomaly maps (numpy + PIL only).

The figures follow the layout recommended in ``shared/reference/anchors.md`` §7 (our choice among the surveyed
tools): ``input | reconstruction | heatmap over the input``, with the outline of the thresholded map drawn on the
heatmap, as anomalib's ``contour`` overlay mode does. Two rules come from the failure modes listed there (§4 #2):

* the heatmap colour scale is **fixed across images** (``vmin``/``vmax`` come from calibration on healthy data, or
  a constant); a map is never min-max normalised per image, because that makes every normal image look anomalous;
* the thresholded outline uses the same calibrated ``pixel_threshold`` as the metrics.

Arrays may be numpy arrays or CPU/GPU torch tensors (converted with ``.detach().cpu().numpy()``; torch is not
imported here). Images are channel-first ``(C, H, W)`` with C = 1 or 3, or ``(H, W)``, float in [0, 1] (values
outside are clipped) or uint8. Axis 0 of the spatial array is drawn as the vertical axis (rows) of the figure.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "to_numpy",
    "colormap_lut",
    "colorize",
    "contour",
    "overlay_panel",
    "default_vmax",
    "grid",
    "PRED_CONTOUR_RGB",
    "GT_CONTOUR_RGB",
]

#: colour of the outline of ``anomaly_map > pixel_threshold`` (cyan: absent from inferno, so it never blends in).
PRED_CONTOUR_RGB = (0, 255, 255)
#: colour of the ground-truth outline (green).
GT_CONTOUR_RGB = (0, 255, 0)

_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_MUTED = (170, 170, 170)

# A handful of evenly spaced sRGB stops of the perceptually uniform "inferno" map (Smith & van der Walt, 2015),
# rounded to 8 bits; the 256-entry table is linearly interpolated between them. Eleven stops keep the maximum
# deviation from the full-resolution map to a few 8-bit levels, which is invisible in an overlay.
_INFERNO_STOPS = (
    (0, 0, 4),
    (22, 11, 57),
    (66, 10, 104),
    (106, 23, 110),
    (147, 38, 103),
    (188, 55, 84),
    (221, 81, 58),
    (243, 120, 25),
    (252, 165, 10),
    (246, 215, 70),
    (252, 255, 164),
)


def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors (MONAI ``MetaTensor`` included) are detached and moved to the CPU
    without importing torch. The one array conversion of the figure and file writers (:mod:`medad_monai.io.writers`).

    Example::

        >>> to_numpy([[0, 1]]).shape
        (1, 2)
    """
    if hasattr(x, "detach"):
        x = x.detach()
        if hasattr(x, "cpu"):
            x = x.cpu()
        if hasattr(x, "as_tensor"):  # MONAI MetaTensor: drop the metadata wrapper before numpy conversion
            x = x.as_tensor()
        x = x.numpy()
    return np.asarray(x)


@lru_cache(maxsize=None)
def _lut_cached(cmap: str) -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    if cmap == "inferno":
        stops = np.asarray(_INFERNO_STOPS, dtype=np.float64)
        pos = np.linspace(0.0, 1.0, len(stops))
        rgb = np.stack([np.interp(x, pos, stops[:, c]) for c in range(3)], axis=-1)
    elif cmap == "jet":
        # The classic piecewise-linear "jet": each channel is a trapezoid centred at 3/4 (red), 1/2 (green) and
        # 1/4 (blue) of the range; written analytically.
        rgb = 255.0 * np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1)
    elif cmap == "gray":
        rgb = 255.0 * np.repeat(x[:, None], 3, axis=1)
    else:
        raise ValueError(f"unknown colormap {cmap!r}; expected 'inferno', 'jet' or 'gray'.")
    lut = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def colormap_lut(cmap: str = "inferno") -> np.ndarray:
    """Return the 256×3 uint8 lookup table of a colour map.

    Args:
        cmap: ``"inferno"`` (default; perceptually uniform, dark = normal), ``"jet"`` or ``"gray"``.

    Returns:
        A read-only ``(256, 3)`` uint8 array; row ``i`` is the colour of the normalised value ``i / 255``.
    """
    return _lut_cached(cmap)


def colorize(map2d: Any, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "inferno") -> np.ndarray:
    """Map a 2D array to RGB with a **fixed** value range.

    Values are scaled as ``(v - vmin) / (vmax - vmin)``, clipped to [0, 1] and looked up in a 256-entry table.
    The range is never taken from the map itself, so colours mean the same thing in every image; NaN is drawn
    with the ``vmin`` colour.

    Args:
        map2d: ``(H, W)`` or ``(1, H, W)`` array or tensor.
        vmin: value drawn with the lowest colour.
        vmax: value drawn with the highest colour; must be greater than ``vmin``.
        cmap: ``"inferno"``, ``"jet"`` or ``"gray"`` (see :func:`colormap_lut`).

    Returns:
        ``(H, W, 3)`` uint8 RGB array.

    Example:
        >>> rgb = colorize(np.random.rand(64, 64), vmin=0.0, vmax=0.5)
        >>> rgb.shape, rgb.dtype
        ((64, 64, 3), dtype('uint8'))
    """
    m = _as_2d(map2d, "map2d").astype(np.float64)
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmax <= vmin:
        raise ValueError(f"colorize needs finite vmin < vmax, got vmin={vmin!r}, vmax={vmax!r}.")
    t = np.nan_to_num((m - vmin) / (vmax - vmin), nan=0.0, posinf=1.0, neginf=0.0)
    idx = np.rint(np.clip(t, 0.0, 1.0) * 255.0).astype(np.intp)
    return colormap_lut(cmap)[idx]


def contour(mask2d: Any, thickness: int = 1, outer: bool = False) -> np.ndarray:
    """Return the outline of a binary mask.

    The inner outline is ``mask & ~erode(mask)``, where the erosion uses the 4-neighbourhood (a pixel survives
    when it and its up/down/left/right neighbours are set) repeated ``thickness`` times. Pixels outside the image
    count as background, so a region touching the border is closed along the border. The outer outline is the
    mirror image, ``dilate(mask) & ~mask`` (4-neighbour dilation); it lets two outlines of the same region (e.g.
    prediction and ground truth) be drawn side by side instead of on top of each other.

    Args:
        mask2d: ``(H, W)`` or ``(1, H, W)`` array; non-zero (or ``True``) is foreground.
        thickness: width of the outline in pixels (>= 1).
        outer: return the ring just outside the mask instead of the one just inside.

    Returns:
        ``(H, W)`` bool array, ``True`` on the outline; a subset of the mask (inner) or of its complement (outer).

    Example:
        >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
        >>> int(contour(m).sum())  # the 3x3 square minus its centre
        8
    """
    if int(thickness) < 1:
        raise ValueError(f"contour thickness must be >= 1, got {thickness!r}.")
    mask = _as_2d(mask2d, "mask2d").astype(bool)
    if outer:
        grown = mask
        for _ in range(int(thickness)):
            p = np.pad(grown, 1, mode="constant", constant_values=False)
            grown = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        return grown & ~mask
    eroded = mask
    for _ in range(int(thickness)):
        p = np.pad(eroded, 1, mode="constant", constant_values=False)
        eroded = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~eroded


def overlay_panel(
    image: Any,
    reconstruction: Any | None,
    anomaly_map: Any,
    pixel_threshold: float | None = None,
    vmin: float = 0.0,
    vmax: float | None = None,
    gt_mask: Any | None = None,
    title: str | None = None,
    scale: int = 2,
    alpha: float = 0.5,
    cmap: str = "inferno",
    contour_thickness: int | None = None,
    colorbar: bool = True,
    transpose: bool = False,
) -> Image.Image:
    """Draw ``input | reconstruction | anomaly map`` as one RGB strip.

    The third panel blends the colour-mapped anomaly map over the input (``(1 - alpha) * input + alpha * heat``)
    and draws the inner outline of ``anomaly_map > pixel_threshold`` in cyan and, when given, the outer outline of
    the ground-truth mask in green (inner/outer so that both stay visible where they coincide). Each panel has a
    small header; an optional ``title`` line (e.g. file name, score and label) goes on top, and a colour bar with
    the ``vmin``/threshold/``vmax`` ticks and a contour legend go underneath.

    The heatmap scale is **fixed**: ``vmin``/``vmax`` are passed in (e.g. from the calibration on healthy
    validation data) and are the same for every image. The map is never rescaled per image, so a normal image
    stays dark. When ``vmax`` is None it defaults to ``vmin + 2 * (pixel_threshold - vmin)`` (the threshold sits
    mid-scale, matching a calibration that maps the threshold to 0.5) or to 1.0 without a threshold (the largest
    absolute residual of images in [0, 1]). These defaults are our choice.

    Args:
        image: ``(C, H, W)`` with C = 1 or 3, or ``(H, W)``; float in [0, 1] or uint8.
        reconstruction: same shape as ``image`` (the pseudo-healthy image), or None for a two-panel strip.
        anomaly_map: ``(H, W)`` or ``(1, H, W)`` non-negative map on the image grid.
        pixel_threshold: draw the outline of ``anomaly_map > pixel_threshold``; None draws no outline.
        vmin: map value shown with the darkest colour.
        vmax: map value shown with the brightest colour (see above for the default).
        gt_mask: optional ``(H, W)`` or ``(1, H, W)`` ground-truth mask, drawn as a green outline.
        title: optional text line above the panels.
        scale: integer up-scaling of every panel (nearest neighbour, so pixels stay honest).
        alpha: heatmap opacity in the blend, in [0, 1].
        cmap: colour map name (see :func:`colormap_lut`).
        contour_thickness: outline width in output pixels; default ``max(1, scale // 2 + 1)``.
        colorbar: draw the colour bar and contour legend under the panels.
        transpose: show the arrays transposed (swap H and W). Use it when the arrays come from MONAI's
            ``PILReader`` with its default ``reverse_indexing=True``, which puts the PNG width first, so the figure
            looks like the source PNG.

    Returns:
        An RGB ``PIL.Image``. ``image.info["panel_boxes"]`` holds the ``(x0, y0, x1, y1)`` pixel box of each panel
        (for tests and downstream cropping); writers store it as a PNG text chunk.

    Example:
        >>> img = np.full((1, 64, 64), 0.5, np.float32)
        >>> amap = np.zeros((1, 64, 64), np.float32); amap[0, 20:30, 20:30] = 0.8
        >>> fig = overlay_panel(img, img, amap, pixel_threshold=0.4, vmax=0.8, title="case 1  score 0.12")
        >>> fig.mode
        'RGB'
    """
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"overlay_panel scale must be a positive integer, got {scale!r}.")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"overlay_panel alpha must be in [0, 1], got {alpha!r}.")
    img = _to_rgb_float(image, "image")
    h, w = img.shape[:2]
    rec = None if reconstruction is None else _to_rgb_float(reconstruction, "reconstruction")
    if rec is not None and rec.shape[:2] != (h, w):
        raise ValueError(f"reconstruction has spatial shape {rec.shape[:2]}, image has {(h, w)}.")
    amap = _as_2d(anomaly_map, "anomaly_map").astype(np.float64)
    if amap.shape != (h, w):
        raise ValueError(f"anomaly_map has spatial shape {amap.shape}, image has {(h, w)}.")
    gt = None
    if gt_mask is not None:
        gt = _as_2d(gt_mask, "gt_mask") > 0
        if gt.shape != (h, w):
            raise ValueError(f"gt_mask has spatial shape {gt.shape}, image has {(h, w)}.")
    if vmax is None:
        vmax = default_vmax(vmin, pixel_threshold)
    if transpose:
        img = img.transpose(1, 0, 2)
        rec = None if rec is None else rec.transpose(1, 0, 2)
        amap = amap.T
        gt = None if gt is None else gt.T
        h, w = w, h

    heat = colorize(amap, vmin, vmax, cmap).astype(np.float64) / 255.0
    blend = (1.0 - alpha) * img + alpha * heat
    panels = [img] + ([rec] if rec is not None else []) + [blend]
    labels = ["input"] + (["reconstruction"] if rec is not None else []) + ["anomaly map"]
    up = [_upscale(_float_to_uint8(p), scale) for p in panels]

    thick = max(1, scale // 2 + 1) if contour_thickness is None else int(contour_thickness)
    pred_drawn = gt_drawn = False
    if pixel_threshold is not None:
        pred = np.nan_to_num(amap, nan=-np.inf) > pixel_threshold
        edge = contour(_upscale(pred, scale), thick)
        up[-1][edge] = PRED_CONTOUR_RGB
        pred_drawn = True
    if gt is not None:
        # outside the ground-truth region, so a prediction that matches it stays visible next to it
        edge = contour(_upscale(gt, scale), thick, outer=True)
        up[-1][edge] = GT_CONTOUR_RGB
        gt_drawn = True

    # layout: [title] / headers / panels / [colour bar + legend]
    pw, ph = w * scale, h * scale
    pad = max(4, scale * 2)
    font = _font(int(np.clip(round(pw / 17), 10, 16)))
    fh = _text_height(font)
    title_h = fh + pad + 2 if title else 0
    header_h = fh + pad
    foot_h = (8 + 3 + fh + pad) if colorbar else 0
    n = len(up)
    width = n * pw + (n + 1) * pad
    height = pad + title_h + header_h + ph + foot_h + pad
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = pad
    if title:
        _draw_fitted(draw, (pad, y), title, width - 2 * pad, _font(int(np.clip(round(pw / 15), 11, 18))), _TEXT)
        y += title_h
    boxes = []
    for i, (arr, label) in enumerate(zip(up, labels)):
        x0 = pad + i * (pw + pad)
        tw = _text_width(draw, label, font)
        _draw_fitted(draw, (x0 + max(0, (pw - tw) // 2), y), label, pw, font, _TEXT)
        canvas.paste(Image.fromarray(arr, "RGB"), (x0, y + header_h))
        boxes.append((x0, y + header_h, x0 + pw, y + header_h + ph))
    y += header_h + ph
    if colorbar:
        _draw_colorbar(draw, canvas, boxes[-1][0], y + 4, pw, vmin, vmax, pixel_threshold, cmap, font)
        _draw_legend(draw, boxes[0][0], y + 3, (n - 1) * (pw + pad) - pad, font, pred_drawn, gt_drawn)
    canvas.info["panel_boxes"] = json.dumps(boxes)
    return canvas


def default_vmax(vmin: float, pixel_threshold: float | None) -> float:
    """Top of the fixed heatmap scale when none is given (our choice).

    ``vmin + 2 * (pixel_threshold - vmin)`` puts the threshold mid-scale, like a calibration that maps the threshold
    to 0.5; without a threshold, 1.0, the largest absolute residual between images in [0, 1].
    """
    if pixel_threshold is not None and pixel_threshold > vmin:
        return float(vmin + 2.0 * (pixel_threshold - vmin))
    return 1.0


def grid(
    images: Sequence[Image.Image | np.ndarray],
    ncols: int = 4,
    pad: int = 6,
    background: tuple[int, int, int] = _BACKGROUND,
    title: str | None = None,
) -> Image.Image:
    """Tile figures (e.g. :func:`overlay_panel` strips) row by row into one summary image.

    Cells are as large as the largest input; smaller inputs are placed at the cell's top-left corner.

    Args:
        images: PIL images or ``(H, W, 3)``/``(H, W)`` uint8 arrays.
        ncols: number of columns (the last row may be partly empty).
        pad: gap between cells and around the border, in pixels.
        background: RGB fill colour.
        title: optional text line on top.

    Returns:
        An RGB ``PIL.Image``.

    Example:
        >>> tiles = [Image.new("RGB", (40, 30), (i * 40, 0, 0)) for i in range(5)]
        >>> grid(tiles, ncols=2, pad=2).size
        (86, 98)
    """
    if int(ncols) < 1:
        raise ValueError(f"grid ncols must be >= 1, got {ncols!r}.")
    pics = [im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(to_numpy(im)).convert("RGB")
            for im in images]
    if not pics:
        raise ValueError("grid needs at least one image.")
    ncols = min(int(ncols), len(pics))
    nrows = -(-len(pics) // ncols)
    cw = max(p.width for p in pics)
    ch = max(p.height for p in pics)
    font = _font(int(np.clip(round(cw / 40), 12, 20)))
    title_h = _text_height(font) + pad if title else 0
    canvas = Image.new("RGB", (ncols * cw + (ncols + 1) * pad, title_h + nrows * ch + (nrows + 1) * pad), background)
    if title:
        _draw_fitted(ImageDraw.Draw(canvas), (pad, pad), title, canvas.width - 2 * pad, font, _TEXT)
    for k, p in enumerate(pics):
        r, c = divmod(k, ncols)
        canvas.paste(p, (pad + c * (cw + pad), title_h + pad + r * (ch + pad)))
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _as_2d(x: Any, name: str) -> np.ndarray:
    a = to_numpy(x)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (H, W) or (1, H, W), got shape {tuple(a.shape)}.")
    return a


def _to_rgb_float(x: Any, name: str) -> np.ndarray:
    """(C,H,W) / (H,W) image -> (H,W,3) float in [0,1]."""
    a = to_numpy(x)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ValueError(f"{name} must be (H, W), (1, H, W) or (3, H, W), got shape {tuple(a.shape)}.")
    if a.dtype == np.uint8:
        a = a.astype(np.float64) / 255.0
    else:
        a = np.nan_to_num(a.astype(np.float64), nan=0.0)
    a = np.clip(a, 0.0, 1.0)
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    return np.ascontiguousarray(a.transpose(1, 2, 0))


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def _upscale(a: np.ndarray, s: int) -> np.ndarray:
    if s == 1:
        return a.copy()
    return np.repeat(np.repeat(a, s, axis=0), s, axis=1)


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # PIL's bundled font: scalable when Pillow has FreeType (>= 10.1), else the fixed 11 px bitmap font.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_height(font: Any) -> int:
    box = font.getbbox("Ag(|")
    return int(box[3])


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return int(box[2] - box[0])


def _draw_fitted(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, max_w: int, font: Any, fill) -> None:
    """Draw ``text``, cut with an ellipsis when it is wider than ``max_w``."""
    if _text_width(draw, text, font) > max_w:
        while text and _text_width(draw, text + "…", font) > max_w:
            text = text[:-1]
        text += "…"
    draw.text(xy, text, font=font, fill=fill)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _draw_colorbar(draw, canvas, x0, y0, width, vmin, vmax, thr, cmap, font) -> None:
    bar_h = 8
    ramp = colormap_lut(cmap)[np.rint(np.linspace(0, 255, width)).astype(np.intp)]
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[None], bar_h, axis=0)), "RGB"), (x0, y0))
    ty = y0 + bar_h + 2
    lo, hi = _fmt(vmin), _fmt(vmax)
    draw.text((x0, ty), lo, font=font, fill=_MUTED)
    draw.text((x0 + width - _text_width(draw, hi, font), ty), hi, font=font, fill=_MUTED)
    if thr is not None and vmin < thr < vmax:
        tx = x0 + int(round((thr - vmin) / (vmax - vmin) * (width - 1)))
        draw.line([(tx, y0 - 2), (tx, y0 + bar_h + 1)], fill=PRED_CONTOUR_RGB, width=2)
        label = f"t={_fmt(thr)}"
        lw = _text_width(draw, label, font)
        # keep the threshold label clear of the end labels
        left = x0 + _text_width(draw, lo, font) + 4
        right = x0 + width - lw - _text_width(draw, hi, font) - 4
        lx = int(np.clip(tx - lw // 2, left, right))
        if lx >= x0:
            draw.text((lx, ty), label, font=font, fill=PRED_CONTOUR_RGB)


def _draw_legend(draw, x0, y0, max_w, font, pred: bool, gt: bool) -> None:
    items = ([("map > t", PRED_CONTOUR_RGB)] if pred else []) + ([("ground truth", GT_CONTOUR_RGB)] if gt else [])
    fh = _text_height(font)
    x = x0
    for text, colour in items:
        tw = _text_width(draw, text, font)
        if x + 18 + tw > x0 + max_w:
            break
        cy = y0 + 4 + fh // 2
        draw.line([(x, cy), (x + 12, cy)], fill=colour, width=3)
        draw.text((x + 16, y0 + 4), text, font=font, fill=_TEXT)
        x += 16 + tw + 14
