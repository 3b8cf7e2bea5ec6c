"""Tests of medad_monai.io.figures and medad_monai.io.writers (NIfTI maps, scores CSV, overlays, summary)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medad_monai.io.figures import (
    GT_CONTOUR_RGB,
    PRED_CONTOUR_RGB,
    colorize,
    colormap_lut,
    contour,
    grid,
    overlay_panel,
)
from medad_monai.io.writers import AnomalyResultWriter, ScoresCSVWriter, load_map_nifti, save_map_nifti

H = W = 32


def _blob_case(cy: int = 10, cx: int = 20, r: int = 5, seed: int = 0):
    """A gray image, a reconstruction without the blob, and a map that is bright on a disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = np.clip(0.4 + 0.05 * rng.standard_normal((1, H, W)), 0, 1).astype(np.float32)
    rec = image.copy()
    image[0][disc] = 0.9
    amap = np.abs(image - rec) + 0.01
    return image, rec, amap.astype(np.float32), disc


def _boxes(img: Image.Image) -> list[list[int]]:
    return json.loads(img.info["panel_boxes"])


def _colour_mask(arr: np.ndarray, rgb) -> np.ndarray:
    return np.all(arr == np.asarray(rgb, np.uint8), axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# visualize


def test_lut_endpoints_and_inferno_brightens_monotonically():
    inferno = colormap_lut("inferno").astype(float)
    assert inferno.shape == (256, 3)
    assert tuple(inferno[0]) == (0, 0, 4) and tuple(inferno[-1]) == (252, 255, 164)
    luma = inferno @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luma) >= -0.5)  # a map's larger values must never look darker
    jet = colormap_lut("jet")
    assert tuple(jet[0]) == (0, 0, 128) and tuple(jet[-1]) == (128, 0, 0)
    assert tuple(jet[128]) in {(126, 255, 130), (130, 255, 126), (128, 255, 128), (127, 255, 129), (129, 255, 127)}
    with pytest.raises(ValueError, match="unknown colormap"):
        colormap_lut("viridis")


def test_colorize_uses_the_fixed_range_not_the_map_range():
    m = np.linspace(0, 0.1, 64).reshape(8, 8)
    low = colorize(m, vmin=0.0, vmax=1.0)
    # a weak map stays in the dark tenth of the scale; per-image min-max would stretch it to full brightness
    assert low.max() < colormap_lut()[30].max() + 1
    assert np.array_equal(colorize(m * 10, 0.0, 1.0)[-1, -1], colormap_lut()[255])
    clipped = colorize(np.array([[-5.0, 5.0, np.nan]]), 0.0, 1.0)
    assert np.array_equal(clipped[0, 0], colormap_lut()[0]) and np.array_equal(clipped[0, 1], colormap_lut()[255])
    assert np.array_equal(clipped[0, 2], colormap_lut()[0])
    assert colorize(torch.rand(1, 5, 6), 0, 1, cmap="jet").shape == (5, 6, 3)
    with pytest.raises(ValueError, match="vmin < vmax"):
        colorize(m, vmin=1.0, vmax=1.0)


def test_contour_inner_outer_and_thickness():
    m = np.zeros((7, 7), bool)
    m[1:6, 1:6] = True
    c1 = contour(m)
    assert c1.sum() == 16 and not c1[2:5, 2:5].any() and np.all(c1 <= m)
    c2 = contour(m, thickness=2)
    assert c2.sum() == 24 and c2[3, 3] == False  # noqa: E712
    ring = contour(m, outer=True)
    assert not (ring & m).any() and ring.sum() == 20  # 4-neighbour dilation leaves the corners out
    border = np.ones((4, 4), bool)  # touching the edge: closed along the border
    assert contour(border).sum() == 12
    with pytest.raises(ValueError):
        contour(m, thickness=0)


