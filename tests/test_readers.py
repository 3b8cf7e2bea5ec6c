"""Tests for medad_monai.data.readers and medad_monai.data.transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medad_monai.data import ImageReadError, LoadAnomalyImaged, anomaly_transforms, load_image, load_mask


def _ramp(h: int = 24, w: int = 32, hi: int = 255, dtype=np.uint8) -> np.ndarray:
    # rows differ from columns so that a transpose would be caught
    r = np.arange(h)[:, None] * 7 + np.arange(w)[None, :] * 3
    return (r * hi // r.max()).astype(dtype)


# ---------------------------------------------------------------------------------------------------------- PIL


def test_png_8bit_gray(tmp_path):
    arr = _ramp()
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    img, meta = load_image(tmp_path / "g.png")
    assert img.shape == (1, 24, 32) and img.dtype == np.float32
    np.testing.assert_allclose(img[0], arr / 255.0, atol=1e-6)
    assert meta["intensity_scaling"] == "divide_255" and meta["spatial_shape"] == (24, 32)
    assert meta["filename_or_obj"].endswith("g.png")


def test_png_16bit_min_max(tmp_path):
    arr = (1000 + _ramp(hi=3000, dtype=np.int32)).astype(np.uint16)  # a 12-bit range inside 16 bits
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img, meta = load_image(tmp_path / "g16.png")
    assert meta["intensity_scaling"] == "min_max"
    np.testing.assert_allclose(img[0], (arr - 1000.0) / 3000.0, atol=1e-6)


def test_rgb_to_gray_luminance_and_three_channels(tmp_path):
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    rgb[5:, :, 1] = 200
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    gray, _ = load_image(tmp_path / "c.png", channels=1)
    np.testing.assert_allclose(gray[0, 0, 0], 0.299, atol=1e-6)
    np.testing.assert_allclose(gray[0, 9, 0], 0.299 + 0.587 * 200 / 255, atol=1e-6)
    col, meta = load_image(tmp_path / "c.png", channels=3)
    assert col.shape == (3, 10, 12) and meta["source_channels"] == 3
    np.testing.assert_allclose(col, np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)


def test_gray_to_three_channels_rgba_palette(tmp_path):
    arr = _ramp()
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    img3, _ = load_image(tmp_path / "g.png", channels=3)
    assert img3.shape == (3, 24, 32) and np.array_equal(img3[0], img3[2])
    rgba = np.dstack([arr, arr, arr, np.full_like(arr, 7)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(load_image(tmp_path / "a.png")[0][0], arr / 255.0, atol=2e-3)  # alpha dropped
    Image.fromarray(arr, mode="L").convert("P").save(tmp_path / "p.png")
    np.testing.assert_allclose(load_image(tmp_path / "p.png")[0][0], arr / 255.0, atol=2e-3)
    Image.fromarray(arr, mode="L").save(tmp_path / "j.jpg", quality=95)
    np.testing.assert_allclose(load_image(tmp_path / "j.jpg")[0][0], arr / 255.0, atol=0.05)


def test_bad_channels_argument(tmp_path):
    Image.fromarray(_ramp(), mode="L").save(tmp_path / "g.png")
    with pytest.raises(ValueError):
        load_image(tmp_path / "g.png", channels=2)


# -------------------------------------------------------------------------------------------------------- DICOM


def _write_dicom(path, stored: np.ndarray, photometric: str, **extra) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_monochrome1_rescale_window_inverted(tmp_path):
    stored = _ramp(hi=4000, dtype=np.int32).astype(np.uint16)
    slope, intercept, center, width = 2.0, -1000.0, 3000.0, 2001.0
    _write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1", RescaleSlope=slope, RescaleIntercept=intercept,
                 WindowCenter=center, WindowWidth=width)
    img, meta = load_image(tmp_path / "m1.dcm")
    # DICOM PS3.3 C.11.2.1.2 linear window on modality values, then min-max, then inversion (MONOCHROME1)
    hu = stored * slope + intercept
    win = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    expected = 1.0 - (win - win.min()) / (win.max() - win.min())
    np.testing.assert_allclose(img[0], expected, atol=2e-3)
    assert meta["inverted"] and meta["format"] == "dicom"
    # the window clipped both ends: the brightest stored values are black after inversion
    assert img[0][stored == stored.max()].max() == 0.0 and img[0][stored == 0].min() == 1.0
    assert (img[0] == 0).sum() > 1 and (img[0] == 1).sum() > 1


def test_dicom_monochrome2_and_multiframe(tmp_path):
    stored = _ramp(hi=4000, dtype=np.int32).astype(np.uint16)
    _write_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2", RescaleSlope=1.0, RescaleIntercept=0.0)
    img, meta = load_image(tmp_path / "m2.dcm")
    assert not meta["inverted"]
    np.testing.assert_allclose(img[0], stored / 4000.0, atol=1e-5)
    frames = np.stack([stored, stored])
    _write_dicom(tmp_path / "mf.dcm", frames, "MONOCHROME2", NumberOfFrames=2)
    with pytest.raises(ImageReadError, match="multi-frame"):
        load_image(tmp_path / "mf.dcm")


# -------------------------------------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("shape", [(24, 32), (24, 32, 1), (24, 32, 1, 1)])
def test_nifti_2d_no_transpose(tmp_path, shape):
    import nibabel as nib

    arr = _ramp(dtype=np.int32).astype(np.float32) * 10 - 50
    nib.save(nib.Nifti1Image(arr.reshape(shape), np.eye(4)), str(tmp_path / "x.nii.gz"))
    img, meta = load_image(tmp_path / "x.nii.gz")
    assert img.shape == (1, 24, 32) and meta["format"] == "nifti"
    np.testing.assert_allclose(img[0], (arr - arr.min()) / (arr.max() - arr.min()), atol=1e-6)


def test_nifti_volume_rejected(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), np.float32), np.eye(4)), str(tmp_path / "v.nii"))
    with pytest.raises(ImageReadError, match="volume"):
        load_image(tmp_path / "v.nii")


# ------------------------------------------------------------------------------------------------------- errors


def test_corrupt_missing_and_unsupported_files_name_the_file(tmp_path):
    bad = tmp_path / "broken_image.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(ImageReadError) as e:
        load_image(bad)
    assert "broken_image.png" in str(e.value) and isinstance(e.value, ValueError)

    Image.fromarray(_ramp(240, 320), mode="L").save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.png"):
        load_image(tmp_path / "truncated.png")

    (tmp_path / "fake.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(ImageReadError, match="fake.dcm"):
        load_image(tmp_path / "fake.dcm")

    (tmp_path / "data.xyz").write_bytes(b"hello world" * 20)
    with pytest.raises(ImageReadError, match="unsupported"):
        load_image(tmp_path / "data.xyz")
    with pytest.raises(ImageReadError, match="does not exist"):
        load_image(tmp_path / "nowhere.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        load_image(tmp_path / "empty.png")


# -------------------------------------------------------------------------------------------------------- masks


def test_mask_conventions(tmp_path):
    import nibabel as nib

    m = np.zeros((16, 20), np.uint8)
    m[4:9, 5:12] = 1
    Image.fromarray(m, mode="L").save(tmp_path / "m01.png")
    Image.fromarray(m * 255, mode="L").save(tmp_path / "m255.png")
    labels = m.astype(np.int16) * 0
    labels[4:6, 5:12], labels[6:8, 5:12], labels[8, 5:12] = 1, 2, 4  # BraTS-style labels
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "seg.nii.gz"))
    for name in ("m01.png", "m255.png", "seg.nii.gz"):
        mask = load_mask(tmp_path / name)
        assert mask.shape == (1, 16, 20) and mask.dtype == np.float32
        np.testing.assert_array_equal(mask[0], m.astype(np.float32), err_msg=name)
    # a noisy (JPEG-like) 8-bit mask is cut at half range
    rng = np.random.default_rng(0)
    noisy = np.clip(m * 230 + rng.integers(0, 40, m.shape), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(load_mask(_save(tmp_path / "n.png", noisy))[0], m.astype(np.float32))


def _save(path, arr):
    Image.fromarray(arr, mode="L").save(path)
    return path


# --------------------------------------------------------------------------------------------------- transforms


def test_load_anomaly_imaged_contract(tmp_path):
    arr = _ramp(40, 48)
    Image.fromarray(arr, mode="L").save(tmp_path / "a.png")
    m = np.zeros((40, 48), np.uint8)
    m[10:20, 10:30] = 255
    Image.fromarray(m, mode="L").save(tmp_path / "a_mask.png")
    t = LoadAnomalyImaged()
    d = t({"image": str(tmp_path / "a.png"), "label": 1, "mask": str(tmp_path / "a_mask.png"), "lesion": "x"})
    assert d["image"].shape == (1, 40, 48) and d["has_mask"] == 1 and d["label"] == 1 and d["lesion"] == "x"
    assert d["image_path"] == str(tmp_path / "a.png") and d["mask_path"] == str(tmp_path / "a_mask.png")
    assert d["mask"].sum() == 200
    d = t({"image": str(tmp_path / "a.png")})
    assert d["has_mask"] == 0 and d["label"] == 0 and d["mask"].shape == (1, 40, 48) and d["mask"].sum() == 0
    Image.fromarray(m[:30], mode="L").save(tmp_path / "small_mask.png")
    with pytest.raises(ImageReadError, match="small_mask.png"):
        t({"image": str(tmp_path / "a.png"), "mask": str(tmp_path / "small_mask.png")})


def test_anomaly_transforms_resize_types_and_collate(tmp_path):
    from monai.data import DataLoader, Dataset

    Image.fromarray(_ramp(200, 160), mode="L").save(tmp_path / "a.png")
    m = np.zeros((200, 160), np.uint8)
    m[50:150, 40:120] = 255
    Image.fromarray(m, mode="L").save(tmp_path / "m.png")
    items = [
        {"image": str(tmp_path / "a.png"), "label": 1, "mask": str(tmp_path / "m.png")},
        {"image": str(tmp_path / "a.png")},
    ]
    xform = anomaly_transforms(spatial_size=(64, 64))
    out = xform(items[0])
    assert isinstance(out["image"], torch.Tensor) and out["image"].dtype == torch.float32
    assert out["image"].shape == (1, 64, 64) and out["mask"].shape == (1, 64, 64)
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert set(torch.unique(out["mask"]).tolist()) == {0.0, 1.0}
    assert abs(float(out["mask"].mean()) - 0.25) < 0.02  # the mask covers 1/4 of the image before and after
    batch = next(iter(DataLoader(Dataset(items, transform=xform), batch_size=2)))
    assert batch["image"].shape == (2, 1, 64, 64) and batch["has_mask"].tolist() == [1, 0]
    assert batch["label"].tolist() == [1, 0] and batch["image_path"] == [str(tmp_path / "a.png")] * 2
    # masks not wanted: the key is dropped even for items that name one
    no_mask = anomaly_transforms(spatial_size=32, channels=3, with_mask=False, antialias=True)(dict(items[0]))
    assert "mask" not in no_mask and no_mask["image"].shape == (3, 32, 32)


def test_non_finite_pixels_are_refused_not_filled(tmp_path):
    import nibabel as nib

    from medad_monai.data.readers import ImageReadError, load_image

    arr = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    arr[2, 3] = np.nan
    arr[4, 4] = np.inf
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(ImageReadError, match=r"bad\.nii\.gz.*2 of its 64 pixel values are NaN or infinite"):
        load_image(tmp_path / "bad.nii.gz")
