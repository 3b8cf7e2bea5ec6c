"""Figures of the demo data: :func:`make_demo_figure` tiles demo test images with their lesions outlined."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .dataset import SPLIT_CODES, abnormal_kinds
from .render import LESION_KINDS, synthesize_cxr

__all__ = ["make_demo_figure"]


def make_demo_figure(
    output_png: str | os.PathLike,
    n_normal: int = 4,
    n_abnormal: int = 8,
    size: int = 256,
    seed: int = 0,
    columns: int = 4,
) -> Path:
    """Tiles demo test images, healthy ones first, then abnormal ones with their lesion outlined in red.

    The tiles are the first test items of the demo dataset with the same ``seed`` (regenerated in memory, so no
    dataset is needed); abnormal tiles are chosen to show every lesion kind first.

    Args:
        output_png: file to write.
        n_normal: number of healthy tiles.
        n_abnormal: number of abnormal tiles.
        size: tile side in pixels.
        seed: demo dataset seed.
        columns: tiles per row.

    Returns:
        the path written.

    Example::

        >>> make_demo_figure("demo_cxr.png")
        PosixPath('demo_cxr.png')
    """
    from PIL import Image, ImageDraw

    kinds = abnormal_kinds(max(n_abnormal * 3, 20), seed)
    picked: list[int] = []
    for kind in LESION_KINDS:  # one of each kind first, then in order
        if kind in kinds and len(picked) < n_abnormal:
            picked.append(kinds.index(kind))
    for i in range(len(kinds)):
        if len(picked) >= n_abnormal:
            break
        if i not in picked:
            picked.append(i)
    tiles: list[tuple[np.ndarray, np.ndarray, str]] = []
    for i in range(n_normal):
        s = synthesize_cxr([seed, SPLIT_CODES["test_normal"], i], size=size)
        tiles.append((*s.to_uint8(), "normal"))
    for i in picked:
        s = synthesize_cxr([seed, SPLIT_CODES["test_abnormal"], i], size=size, lesion=kinds[i])
        tiles.append((*s.to_uint8(), kinds[i]))
    rows = max(1, math.ceil(len(tiles) / columns))
    pad = 4
    canvas = Image.new("RGB", (columns * (size + pad) + pad, rows * (size + pad) + pad), (0, 0, 0))
    for t, (img, mask, label) in enumerate(tiles):
        rgb = np.repeat(img[..., None], 3, axis=2)
        m = mask > 0
        if m.any():
            inner = m.copy()
            inner[1:, :] &= m[:-1, :]
            inner[:-1, :] &= m[1:, :]
            inner[:, 1:] &= m[:, :-1]
            inner[:, :-1] &= m[:, 1:]
            rgb[m & ~inner] = (255, 40, 40)
        tile = Image.fromarray(rgb)
        draw = ImageDraw.Draw(tile)
        draw.rectangle([2, size - 14, 8 + 7 * len(label), size - 2], fill=(0, 0, 0))
        draw.text((5, size - 14), label, fill=(255, 255, 0) if label != "normal" else (120, 255, 120))
        r, c = divmod(t, columns)
        canvas.paste(tile, (pad + c * (size + pad), pad + r * (size + pad)))
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output_png)
    return output_png