def test_overlay_panel_layout_and_contour_positions():
    image, rec, amap, disc = _blob_case()
    scale, thr = 3, 0.2
    fig = overlay_panel(image, rec, amap, pixel_threshold=thr, vmin=0, vmax=0.6, gt_mask=disc[None],
                        title="case  score 0.1", scale=scale, contour_thickness=1)
    boxes = _boxes(fig)
    assert fig.mode == "RGB" and len(boxes) == 3
    arr = np.asarray(fig)
    x0, y0, x1, y1 = boxes[2]
    assert (x1 - x0, y1 - y0) == (W * scale, H * scale)
    heat = arr[y0:y1, x0:x1]
    pred_up = np.repeat(np.repeat(amap[0] > thr, scale, 0), scale, 1)
    gt_up = np.repeat(np.repeat(disc, scale, 0), scale, 1)
    cyan = _colour_mask(heat, PRED_CONTOUR_RGB)
    green = _colour_mask(heat, GT_CONTOUR_RGB)
    # the prediction outline is exactly the inner boundary of the upscaled thresholded map...
    assert np.array_equal(cyan, contour(pred_up))
    # ...and the ground truth is drawn just outside its region, so both stay visible
    assert np.array_equal(green, contour(gt_up, outer=True)) and green.sum() > 0
    # no outline colour leaks into the other panels
    for bx in boxes[:2]:
        other = arr[bx[1]:bx[3], bx[0]:bx[2]]
        assert not _colour_mask(other, PRED_CONTOUR_RGB).any()
    # the input panel shows the image itself (gray, nearest-neighbour upscaled)
    inp = arr[boxes[0][1]:boxes[0][3], boxes[0][0]:boxes[0][2]]
    assert inp[0, 0, 0] == inp[0, 0, 2] == np.rint(image[0, 0, 0] * 255)


def test_overlay_panel_two_panels_rgb_and_fixed_scale():
    image, _, amap, _ = _blob_case()
    rgb = np.repeat(image, 3, axis=0)
    rgb[0] *= 0.5  # a visibly coloured input
    fig = overlay_panel(torch.from_numpy(rgb), None, torch.from_numpy(amap), vmax=1.0, scale=2)
    assert len(_boxes(fig)) == 2
    three = overlay_panel(rgb, rgb, amap, vmax=1.0, scale=2)
    assert three.width > fig.width and three.height == fig.height
    # no threshold: nothing outlined
    assert not _colour_mask(np.asarray(fig), PRED_CONTOUR_RGB).any()
    # same map on the same image gives the same heat pixels whatever else the map contains elsewhere
    a2 = amap.copy()
    a2[0, -1, -1] = 100.0  # a per-image max normalisation would darken everything else
    f1 = np.asarray(overlay_panel(image, None, amap, vmax=1.0, colorbar=False))
    f2 = np.asarray(overlay_panel(image, None, a2, vmax=1.0, colorbar=False))
    diff = np.any(f1 != f2, axis=-1)
    assert 0 < diff.sum() <= 4  # only the changed pixel (2x2 after upscaling)
    with pytest.raises(ValueError, match="anomaly_map has spatial shape"):
        overlay_panel(image, None, amap[:, :-1])
    with pytest.raises(ValueError, match="image must be"):
        overlay_panel(np.zeros((2, H, W)), None, amap)


def test_overlay_panel_transpose_matches_transposed_inputs():
    image, rec, amap, _ = _blob_case()
    a = overlay_panel(image, rec, amap, pixel_threshold=0.2, vmax=0.6, transpose=True)
    b = overlay_panel(image.transpose(0, 2, 1), rec.transpose(0, 2, 1), amap.transpose(0, 2, 1),
                      pixel_threshold=0.2, vmax=0.6)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_grid_tiles_row_by_row():
    tiles = [Image.new("RGB", (40, 30), (50 * i, 0, 0)) for i in range(5)]
    g = grid(tiles, ncols=2, pad=2)
    assert g.size == (2 * 40 + 3 * 2, 3 * 30 + 4 * 2)
    arr = np.asarray(g)
    assert tuple(arr[2 + 30 + 2 + 1, 2 + 40 + 2 + 1]) == (150, 0, 0)  # tile 3 = row 1, column 1


# ----------------------------------------------------------------------------------------------------------------
# NIfTI maps


