"""Readers for 2D medical images: PNG/JPEG/BMP/TIFF, DICOM and 2D NIfTI, into float32 ``(C, H, W)`` in ``[0, 1]``.

One function, :func:`load_image`, turns any supported file into the array every model in this package consumes, and
:func:`load_mask` turns an annotation file into a binary ``(1, H, W)`` mask. Both raise :class:`ImageReadError`
(a ``ValueError``) naming the file and the problem for unreadable, corrupt or unsupported input.

Intensity scaling (all choices are ours unless noted):

- 8-bit PIL images (``L``, ``RGB``, ``RGBA``, palette ``P``, ``LA``; JPEG, PNG, BMP, TIFF) are divided by 255. This
  equals the ``To01`` step of the original MorphAEus code (divide by 255) and ``ToTensor`` in MedIAnomaly.
- 16- and 32-bit integer images (e.g. 16-bit PNG, Pillow modes ``I;16*`` and ``I``) are min-max scaled per image.
  A 16-bit container rarely holds 16 significant bits (12-bit detectors are common) and PNG files seldom say how
  many bits are used, so dividing by 65535 would make most such images nearly black; per-image min-max also matches
  how MedIAnomaly turns DICOMs into PNGs (``DDAD-ASR/data/preprocess_cxr.py``).
- Float images (TIFF mode ``F``) are kept as they are when already inside ``[0, 1]``, otherwise min-max scaled.
- DICOM: the Modality LUT / rescale slope-intercept is applied, then the VOI LUT or the first window
  (``pydicom.pixels.apply_modality_lut`` / ``apply_voi_lut``), then per-image min-max to ``[0, 1]``.
  ``MONOCHROME1`` images are inverted after that (``1 - x``), so bone and soft tissue are bright in every output,
  as in MedIAnomaly's CXR preprocessing. Colour DICOMs (``SamplesPerPixel == 3``; pydicom converts YBR to RGB) are
  divided by ``2**BitsStored - 1``. Multi-frame DICOMs raise an error rather than silently picking a frame.
- NIfTI: the stored scaling (``scl_slope``/``scl_inter``) is applied by nibabel, NaN/inf are replaced by the finite
  minimum, then per-image min-max.
- A constant image becomes all zeros.

Channels: ``channels=1`` turns RGB into luminance with the ITU-R BT.601 weights ``0.299 R + 0.587 G + 0.114 B``
(the weights Pillow's ``convert("L")`` uses, hence what MedIAnomaly's ``convert("L")`` does); ``channels=3``
repeats a grey image three times. Alpha channels are dropped (not composited).

Orientation: rows stay rows. PIL and DICOM arrays are ``(rows, columns)`` already. For NIfTI the first array axis
of nibabel's data (voxel axis ``i``, usually called x) becomes the image rows and the second (``j``) the columns;
no transpose and no reorientation by the affine is done. A NIfTI written by nibabel from a ``(H, W)`` numpy array
therefore reads back unchanged, while one written by SimpleITK/ITK from a ``(H, W)`` array (which ITK stores as
x = columns) reads back transposed. Masks are read with the same rule, so an image and its mask stay aligned.

Example::

    >>> img, meta = load_image("chest.dcm")          # (1, H, W) float32 in [0, 1]
    >>> rgb, _ = load_image("polyp.jpg", channels=3) # (3, H, W)
    >>> mask = load_mask("chest_mask.png")            # (1, H, W) float32 in {0, 1}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ImageReadError",
    "load_image",
    "load_mask",
    "read_raw",
    "SUPPORTED_EXTENSIONS",
]

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
SUPPORTED_EXTENSIONS = PIL_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS

# ITU-R BT.601 luma weights, the ones Pillow's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


class ImageReadError(ValueError):
    """An image or mask file could not be read; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"Cannot read image '{self.path}': {problem}")


