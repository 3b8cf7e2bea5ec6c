"""Ignite handlers that connect the engines to losses, calibration, metrics and writers.

Each handler has an ``attach(engine)`` so MONAI engines can take it in ``train_handlers``/``val_handlers``. Results are
written by rank 0 only when running distributed, and only after the values were gathered from every rank.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from medad_monai.evaluation.calibration import CalibrationAccumulator
from medad_monai.engine.checkpoints import BestModelSaver, ResumableCheckpoint, WeightsLoader, load_resume_checkpoint
from medad_monai.evaluation.metrics import AnomalyMetricAccumulator
from medad_monai.networks.anomaly_map import fit_map_normalization
from medad_monai.io.outputs import write_json_atomic
from medad_monai.evaluation.model_record import item_hash, list_fingerprint
from medad_monai.evaluation.predictor import record_in_calibration

__all__ = [
    "ResumableCheckpoint",
    "load_resume_checkpoint",
    "BestModelSaver",
    "WeightsLoader",
    "LossScheduleHandler",
    "TrainerEarlyStop",
    "CalibrationHandler",
    "AnomalyMetricsHandler",
    "AnomalyWriterHandler",
]

logger = logging.getLogger("medad_monai")


class TrainerEarlyStop:
    """Early stopping attached to the trainer, scored on the validator's key metric (lower is better).

    MONAI's ``EarlyStopHandler`` on the validator needs a reference to the trainer, which a bundle config cannot give
    without a reference cycle (the trainer's handlers reference the validator). Attached to the trainer, this handler
    checks after every ``interval``-th epoch, after the ``ValidationHandler`` listed before it has run. Its state
    (best value, validations without improvement) is kept in ``engine.state.early_stop`` and saved with the trainer
    by :class:`~medad_monai.engine.checkpoints.ResumableCheckpoint`; list it after that handler, so that a resumed run
    that had stopped early sees the loaded state and trains nothing.

    Args:
        evaluator: the validation engine whose ``state.metrics[metric]`` is checked.
        metric: key metric name (``val_loss``).
        patience: epochs of validation without improvement of more than ``min_delta`` before stopping (original: 25).
        min_delta: minimum improvement (original: 1e-8).
        interval: the validation interval in epochs.
    """

    def __init__(self, evaluator: Engine, metric: str = "val_loss", patience: int = 25, min_delta: float = 1e-8,
                 interval: int = 1) -> None:
        self.evaluator = evaluator
        self.metric = metric
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.interval = max(int(interval), 1)

    def attach(self, engine: Engine) -> None:
        # the best value and the count live in the trainer's state, so resumable checkpoints carry them
        engine.state.early_stop = {"best": None, "counter": 0}
        if "early_stop" not in engine.state_dict_user_keys:
            engine.state_dict_user_keys.append("early_stop")
        self.engine = engine
        engine.add_event_handler(Events.STARTED, self._stopped_before)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    @property
    def best(self) -> float | None:
        return self.engine.state.early_stop["best"]

    @property
    def counter(self) -> int:
        return self.engine.state.early_stop["counter"]

    def _stopped_before(self, engine: Engine) -> None:
        """A resumed run that had stopped early has nothing left to do (unless ``patience`` was raised)."""
        if self.counter >= self.patience:
            logger.info(
                "Nothing left to train: this run stopped early (%s did not improve on %.6g for %d validations). Pass "
                "a larger --early_stop_patience to train on.", self.metric, self.best, self.counter,
            )
            engine.terminate()

    def __call__(self, engine: Engine) -> None:
        value = self.evaluator.state.metrics.get(self.metric)
        if value is None:
            return
        state = engine.state.early_stop
        if state["best"] is None or value < state["best"] - self.min_delta:
            state.update(best=float(value), counter=0)
            return
        state["counter"] += 1
        if self.counter >= self.patience:
            logger.info(
                "Early stopping at epoch %d: %s has not improved on %.6g for %d validations",
                engine.state.epoch, self.metric, self.best, self.counter,
            )
            engine.terminate()


class LossScheduleHandler:
    """Tells an epoch-scheduled loss which epoch it is in and exposes its terms for logging.

    MorphAEus switches its deformation terms on after a warm-up and ramps the smoothness weight per epoch; the loss
    keeps that schedule (``set_epoch``), this handler only feeds it the trainer's 1-based epoch. After every iteration
    the loss' ``last_terms`` are copied to ``engine.state.output["loss_terms"]`` so that ``StatsHandler`` and
    ``TensorBoardStatsHandler`` (``output_transform=medad_monai.engine.handlers.loss_terms``) log each term.
    """

    def __init__(self, loss: Any) -> None:
        self.loss = loss

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._set_epoch)
        engine.add_event_handler(Events.STARTED, self._set_epoch)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._copy_terms)

    def _set_epoch(self, engine: Engine) -> None:
        if hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(max(int(engine.state.epoch), 1))

    def _copy_terms(self, engine: Engine) -> None:
        terms = getattr(self.loss, "last_terms", None)
        if terms and isinstance(engine.state.output, dict):
            engine.state.output["loss_terms"] = dict(terms)


def loss_terms(output: Any) -> Any:
    """``output_transform`` for stats handlers: every loss term when available, else the loss."""
    if isinstance(output, dict):
        terms = output.get("loss_terms")
        if terms:
            return {k: float(v) for k, v in terms.items()}
        loss = output.get("loss")
        return loss.item() if isinstance(loss, torch.Tensor) else loss
    return output


def _gather_tensor(t: torch.Tensor) -> torch.Tensor:
    return idist.all_gather(t) if idist.get_world_size() > 1 else t


class CalibrationHandler:
    """Fits the image and pixel thresholds on healthy validation images and writes them as JSON.

    Attach to an :class:`~medad_monai.engine.evaluator.AnomalyEvaluator` run over the healthy validation list with the
    best checkpoint loaded (after the handler that loads it). No anomaly label is used: thresholds are quantiles of
    healthy scores and healthy pixels at the chosen false-positive rates. When the network normalises its maps
    against healthy ones (``map_normalization="healthy"``), a first pass over the same list fits those statistics
    (:func:`~medad_monai.networks.fit_map_normalization`); the thresholds are then fitted on leave-one-out
    normalised maps, and the statistics are written into the calibration with the thresholds.

    Args:
        output_path: where ``calibration.json`` goes (next to ``model.pt`` so it travels with the model).
        image_fpr: target false-positive rate of the image decision on healthy images (default 5 %).
        pixel_fpr: target false-positive rate of the pixel decision on healthy pixels (default 5 %, the healthy-val
            convention of Bercea et al.).
        score_method, percentile: the image score aggregation the thresholds belong to (must equal the evaluator's).
        extra: more fields for the calibration's JSON.
        bundle: this bundle's identity (``$medad_monai.evaluation.model_record.bundle_identity(@bundle_root)`` in the
            configs), written into the model record with the network, the input size and the calibration list's
            fingerprint.
        training_images: the fingerprint of the training list the model was trained on
            (:func:`~medad_monai.engine.bundle_utils.section_fingerprint`), written into the model record as well.
    """

    def __init__(
        self,
        output_path: str,
        image_fpr: float = 0.05,
        pixel_fpr: float = 0.05,
        score_method: str = "mean",
        percentile: float = 99.0,
        extra: dict | None = None,
        bundle: dict | None = None,
        training_images: dict | None = None,
    ) -> None:
        self.output_path = output_path
        self.bundle = bundle
        self.training_images = training_images
        self.image_fpr = image_fpr
        self.pixel_fpr = pixel_fpr
        self.score_method = score_method
        self.percentile = percentile
        self.extra = extra or {}
        self.calibration = None
        self._input_shape: tuple[int, ...] | None = None  # of the images calibrated on, for the model record

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.STARTED, self._fit_map_normalization)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _fit_map_normalization(self, engine: Engine) -> None:
        def images():
            for batch in engine.data_loader:
                if isinstance(batch, dict) and "image" in batch:  # batches of only unreadable items have none
                    yield batch["image"].to(engine.state.device)

        autocast = getattr(engine, "autocast", None)
        device_type = torch.device(engine.state.device).type
        n = fit_map_normalization(
            engine.network, images(), leave_one_out=True, autocast=(lambda: autocast(device_type)) if autocast else None
        )
        if n:
            logger.info("Healthy map normalisation fitted on %d healthy images (leave-one-out for their thresholds).", n)

    def _reset(self, engine: Engine) -> None:
        self._n_items, self._hash_sum = 0, 0  # of the calibration list, for its fingerprint in the model record
        self._acc = CalibrationAccumulator(
            image_fpr=self.image_fpr,
            pixel_fpr=self.pixel_fpr,
            score_method=self.score_method,
            percentile=self.percentile,
            extra=self.extra,
        )

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        if out is None:
            return
        abnormal = [p for p, y in zip(out["image_path"], out["label"].tolist()) if y == 1]
        if abnormal:
            raise ValueError(
                f"Calibration fits thresholds and healthy map statistics on healthy images only, but {len(abnormal)} "
                f"image(s) it was given are labelled abnormal (first: {abnormal[0]}): its list is not the healthy "
                "validation list. Calibrate with the bundle's own calibrate#dataloader (train.json: the 'validation' "
                "section), e.g. `python -m monai.bundle run calibration --config_file configs/train.json`."
            )
        # local shard only: ranks may run different numbers of iterations (uneven validation shards), so the
        # collective happens once, in _finish
        self._acc.update(out["anomaly_map"].detach().cpu(), out["pred_score"].detach().cpu())
        self._input_shape = tuple(out["image"].shape[1:])
        self._n_items += len(out["image_path"])
        self._hash_sum += sum(item_hash(p) for p in out["image_path"])

    def _finish(self, engine: Engine) -> None:
        if idist.get_world_size() > 1:
            from medad_monai.engine.distributed import all_gather_uneven

            local, counts = self._acc, torch.tensor([self._n_items, self._hash_sum], dtype=torch.int64)
            self._reset(engine)
            self._acc.add_scores(all_gather_uneven(local.image_scores()))
            self._acc.add_pixels(all_gather_uneven(local.pixel_sample()))
            self._n_items, self._hash_sum = (int(v) for v in idist.all_reduce(counts))
        self.calibration = self._acc.compute()
        # the thresholds belong to the maps as the network made them and to this network and input size: the
        # predictor refuses to apply them to others (medad_monai.evaluation.predictor)
        images = {"calibration_images": list_fingerprint(self._n_items, self._hash_sum)}
        if self.training_images:
            images["training_images"] = dict(self.training_images)
        record_in_calibration(self.calibration, engine.network, self._input_shape, self.bundle, images)
        if idist.get_rank() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.output_path)), exist_ok=True)
            self.calibration.save(self.output_path)
            logger.info(
                "Calibration on %d healthy images: image threshold %.6g (FPR %.3f), pixel threshold %.6g (FPR %.3f) -> %s",
                self.calibration.n_images,
                self.calibration.image_threshold,
                self.image_fpr,
                self.calibration.pixel_threshold,
                self.pixel_fpr,
                self.output_path,
            )


class AnomalyMetricsHandler:
    """Accumulates scores, labels, maps and masks of a labelled test run and writes ``metrics.json``.

    Args:
        output_dir: folder of ``metrics.json`` (created).
        calibration: the :class:`~medad_monai.evaluation.calibration.Calibration` whose thresholds give the deployable
            numbers (``*_at_threshold``); ``None`` reports threshold-free metrics only.
        filename: name of the metrics file.
        extra: more key/values copied into the JSON (e.g. the method name).
    """

    def __init__(self, output_dir: str, calibration: Any = None, filename: str = "metrics.json", extra: dict | None = None):
        self.output_dir = output_dir
        self.calibration = calibration
        self.filename = filename
        self.extra = extra or {}
        self.metrics: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _reset(self, engine: Engine) -> None:
        cal = self.calibration if self.calibration is not None else getattr(engine, "calibration", None)
        self._cal = cal
        if cal is None:
            warn_uncalibrated(self.output_dir)
        self._acc = AnomalyMetricAccumulator(calibration=cal)
        self._t0 = time.perf_counter()
        self._n = 0
        self._pixel_excluded: list[dict] = []

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        if out is None:
            return
        labels = out["label"]
        if bool((labels < 0).any()):
            bad = [p for p, lab in zip(out["image_path"], labels.tolist()) if lab < 0]
            raise ValueError(
                f"Evaluation needs a label (0 normal / 1 abnormal) for every test item; missing for {bad[:3]} "
                f"({len(bad)} in this batch). Check the 'test' section of the datalist."
            )
        has_mask = out["has_mask"].to(out["anomaly_map"].device)
        mask = out["mask"] if out["mask"] is not None else torch.zeros_like(out["anomaly_map"])
        has_mask = self._drop_inconsistent_masks(engine, out, labels, mask, has_mask)
        self._acc.update(
            scores=_gather_tensor(out["pred_score"].detach()).cpu(),
            labels=_gather_tensor(labels.to(out["pred_score"].device)).cpu(),
            maps=_gather_tensor(out["anomaly_map"].detach()).cpu(),
            masks=_gather_tensor(mask.to(out["anomaly_map"].device).float()).cpu(),
            has_mask=_gather_tensor(has_mask).cpu(),
        )
        self._n += out["anomaly_map"].shape[0]

    def _drop_inconsistent_masks(self, engine: Engine, out: dict, labels, mask, has_mask):
        """Masks that contradict their label leave the pixel metrics, named in the log and in ``metrics.json``
        (``pixel_excluded``): an abnormal image whose mask marks no pixel (a missing annotation would count its
        lesion as healthy tissue) and a normal image whose mask marks some. ``--strict True`` fails instead."""
        if not bool(has_mask.any()):
            return has_mask
        marked = mask.reshape(mask.shape[0], -1).gt(0).any(dim=1).to(has_mask.device)
        lab = labels.to(has_mask.device).reshape(-1)
        bad = has_mask & (((lab == 1) & ~marked) | ((lab == 0) & marked))
        if not bool(bad.any()):
            return has_mask
        for i in bad.nonzero().flatten().tolist():
            reason = ("abnormal image whose mask marks no pixel" if int(lab[i]) == 1
                      else "normal image whose mask marks lesion pixels")
            item = {"image": out["image_path"][i], "reason": reason}
            if getattr(engine, "strict", False):
                raise ValueError(
                    f"--strict True: {item['image']}: {reason}. Fix its mask or label in the datalist, or run "
                    "without --strict to leave it out of the pixel metrics."
                )
            logger.warning("Leaving %s out of the pixel metrics: %s.", item["image"], reason)
            self._pixel_excluded.append(item)
        return has_mask & ~bad

    def _finish(self, engine: Engine) -> None:
        metrics = self._acc.compute()
        elapsed = time.perf_counter() - self._t0
        self.metrics = dict(metrics)
        engine.state.metrics.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if idist.get_rank() != 0:
            return
        skipped = list(getattr(engine.state, "skipped_items", []) or [])
        payload = {
            **self.extra,
            **metrics,
            "n_images": self._n,
            "n_skipped": len(skipped),
            "skipped": skipped,
            "calibrated": self._cal is not None,
            "n_pixel_excluded": len(self._pixel_excluded),
            "pixel_excluded": self._pixel_excluded,
            "seconds": round(elapsed, 3),
        }
        if self._cal is not None:
            payload["image_threshold"] = float(self._cal.image_threshold)
            payload["pixel_threshold"] = float(self._cal.pixel_threshold)
        path = os.path.join(self.output_dir, self.filename)
        write_json_atomic(_json_safe(payload), path)
        logger.info("Metrics of %d test images -> %s\n%s", self._n, path, _format_metrics(metrics))
        if skipped:
            logger.warning(
                "%d test item(s) could not be read and are NOT in these metrics (listed in %s under 'skipped'); "
                "first: %s: %s",
                len(skipped),
                path,
                skipped[0]["image"],
                skipped[0]["reason"],
            )


def _image_paths(items) -> list[str]:
    """The image paths of datalist items (dicts with ``image``) or of plain paths."""
    return [str(it["image"]) if isinstance(it, dict) else str(it) for it in items]


_WARNED_UNCALIBRATED: set[str] = set()


def warn_uncalibrated(output_dir: str) -> None:
    """Says plainly, once per output folder, that results written without a calibration carry no decisions."""
    if output_dir in _WARNED_UNCALIBRATED:
        return
    _WARNED_UNCALIBRATED.add(output_dir)
    logger.warning(
        "No calibration.json next to the model: the results in %s have scores and maps but no decisions (pred_label "
        "-1, no pixel mask, no *_at_threshold metrics; metrics.json says \"calibrated\": false). Calibrate on healthy "
        "validation images first: python -m monai.bundle run calibration --config_file configs/train.json ...",
        output_dir,
    )


def _json_safe(obj):
    """Undefined metrics (NaN) become ``null`` so the file stays standard JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def _format_metrics(metrics: dict) -> str:
    return "\n".join(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}" for k, v in metrics.items())


class AnomalyWriterHandler:
    """Writes per-image results of an :class:`~medad_monai.engine.evaluator.AnomalyEvaluator` run.

    Per image: the anomaly map as NIfTI, an overlay PNG (input | reconstruction | heatmap with the calibrated
    threshold's contour) and a row of ``scores.csv``; at the end a summary figure of the highest and lowest scores.
    A failure on one image is logged with its file name and the job goes on. Writing runs on a worker thread
    (:class:`~medad_monai.io.writers.BackgroundBatchWriter`), in submission order, so it overlaps inference.

    In a distributed run (``multi_gpu_inference.json``: every process scores a shard of the list) every process writes
    its own maps and overlays, under names assigned from the whole list (:func:`~medad_monai.io.writers.assign_stems`)
    so shards never collide, and its rows to ``scores.part<rank>.csv``. At the end rank 0 merges the parts into one
    ``scores.csv`` in input order, one ``skipped.csv`` and one summary figure. A run stopped before the merge is
    resumed like a single-process one: ``--resume true`` skips every image with a row in ``scores.csv`` or a part.

    Args:
        output_dir: results folder.
        write_maps, write_overlays: what to write besides ``scores.csv``.
        summary_figure: write ``summary.png``.
        resume: keep an existing ``scores.csv`` and skip nothing already written (rows are appended and flushed per
            image, so an interrupted job loses nothing).
        input_order: the items (dicts with ``image``) or paths of the whole run in input order; the merged
            ``scores.csv`` of a distributed run follows it. Default: the order of the evaluator's dataset.
    """

    def __init__(
        self,
        output_dir: str,
        write_maps: bool = True,
        write_overlays: bool = True,
        summary_figure: bool = True,
        resume: bool = False,
        input_order: list | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.write_maps = write_maps
        self.write_overlays = write_overlays
        self.summary_figure = summary_figure
        self.resume = resume
        self.input_order = input_order
        self.writer = None
        self._background = None
        self._lock = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)
        engine.add_event_handler(Events.COMPLETED, self._close)

    @staticmethod
    def _pending(engine: Engine) -> list[str]:
        """The images this run processes (all processes' shards), in order."""
        return _image_paths(getattr(getattr(engine.data_loader, "dataset", None), "data", None) or [])

    def _order(self, engine: Engine) -> list[str]:
        return self._pending(engine) if self.input_order is None else _image_paths(self.input_order)

    def _open(self, engine: Engine) -> None:
        from medad_monai.engine.distributed import barrier, is_distributed
        from medad_monai.io.outputs import OutputDirLock
        from medad_monai.io.writers import AnomalyResultWriter, assign_stems, done_images_in, part_csv_name, \
            reconcile_outputs

        options = dict(output_dir=self.output_dir, calibration=getattr(engine, "calibration", None),
                       write_maps=self.write_maps, write_overlays=self.write_overlays, resume=self.resume)
        if options["calibration"] is None and idist.get_rank() == 0:
            warn_uncalibrated(self.output_dir)
        if not is_distributed():
            self.writer = AnomalyResultWriter(**options)
            return
        rank = idist.get_rank()
        if rank == 0:  # one lock for the group; the other ranks write only after it is held
            self._lock = OutputDirLock(self.output_dir, "distributed inference").acquire()
            if self.resume:
                reconcile_outputs(self.output_dir, done_images_in(self.output_dir))
        barrier()
        # the names a single process would give, in order; on resume the names of finished images are on disk
        stems = assign_stems(self._pending(engine), self.output_dir if self.resume else None)
        barrier()  # every rank has listed the folder before any writes into it
        self.writer = AnomalyResultWriter(**options, csv_name=part_csv_name(rank), lock=False, stems=stems,
                                          reconcile=False)

    def _write(self, engine: Engine) -> None:
        if engine.state.output is None or self.writer is None:
            return
        if self._background is None:
            from medad_monai.io.writers import BackgroundBatchWriter

            self._background = BackgroundBatchWriter(self.writer)
        self._background.submit(engine.state.output)

    def _close(self, engine: Engine) -> None:
        if self.writer is None:
            return
        from medad_monai.engine.distributed import all_gather_objects, barrier, is_distributed
        from medad_monai.io.writers import merge_part_files, write_skipped_csv

        if self._background is not None:
            self._background.close()  # every queued batch written, in order
            self._background = None
        self.writer.close()
        skipped = list(getattr(engine.state, "skipped_items", []) or [])
        skipped += [{"image": path, "reason": f"writing results failed: {msg}"} for path, msg in self.writer.failures]
        n_written = self.writer.n_written
        if is_distributed():
            shards = all_gather_objects((skipped, n_written, self.writer.summary_candidates()))
            if idist.get_rank() != 0:
                barrier()
                return
            skipped = [s for shard in shards for s in shard[0]]
            n_written = sum(shard[1] for shard in shards)
            for shard in shards[1:]:
                self.writer.add_summary_candidates(shard[2])
            n_rows = merge_part_files(self.output_dir, self._order(engine))
            logger.info("Merged the rows of %d processes into %s (%d images)", len(shards),
                        os.path.join(self.output_dir, "scores.csv"), n_rows)
        if self.summary_figure:
            self.writer.summary_figure(os.path.join(self.output_dir, "summary.png"))
        if skipped:
            write_skipped_csv(os.path.join(self.output_dir, "skipped.csv"), skipped)
        logger.info(
            "Wrote results of %d images to %s (%d skipped: unreadable or failed to write%s)",
            n_written,
            self.output_dir,
            len(skipped),
            ", listed in skipped.csv" if skipped else "",
        )
        if is_distributed():
            self._lock.release()
            barrier()