def test_nifti_round_trip_orientation_and_meta(tmp_path):
    amap = np.random.default_rng(1).random((1, 12, 20)).astype(np.float32)
    affine = np.diag([0.5, 0.25, 1.0, 1.0])
    p = save_map_nifti(torch.from_numpy(amap), tmp_path / "sub" / "x_anomaly_map.nii.gz", affine=affine,
                       meta={"image": "a/b.png", "pred_score": 0.5})
    arr, aff, meta = load_map_nifti(p, with_meta=True)
    assert arr.dtype == np.float32 and arr.shape == (12, 20)
    assert np.array_equal(arr, amap[0])
    assert np.allclose(aff, affine) and meta == {"image": "a/b.png", "pred_score": 0.5}
    assert nib.load(str(p)).get_data_dtype() == np.float32
    # MONAI's reader (what the data pipeline uses for NIfTI inputs) gives the same rows/columns back
    from monai.transforms import LoadImage

    loaded = LoadImage(image_only=True)(str(p))
    assert tuple(loaded.shape) == (12, 20) and np.array_equal(np.asarray(loaded), amap[0])
    # 3x3 (2D) affines are embedded
    save_map_nifti(amap[0], tmp_path / "y.nii", affine=np.array([[2.0, 0, 5], [0, 3, 6], [0, 0, 1]]))
    _, aff2, _ = load_map_nifti(tmp_path / "y.nii", with_meta=True)
    assert np.allclose(aff2[:2, :2], [[2, 0], [0, 3]]) and np.allclose(aff2[:2, 3], [5, 6])
    with pytest.raises(ValueError, match=r"\.nii"):
        save_map_nifti(amap, tmp_path / "z.png")
    with pytest.raises(ValueError, match="must be"):
        save_map_nifti(np.zeros((2, 3, 3)), tmp_path / "z.nii.gz")
    assert sorted(f.name for f in (tmp_path / "sub").iterdir()) == ["x_anomaly_map.nii.gz"]  # no temp files left


def test_nifti_map_reads_back_with_the_project_reader(tmp_path):
    readers = pytest.importorskip("medad_monai.data.readers")
    amap = np.zeros((10, 16), np.float32)
    amap[2, 11] = 1.0  # min 0 / max 1, so the reader's min-max scaling leaves the values unchanged
    amap[7, 3] = 0.5
    p = save_map_nifti(amap, tmp_path / "m_anomaly_map.nii.gz")
    img, _ = readers.load_image(p)
    assert img.shape == (1, 10, 16) and np.allclose(img[0], amap)


# ----------------------------------------------------------------------------------------------------------------
# scores CSV


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_scores_csv_rows_flush_and_resume(tmp_path):
    p = tmp_path / "scores.csv"
    w = ScoresCSVWriter(p, extra_fields=("normalized_score",))
    w.write({"image": "a.png", "pred_score": np.float32(0.25), "pred_label": torch.tensor(1)})
    w.write(image="b.png", pred_score=torch.tensor(0.125), pred_label=0, normalized_score=0.3)
    # flushed per row: readable before close
    assert _read_csv(p) == [
        ["image", "pred_score", "pred_label", "normalized_score"],
        ["a.png", "0.25", "1", ""],
        ["b.png", "0.125", "0", "0.3"],
    ]
    with pytest.raises(ValueError, match="unknown column"):
        w.write(image="c.png", score=1)
    with pytest.raises(ValueError, match="'image'"):
        w.write(pred_score=1.0)
    w.close()

    r = ScoresCSVWriter(p, extra_fields=("normalized_score",), resume=True)
    assert r.done_images() == {"a.png", "b.png"} and len(r) == 2
    r.write(image="c.png", pred_score=0.5, pred_label=1)
    r.close()
    rows = _read_csv(p)
    assert [row[0] for row in rows] == ["image", "a.png", "b.png", "c.png"]  # header written once

    with pytest.raises(ValueError, match="columns are"):
        ScoresCSVWriter(p, resume=True)  # different columns
    ScoresCSVWriter(p).close()  # resume=False starts again
    assert _read_csv(p) == [["image", "pred_score", "pred_label"]]


