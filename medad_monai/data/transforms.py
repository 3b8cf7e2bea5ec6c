"""MONAI dictionary transforms that load anomaly-detection items for the bundle configs.

Item contract (what one dataset item looks like after :func:`anomaly_transforms`; every key is present in every
item so that MONAI's default collate works on mixed normal/abnormal batches):

==============  ==========================================  ==================================================
key             value                                       notes
==============  ==========================================  ==================================================
``image``       float32 tensor ``(C, H, W)`` in ``[0, 1]``  read by :func:`~medad_monai.data.readers.load_image`
``image_path``  ``str``                                     source file, so writers can name their outputs
``label``       ``int``                                     0 normal, 1 abnormal; **absent -> 0** (our choice:
                                                            training/validation lists hold healthy images and
                                                            usually carry no label)
``mask``        float32 tensor ``(1, H, W)`` in ``{0, 1}``  all zeros when the item has no ``mask`` entry
``has_mask``    ``int``                                     1 if the item named a mask file, else 0
``mask_path``   ``str``                                     the mask file, or ``""``
==============  ==========================================  ==================================================

``has_mask`` means "a pixel annotation was supplied", nothing more: an abnormal item without a mask has
``has_mask == 0`` and must be left out of pixel-level metrics, while a normal test item counts as annotated only if
its datalist entry names a (typically all-zero) mask file, as the embedded demo data does. Other keys of the item
(``task``, ``lesion``, ...) pass through untouched.

Resizing (``Resized``): bilinear with ``align_corners=False`` and no anti-aliasing for images, which is what the
original MorphAEus training pipeline does (torchvision 0.10 ``Resize`` on tensors); ``antialias=True`` adds MONAI's
Gaussian anti-aliasing, closer to PIL's bilinear downsampling used by MedIAnomaly and by MorphAEus' test loader.
Masks use ``nearest-exact`` so they stay binary.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, EnsureTyped, MapTransform, Resized

from .readers import ImageReadError, load_image, load_mask

__all__ = ["LoadAnomalyImaged", "anomaly_transforms"]


class LoadAnomalyImaged(MapTransform):
    """Loads images, optional masks and the label of one datalist item (see the module docstring for the contract).

    Args:
        keys: image keys; each is read with :func:`load_image` and its source path is stored under ``"<key>_path"``.
            A value that is already an array/tensor ``(C, H, W)`` is kept as is (path ``""``).
        channels: 1 (grey) or 3 (RGB), see :func:`load_image`.
        mask_keys: mask keys; a present, non-empty entry is read with :func:`load_mask`, an absent one becomes an
            all-zero ``(1, H, W)`` mask. ``"has_<key>"`` (0/1) and ``"<key>_path"`` are added either way.
        label_key: key of the image-level label; set to ``default_label`` when absent. ``None`` leaves labels alone.
        default_label: label of items without one (0: lists without labels are healthy training/validation lists).
        drop_keys: keys removed from the item (e.g. ``"mask"`` when masks are not wanted but some items name one).
        allow_missing_keys: do not fail when an image key is missing.

    Raises:
        ImageReadError: a file cannot be read, or a mask's size differs from its image's.

    Example::

        >>> t = LoadAnomalyImaged(keys="image")
        >>> d = t({"image": "cxr.png", "label": 1, "mask": "cxr_mask.png"})
        >>> d["image"].shape, d["has_mask"], d["image_path"]
        ((1, 1024, 1024), 1, 'cxr.png')
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        channels: int = 1,
        mask_keys: Sequence[str] | str = ("mask",),
        label_key: str | None = "label",
        default_label: int = 0,
        drop_keys: Sequence[str] | str = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}.")
        self.channels = channels
        self.mask_keys = (mask_keys,) if isinstance(mask_keys, str) else tuple(mask_keys)
        self.label_key = label_key
        self.default_label = int(default_label)
        self.drop_keys = (drop_keys,) if isinstance(drop_keys, str) else tuple(drop_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.drop_keys:
            d.pop(key, None)
        ref_shape: tuple[int, int] | None = None
        ref_path = ""
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                img, _ = load_image(value, channels=self.channels)
                path = str(value)
            elif isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 3:
                img, path = value, ""
            else:
                raise TypeError(f"'{key}' must be a file path or a (C, H, W) array, got {type(value).__name__}.")
            d[key] = img
            d[f"{key}_path"] = path
            if ref_shape is None:
                ref_shape, ref_path = tuple(int(s) for s in img.shape[-2:]), path
        for key in self.mask_keys:
            value = d.get(key)
            has = value is not None and not (isinstance(value, str) and value == "")
            if has and isinstance(value, (str, os.PathLike)):
                mask = load_mask(value)
                path = str(value)
            elif has and isinstance(value, (np.ndarray, torch.Tensor)):
                mask = (np.asarray(value, dtype=np.float32).reshape((1,) + tuple(value.shape[-2:])) > 0.5)
                mask, path = mask.astype(np.float32), ""
            elif has:
                raise TypeError(f"'{key}' must be a file path or an array, got {type(value).__name__}.")
            else:
                if ref_shape is None:
                    raise ValueError(f"cannot make an empty '{key}' without a loaded image to take its size from.")
                mask, path = np.zeros((1,) + ref_shape, dtype=np.float32), ""
            if ref_shape is not None and tuple(mask.shape[-2:]) != ref_shape:
                raise ImageReadError(
                    path or key,
                    f"mask size {tuple(mask.shape[-2:])} differs from the size {ref_shape} of image '{ref_path}'",
                )
            d[key] = mask
            d[f"has_{key}"] = int(has)
            d[f"{key}_path"] = path
        if self.label_key is not None:
            label = d.get(self.label_key, None)
            d[self.label_key] = self.default_label if label is None else int(label)
        return d


def anomaly_transforms(
    spatial_size: Sequence[int] | int = (128, 128),
    channels: int = 1,
    with_mask: bool = True,
    antialias: bool = False,
    image_key: str = "image",
    mask_key: str = "mask",
    label_key: str = "label",
) -> Compose:
    """Builds ``load -> resize -> ensure types`` for anomaly-detection datalist items.

    The output follows the contract in the module docstring. 128x128 is the MorphAEus input size
    (``morphaeus.yaml``); MedIAnomaly uses 64.

    Args:
        spatial_size: output ``(H, W)`` (an int means square).
        channels: 1 or 3 image channels.
        with_mask: load masks (``mask``, ``has_mask``, ``mask_path`` keys); if False the mask key is dropped.
        antialias: Gaussian anti-aliasing before bilinear downsampling of images (default off, as MorphAEus).
        image_key: key of the image path.
        mask_key: key of the mask path.
        label_key: key of the label.

    Returns:
        a ``monai.transforms.Compose``.

    Example::

        >>> from monai.data import Dataset, DataLoader
        >>> ds = Dataset(load_datalist("datalist.json", "test"), transform=anomaly_transforms((128, 128)))
        >>> batch = next(iter(DataLoader(ds, batch_size=4)))
        >>> batch["image"].shape, batch["mask"].shape, batch["has_mask"]
        (torch.Size([4, 1, 128, 128]), torch.Size([4, 1, 128, 128]), tensor([1, 1, 0, 0]))
    """
    size = (int(spatial_size),) * 2 if isinstance(spatial_size, int) else tuple(int(s) for s in spatial_size)
    if len(size) != 2:
        raise ValueError(f"spatial_size must have 2 values (H, W), got {spatial_size}.")
    mask_keys = (mask_key,) if with_mask else ()
    xforms: list = [
        LoadAnomalyImaged(
            keys=image_key,
            channels=channels,
            mask_keys=mask_keys,
            label_key=label_key,
            drop_keys=() if with_mask else (mask_key,),
        ),
        Resized(keys=image_key, spatial_size=size, mode="bilinear", align_corners=False, anti_aliasing=antialias),
    ]
    if with_mask:
        xforms.append(Resized(keys=mask_key, spatial_size=size, mode="nearest-exact"))
    xforms.append(
        EnsureTyped(
            keys=[image_key, mask_key] if with_mask else [image_key],
            data_type="tensor",
            dtype=torch.float32,
            track_meta=False,
        )
    )
    return Compose(xforms)