def _sniff_format(path: Path) -> str:
    """Returns 'pil', 'dicom' or 'nifti' from the file name, falling back on magic bytes."""
    name = path.name.lower()
    if name.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    if name.endswith(DICOM_EXTENSIONS):
        return "dicom"
    if name.endswith(PIL_EXTENSIONS):
        return "pil"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise ImageReadError(path, f"cannot open the file ({e.strerror or e})") from e
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith((b"\x89PNG", b"\xff\xd8", b"BM", b"II*\x00", b"MM\x00*", b"GIF8")):
        return "pil"
    if head[:2] == b"\x1f\x8b" or (len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00")):
        return "nifti"
    raise ImageReadError(
        path, f"unsupported file type (extension '{path.suffix}'); supported: {', '.join(SUPPORTED_EXTENSIONS)}"
    )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(path, "the file does not exist")
    if not path.is_file():
        raise ImageReadError(path, "the path is not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "the file is empty")


def _read_pil(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                raise ImageReadError(path, f"multi-frame image with {n_frames} frames; only single 2D images are read")
            im.load()  # decode now, so truncated or corrupt data fails here rather than later
            mode = im.mode
            if mode == "P" or mode == "PA":
                im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                arr = np.array(im, dtype=np.uint16)
                return arr, {"source_mode": mode, "bit_depth": 16}
            arr = np.array(im)
            mode_out = im.mode
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"corrupt or unsupported image data ({type(e).__name__}: {e})") from e
    if mode_out in ("LA", "La"):
        arr = arr[..., 0]
    elif mode_out in ("RGBA", "RGBa", "RGBX"):
        arr = arr[..., :3]
    elif mode_out == "1":
        arr = arr.astype(np.uint8) * 255
    bit_depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16, np.dtype(np.int32): 32}.get(arr.dtype, None)
    return arr, {"source_mode": mode, "bit_depth": bit_depth}


def _pydicom_luts():
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _read_dicom_dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            # files without the 128-byte preamble are still common (old exports); force parses them
            ds = pydicom.dcmread(path, force=True)
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageReadError(path, f"corrupt or invalid DICOM ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM file has no PixelData (not an image, or not a DICOM file)")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        raise ImageReadError(path, f"multi-frame DICOM with {n_frames} frames; only single-frame 2D images are read")
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImageReadError(
            path,
            f"cannot decode DICOM pixel data (transfer syntax {ts}; compressed data may need pylibjpeg or "
            f"python-gdcm): {type(e).__name__}: {e}",
        ) from e
    return ds, np.asarray(arr)


def _read_dicom(path: Path, raw: bool) -> tuple[np.ndarray, dict[str, Any]]:
    ds, arr = _read_dicom_dataset(path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    meta: dict[str, Any] = {"source_mode": photometric, "bit_depth": bits_stored}
    if raw or samples != 1:
        meta["dicom_rgb"] = samples != 1
        return arr, meta
    if arr.ndim != 2:
        raise ImageReadError(path, f"expected a 2D monochrome DICOM pixel array, got shape {arr.shape}")
    apply_modality_lut, apply_voi_lut = _pydicom_luts()
    try:
        values = apply_modality_lut(arr, ds)
        values = apply_voi_lut(values, ds, index=0)
    except Exception as e:
        raise ImageReadError(path, f"cannot apply the DICOM modality/VOI LUT ({type(e).__name__}: {e})") from e
    meta["dicom_voi"] = bool("WindowCenter" in ds or "VOILUTSequence" in ds)
    meta["inverted"] = photometric == "MONOCHROME1"
    return np.asarray(values, dtype=np.float64), meta


def _read_nifti(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise ImageReadError(path, f"corrupt or invalid NIfTI ({type(e).__name__}: {e})") from e
    if data.dtype.fields is not None:
        raise ImageReadError(path, f"structured (e.g. RGB) NIfTI data type {data.dtype} is not supported")
    shape = data.shape
    kept = [s for s in shape if s != 1]
    if len(kept) > 2:
        raise ImageReadError(
            path, f"NIfTI with shape {shape} is a volume; only 2D images ((H, W), (H, W, 1), (H, W, 1, 1)) are read"
        )
    if len(kept) < 2:
        raise ImageReadError(path, f"NIfTI with shape {shape} is not a 2D image")
    data = data.reshape(kept)  # drops singleton axes, keeps the order of the two image axes (no transpose)
    return data, {"source_mode": str(data.dtype), "bit_depth": None}


def read_raw(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads the stored pixel values of a 2D image without intensity scaling.

    For DICOM no LUT is applied (stored values). Used by :func:`load_mask`, where the raw label values matter.

    Args:
        path: image file.

    Returns:
        ``(array, meta)``: array ``(H, W)`` or ``(H, W, 3)`` in the file's own dtype, and a dict with ``format``.

    Raises:
        ImageReadError: missing, empty, corrupt or unsupported file.
    """
    p = Path(path)
    _check_file(p)
    fmt = _sniff_format(p)
    if fmt == "pil":
        arr, meta = _read_pil(p)
    elif fmt == "dicom":
        arr, meta = _read_dicom(p, raw=True)
    else:
        arr, meta = _read_nifti(p)
    meta["format"] = fmt
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageReadError(p, f"unexpected pixel array shape {arr.shape}")
    if arr.ndim == 3:
        arr = arr[..., :3]
    if min(arr.shape[:2]) < 1:
        raise ImageReadError(p, f"empty image of shape {arr.shape}")
    return arr, meta


def _min_max(values: np.ndarray, path: Path) -> np.ndarray:
    """Scales to [0, 1]; an image holding NaN or infinite values is refused (filling them would invent pixels the
    model then scores)."""
    values = np.asarray(values, dtype=np.float64)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ImageReadError(
            path, f"{bad} of its {values.size} pixel values are NaN or infinite; replace them in the file (e.g. with "
            "numpy.nan_to_num and the value the scanner uses for background) before scoring it",
        )
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) float in [0, 1] -> (channels, H, W) float32."""
    if arr.ndim == 2:
        out = arr[None]
        if channels == 3:
            out = np.repeat(out, 3, axis=0)
    elif channels == 3:
        out = np.moveaxis(arr, -1, 0)
    else:
        out = np.tensordot(arr.astype(np.float64), _LUMA, axes=([-1], [0]))[None]
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def load_image(path: str | os.PathLike, channels: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Loads a 2D medical image as float32 ``(channels, H, W)`` in ``[0, 1]``.

    See the module docstring for the per-format intensity rules, channel conversion and orientation.

    Args:
        path: PNG/JPEG/BMP/TIFF/GIF/WebP, DICOM (``.dcm``/``.dicom`` or a file with the ``DICM`` preamble) or
            NIfTI (``.nii``/``.nii.gz``) file holding one 2D image.
        channels: 1 (grey; RGB is reduced to luminance) or 3 (RGB; grey is repeated).

    Returns:
        ``(image, meta)``. ``meta`` always has the keys ``filename_or_obj`` (str), ``format``
        (``"pil"``/``"dicom"``/``"nifti"``), ``spatial_shape`` (``(H, W)``), ``source_channels`` (1 or 3),
        ``source_mode``, ``bit_depth`` (int or None), ``intensity_scaling`` (``"divide_255"``, ``"min_max"``,
        ``"identity"``, ``"divide_bits_stored"`` or ``"dicom_lut_min_max"``) and ``inverted`` (True for DICOM
        ``MONOCHROME1``).

    Raises:
        ImageReadError: missing, empty, corrupt, multi-frame, volumetric or unsupported file.
        ValueError: ``channels`` not 1 or 3.

    Example::

        >>> img, meta = load_image("cxr.png")
        >>> img.shape, img.dtype, meta["intensity_scaling"]
        ((1, 1024, 1024), dtype('float32'), 'divide_255')
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    p = Path(path)
    _check_file(p)
    fmt = _sniff_format(p)
    inverted = False
    if fmt == "dicom":
        arr, meta = _read_dicom(p, raw=False)
        if meta.get("dicom_rgb"):
            arr = arr[..., :3] if arr.ndim == 3 else arr
            scaled = np.asarray(arr, dtype=np.float64) / float(2 ** int(meta["bit_depth"]) - 1)
            scaling = "divide_bits_stored"
        else:
            scaled = _min_max(arr, p)
            inverted = bool(meta.get("inverted", False))
            if inverted:
                scaled = 1.0 - scaled
            scaling = "dicom_lut_min_max"
        meta.pop("dicom_rgb", None)
        meta.pop("dicom_voi", None)
    else:
        arr, meta = read_raw(p)
        if arr.dtype == np.uint8:
            scaled = arr.astype(np.float32) / 255.0
            scaling = "divide_255"
        elif arr.dtype == np.bool_:
            scaled = arr.astype(np.float32)
            scaling = "identity"
        elif np.issubdtype(arr.dtype, np.floating) and fmt == "pil":
            finite = arr[np.isfinite(arr)]
            if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 and finite.size == arr.size:
                scaled, scaling = arr.astype(np.float32), "identity"
            else:
                scaled, scaling = _min_max(arr, p), "min_max"
        else:
            scaled, scaling = _min_max(arr, p), "min_max"
    if scaled.ndim == 3:
        scaled = scaled[..., :3]
    if scaled.ndim not in (2, 3):
        raise ImageReadError(p, f"unexpected pixel array shape {scaled.shape}")
    out = _to_channels(np.asarray(scaled), channels)
    info = {
        "filename_or_obj": str(p),
        "format": fmt,
        "spatial_shape": tuple(int(s) for s in out.shape[1:]),
        "source_channels": 3 if np.ndim(scaled) == 3 else 1,
        "source_mode": meta.get("source_mode"),
        "bit_depth": meta.get("bit_depth"),
        "intensity_scaling": scaling,
        "inverted": inverted,
    }
    return out, info


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Loads an annotation as a binary float32 ``(1, H, W)`` mask with values in ``{0, 1}``.

    The rule works on the stored values (no intensity scaling) so that 0/1, 0/255 and multi-label masks (e.g.
    BraTS labels 0/1/2/4) all give "any label = foreground":

    - a mask with at most 16 distinct values (a clean label map) is foreground where the value is > 0;
    - otherwise (JPEG artefacts, anti-aliased edges, probability maps) it is foreground where the value exceeds half
      the type's range (127.5 for 8-bit, 32767.5 for 16-bit, 0.5 for floats in ``[0, 1]``, else half the maximum),
      i.e. "binarised at 0.5 after scaling".

    Colour masks use the maximum over channels, so coloured annotations on black count as foreground.

    Args:
        path: mask file in any format :func:`load_image` reads.

    Returns:
        float32 array ``(1, H, W)``.

    Raises:
        ImageReadError: as for :func:`load_image`.

    Example::

        >>> load_mask("lesion.png").max()
        1.0
    """
    arr, _ = read_raw(path)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    if arr.dtype == np.bool_:
        return arr[None].astype(np.float32)
    values = np.asarray(arr)
    if np.issubdtype(values.dtype, np.floating):
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    uniques = np.unique(values)
    if uniques.size <= 16:
        fg = values > 0
    else:
        if values.dtype == np.uint8:
            thr = 127.5
        elif values.dtype == np.uint16:
            thr = 32767.5
        elif np.issubdtype(values.dtype, np.floating) and values.min() >= 0 and values.max() <= 1:
            thr = 0.5
        else:
            thr = 0.5 * float(values.max())
        fg = values > thr
    return fg[None].astype(np.float32)