def test_scores_csv_resume_drops_a_row_cut_short(tmp_path):
    p = tmp_path / "scores.csv"
    p.write_text("image,pred_score,pred_label\na.png,0.1,0\nb.png,0.")
    w = ScoresCSVWriter(p, resume=True)
    assert w.done_images() == {"a.png"}
    w.write(image="b.png", pred_score=0.2, pred_label=1)
    w.close()
    assert _read_csv(p)[1:] == [["a.png", "0.1", "0"], ["b.png", "0.2", "1"]]


# ----------------------------------------------------------------------------------------------------------------
# AnomalyResultWriter


def _batch(paths, seed=0, with_mask=True):
    cases = [_blob_case(cy=8 + 3 * k, cx=12 + 2 * k, r=4 + k % 3, seed=seed + k) for k in range(len(paths))]
    image = torch.from_numpy(np.stack([c[0] for c in cases]))
    rec = torch.from_numpy(np.stack([c[1] for c in cases]))
    amap = torch.from_numpy(np.stack([c[2] for c in cases]))
    masks = torch.from_numpy(np.stack([c[3][None] for c in cases]).astype(np.float32))
    scores = amap.mean(dim=(1, 2, 3))
    batch = {
        "image": image,
        "reconstruction": rec,
        "anomaly_map": amap,
        "pred_score": scores,
        "pred_label": (scores > 0.02).long(),
        "image_path": list(paths),
    }
    if with_mask:
        batch["mask"] = masks
        batch["has_mask"] = torch.tensor([k % 2 == 0 for k in range(len(paths))])
    return batch


def test_result_writer_files_rows_and_contours(tmp_path):
    thr = 0.2
    w = AnomalyResultWriter(tmp_path, pixel_threshold=thr, overlay_vmax=0.6, scale=2)
    batch = _batch(["/data/p1/case1.png", "/data/p2/case2.nii.gz", "/data/p3/case3.dcm"])
    w.write_batch(batch)
    w.close()
    assert w.failures == [] and w.n_written == 3
    rows = _read_csv(tmp_path / "scores.csv")
    assert rows[0] == ["image", "pred_score", "pred_label"]
    assert [r[0] for r in rows[1:]] == batch["image_path"]
    assert np.allclose([float(r[1]) for r in rows[1:]], batch["pred_score"].numpy())
    assert [int(r[2]) for r in rows[1:]] == batch["pred_label"].tolist()
    for k, stem in enumerate(["case1", "case2", "case3"]):
        m = load_map_nifti(tmp_path / "maps" / f"{stem}_anomaly_map.nii.gz")
        assert np.array_equal(m, batch["anomaly_map"][k, 0].numpy())
        png = Image.open(tmp_path / "overlays" / f"{stem}_overlay.png")
        ref = overlay_panel(batch["image"][k], batch["reconstruction"][k], batch["anomaly_map"][k], thr, 0.0, 0.6,
                            gt_mask=batch["mask"][k] if k % 2 == 0 else None, scale=2, title="any title")
        assert png.size == ref.size and png.info["image"] == batch["image_path"][k]
        arr = np.asarray(png.convert("RGB"))
        x0, y0, x1, y1 = _boxes(png)[2]
        cyan = _colour_mask(arr[y0:y1, x0:x1], PRED_CONTOUR_RGB)
        pred_up = np.repeat(np.repeat(batch["anomaly_map"][k, 0].numpy() > thr, 2, 0), 2, 1)
        assert cyan.any() and np.all(pred_up[cyan])  # outline pixels lie where map > threshold
        green = _colour_mask(arr[y0:y1, x0:x1], GT_CONTOUR_RGB)
        assert green.any() == (k % 2 == 0)  # has_mask decides whether the ground truth is drawn


