"""A MONAI Label local datastore that keeps every write inside the studies folder and stores images only.

MONAI Label's ``LocalDatastore`` joins the request's image id, label tag and uploaded file name to the studies folder
as they come, so ``PUT /datastore/image?image=<absolute path>`` writes (and overwrites) files anywhere and ``DELETE``
removes them. :class:`CheckedLocalDatastore` checks each write first (rules in :mod:`medad_monai.apps.label.security`):

- read-only unless the server runs the ``annotate`` or ``train`` profile (403);
- image ids and label tags are plain names (:func:`~medad_monai.apps.label.security.check_new_id`, 400), an existing
  image is never overwritten (409), removing or labelling an image needs it to exist (404);
- uploads must have an image extension (415), a size between 1 byte and ``max_upload_mb`` (413) and be readable by
  :func:`medad_monai.data.load_image` as a 2D image (422, with the reader's reason) before anything is stored.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from monailabel.datastore.local import LocalDatastore

from medad_monai.data.readers import ImageReadError, load_image

from .security import DEFAULT_MAX_UPLOAD_MB, ClientError, check_lookup_id, check_new_id, check_upload_name

__all__ = ["CheckedLocalDatastore", "check_upload_image"]

logger = logging.getLogger(__name__)

#: smallest and largest accepted image side (pixels): smaller is not a radiograph, larger would exhaust memory.
MIN_SIDE, MAX_SIDE = 8, 16384


def check_upload_image(path: str, max_bytes: int, what: str = "uploaded image") -> str:
    """Refuses an upload that is not a sane, readable 2D image; returns its extension.

    Raises:
        ClientError: 415 not an image type, 413 empty or too large, 422 unreadable or not 2D (the reader's reason).
    """
    ext = check_upload_name(path, what)
    size = os.path.getsize(path)
    if size == 0 or size > max_bytes:
        raise ClientError(
            413, f"{what} is {size} bytes; accepted: 1 byte to {max_bytes / 2**20:g} MB (--conf max_upload_mb)."
        )
    try:
        image, _ = load_image(path)
    except ImageReadError as e:
        raise ClientError(422, f"{what} is not a readable {ext} image: {e.problem}") from None
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's fault here
        raise ClientError(422, f"{what} is not a readable {ext} image: {type(e).__name__}: {e}") from None
    h, w = image.shape[-2:]
    if image.ndim != 3 or not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise ClientError(
            422, f"{what} has shape {tuple(image.shape)}; expected one 2D image with sides {MIN_SIDE}..{MAX_SIDE} px."
        )
    if not np.isfinite(image).all():
        raise ClientError(422, f"{what} holds NaN or infinite values.")
    return ext


class CheckedLocalDatastore(LocalDatastore):
    """``LocalDatastore`` whose writes are checked (see the module docstring).

    Args:
        datastore_path: the studies folder.
        writable: allow uploads, labels, deletes and info updates (``annotate``/``train`` profiles).
        max_upload_mb: largest accepted upload.
        kwargs: passed to ``LocalDatastore`` (``extensions``, ``auto_reload``, ``read_only``).
    """

    def __init__(
        self, datastore_path: str, writable: bool = False, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, **kwargs: Any
    ) -> None:
        super().__init__(datastore_path, **kwargs)
        self.writable = bool(writable)
        self.max_upload_bytes = int(max_upload_mb * 2**20)

    # -- checks ----------------------------------------------------------------------------------------------------
    def _check_writable(self, action: str) -> None:
        if not self.writable:
            raise ClientError(
                403,
                f"{action}: this server's datastore is read-only (start it with --conf profile annotate or train to "
                "accept uploads).",
            )

    def _check_image(self, image_id: Any) -> str:
        image_id = check_lookup_id(image_id)
        if image_id not in self._datastore.objects:
            raise ClientError(404, f"image {image_id[:80]!r} is not in the datastore.")
        return image_id

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        info = super().get_image_info(image_id)
        info.pop("path", None)  # an absolute server path; clients fetch the image by its id
        return info

    # -- writes ----------------------------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        self._check_writable("upload")
        check_new_id(image_id, "image id")
        if image_id in self._datastore.objects:
            raise ClientError(409, f"image {image_id!r} exists; remove it first (DELETE /datastore/image?id=...).")
        check_upload_image(image_filename, self.max_upload_bytes)
        if not isinstance(image_info, dict):
            raise ClientError(400, "params must be a JSON object.")
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        self._check_writable("delete")
        super().remove_image(self._check_image(image_id))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        self._check_writable("label upload")
        image_id = self._check_image(image_id)
        check_new_id(label_tag, "label tag")
        check_upload_image(label_filename, self.max_upload_bytes, "uploaded label")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._check_writable("label delete")
        check_new_id(label_tag, "label tag")
        if not self.get_label_uri(check_lookup_id(label_id, "label"), label_tag):
            raise ClientError(404, f"label {label_id[:80]!r} with tag {label_tag!r} is not in the datastore.")
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self._check_writable("image info update")
        super().update_image_info(self._check_image(image_id), info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        self._check_writable("label info update")
        check_new_id(label_tag, "label tag")
        if not self.get_label_uri(check_lookup_id(label_id, "label"), label_tag):
            raise ClientError(404, f"label {label_id[:80]!r} with tag {label_tag!r} is not in the datastore.")
        super().update_label_info(label_id, label_tag, info)