def test_result_writer_unique_stems_and_failure_isolation(tmp_path):
    w = AnomalyResultWriter(tmp_path, pixel_threshold=0.2)
    # a directory where case "bad"'s map should go makes that one write fail
    (tmp_path / "maps" / "bad_anomaly_map.nii.gz").mkdir(parents=True)
    paths = ["/x/a/img.png", "/y/a/img.png", "/z/b/bad.png", "/z/a/img.png", "/q/other.png"]
    w.write_batch(_batch(paths, with_mask=False))
    w.close()
    assert [p for p, _ in w.failures] == ["/z/b/bad.png"] and "bad_anomaly_map" in w.failures[0][1]
    assert w.n_written == 4
    names = sorted(f.name for f in (tmp_path / "maps").iterdir() if f.is_file())
    assert names == ["a_img_anomaly_map.nii.gz", "img_2_anomaly_map.nii.gz", "img_anomaly_map.nii.gz",
                     "other_anomaly_map.nii.gz"]
    assert len(list((tmp_path / "overlays").iterdir())) == 4
    rows = _read_csv(tmp_path / "scores.csv")
    assert [r[0] for r in rows[1:]] == ["/x/a/img.png", "/y/a/img.png", "/z/a/img.png", "/q/other.png"]


def test_result_writer_resume_skips_done_and_keeps_rows(tmp_path):
    first = AnomalyResultWriter(tmp_path, write_overlays=False)
    first.write_batch(_batch(["/a/img.png", "/b/one.png"]))
    first.close()
    second = AnomalyResultWriter(tmp_path, write_overlays=False, resume=True)
    assert second.done_images() == {"/a/img.png", "/b/one.png"}
    second.write_batch(_batch(["/a/img.png", "/b/one.png", "/c/img.png"]))
    second.close()
    assert second.n_skipped == 2 and second.n_written == 1
    rows = _read_csv(tmp_path / "scores.csv")
    assert [r[0] for r in rows[1:]] == ["/a/img.png", "/b/one.png", "/c/img.png"]
    # the resumed job does not reuse the stem of a map already on disk
    assert (tmp_path / "maps" / "c_img_anomaly_map.nii.gz").is_file()


def test_result_writer_summary_normalized_score_metatensor_and_decollated(tmp_path):
    from monai.data import MetaTensor

    class _Cal:  # the attributes the writer reads from a calibration
        pixel_threshold = 0.2

        @staticmethod
        def normalize_score(s):
            return 2.0 * s

    paths = [f"/d/c{k}.png" for k in range(6)]
    batch = _batch(paths, with_mask=False)
    affine = torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64))
    batch["image"] = MetaTensor(batch["image"], affine=affine)
    w = AnomalyResultWriter(tmp_path, calibration=_Cal(), summary_size=4, write_overlays=False)
    w.write_batch(batch)
    # MONAI's decollated form: a list of per-image dicts without the batch axis
    more = _batch(["/d/extra.png"], seed=9)
    w.write_batch([{k: (v[0] if k != "image_path" else v[0]) for k, v in more.items()}])
    w.close()
    rows = _read_csv(tmp_path / "scores.csv")
    assert rows[0] == ["image", "pred_score", "pred_label", "normalized_score"]
    assert all(np.isclose(float(r[3]), 2 * float(r[1])) for r in rows[1:]) and len(rows) == 8
    _, aff, meta = load_map_nifti(tmp_path / "maps" / "c0_anomaly_map.nii.gz", with_meta=True)
    assert np.allclose(aff, affine.numpy()) and meta["image"] == "/d/c0.png" and meta["pixel_threshold"] == 0.2
    assert not (tmp_path / "overlays").exists()

    out = w.summary_figure(tmp_path / "summary.png", n=4)
    fig = Image.open(out)
    scores = {r[0]: float(r[1]) for r in rows[1:]}
    kept_hi = sorted(scores.values())[-2:]
    kept_lo = sorted(scores.values())[:2]
    assert sorted(s for s, _, _ in w._high) == kept_hi and sorted(-s for s, _, _ in w._low) == kept_lo
    panel_w = w._high[0][2].width
    assert fig.width >= 2 * panel_w and fig.height > 2 * w._high[0][2].height


def test_result_writer_rejects_malformed_batches(tmp_path):
    w = AnomalyResultWriter(tmp_path)
    b = _batch(["/a.png", "/b.png"])
    with pytest.raises(ValueError, match="'pred_score'"):
        w.write_batch({k: v for k, v in b.items() if k != "pred_score"})
    with pytest.raises(ValueError, match="image paths"):
        w.write_batch(dict(b, image_path=["/a.png"]))
    with pytest.raises(ValueError, match="'image'"):
        w.write_batch({k: v for k, v in b.items() if k != "image"})
    w.close()


def test_result_writer_resume_removes_outputs_without_a_row(tmp_path, caplog):
    first = AnomalyResultWriter(tmp_path)
    first.write_batch(_batch(["/a/x.png", "/b/y.png", "/c/z.png"]))
    first.close()
    # a run killed after z's map and overlay but before its row, and while writing another map
    csv_path = tmp_path / "scores.csv"
    lines = csv_path.read_bytes().splitlines(keepends=True)
    csv_path.write_bytes(b"".join(lines[:-1]) + lines[-1][:7])
    (tmp_path / "maps" / ".tmp-999-w_anomaly_map.nii.gz").write_bytes(b"partial")

    with caplog.at_level("WARNING", logger="medad_monai"):
        second = AnomalyResultWriter(tmp_path, resume=True)
    assert second.done_images() == {"/a/x.png", "/b/y.png"}
    assert "z_anomaly_map.nii.gz" in caplog.text and "has no row" in caplog.text
    second.write_batch(_batch(["/a/x.png", "/b/y.png", "/c/z.png"]))
    second.close()
    assert sorted(f.name for f in (tmp_path / "maps").iterdir()) == [
        "x_anomaly_map.nii.gz", "y_anomaly_map.nii.gz", "z_anomaly_map.nii.gz"]  # same name, no orphan, no temp
    assert sorted(f.name for f in (tmp_path / "overlays").iterdir()) == [
        "x_overlay.png", "y_overlay.png", "z_overlay.png"]
    assert [r[0] for r in _read_csv(csv_path)[1:]] == ["/a/x.png", "/b/y.png", "/c/z.png"]


def test_done_images_ignores_a_row_cut_short(tmp_path):
    from medad_monai.io.writers import done_images

    p = tmp_path / "scores.csv"
    p.write_text("image,pred_score,pred_label\r\n/a.png,0.1,0\r\n/b.png,0.2")
    assert done_images(p) == {"/a.png"}
    assert done_images(tmp_path / "absent.csv") == set()


def test_one_writer_per_output_folder_and_the_lock_dies_with_its_holder(tmp_path):
    import signal
    import subprocess
    import sys

    from medad_monai.io.outputs import OutputDirBusyError

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from medad_monai.io.outputs import OutputDirLock; "
         f"OutputDirLock({str(tmp_path)!r}, 'inference').acquire(); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirBusyError, match=rf"is in use by another run \(pid {holder.pid}, inference\)"):
            AnomalyResultWriter(tmp_path)
        assert not (tmp_path / "scores.csv").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    w = AnomalyResultWriter(tmp_path)  # the OS released the lock of the killed holder
    w.write_batch(_batch(["/a/x.png"]))
    w.close()
    AnomalyResultWriter(tmp_path, resume=True).close()  # and the writer releases its own


def test_background_writer_keeps_order_and_reports_a_malformed_batch(tmp_path):
    from medad_monai.io.writers import BackgroundBatchWriter

    w = AnomalyResultWriter(tmp_path, write_overlays=False)
    bg = BackgroundBatchWriter(w, max_pending=2)
    paths = [f"/d/img{k:02d}.png" for k in range(12)]
    for k in range(0, 12, 3):
        bg.submit(_batch(paths[k:k + 3]))
    bg.close()
    w.close()
    assert [r[0] for r in _read_csv(tmp_path / "scores.csv")[1:]] == paths  # submission order, every row

    w2 = AnomalyResultWriter(tmp_path / "bad", write_overlays=False)
    bg = BackgroundBatchWriter(w2)
    bg.submit({"pred_score": torch.zeros(2)})  # no anomaly_map: a direct write raises ValueError
    with pytest.raises(ValueError, match="anomaly_map"):
        bg.close()
    w2.close()
