"""One predictor behind every entry point: a trained anomaly-map network, the calibration it was fitted with, and the
decisions of the output contract (``pred_score``, ``pred_label``, ``anomaly_map``, ``pred_mask``).

Bundle calibration, evaluation and inference (:class:`~medad_monai.engine.evaluator.AnomalyEvaluator`), export
(:func:`~medad_monai.apps.export.export_bundle`), the MONAI Deploy app (:class:`~medad_monai.apps.deploy.AnomalyBundle`)
and the MONAI Label app (:class:`~medad_monai.apps.label.infer.AnomalyBundleInferTask`) all go through this module:

- :func:`load_weights` is the one way a ``model.pt`` reaches a network: the file is checked first
  (:func:`~medad_monai.engine.checkpoints.check_weights_file`: missing or truncated files are named), read with
  ``torch.load(weights_only=True)`` (a planted file cannot run code) and loaded strictly, with an error naming the
  file and the settings to check when it belongs to another architecture or size.
- :class:`AnomalyPredictor` checks a run against what the calibration records, once, before the first result: the
  network and input (:mod:`medad_monai.evaluation.model_record`), the score recipe (``score_method``, ``percentile``)
  and the map recipe (:func:`~medad_monai.networks.follow_calibration`: smoothing, residual, healthy statistics). Then
  :meth:`~AnomalyPredictor.predict` turns a batch into the reconstruction and the output contract, and
  :meth:`~AnomalyPredictor.decide` turns maps made elsewhere (MONAI Label's own inferer) into the same contract.
- :meth:`AnomalyPredictor.from_bundle` builds it from a bundle folder, its models folder and the same override files
  and ``id=value`` overrides the bundle CLI takes, so a model trained with ``configs/demo.json`` is served with it.

**One policy.** Settings that the calibration fixes and the run cannot change (network, input size, channels) are
refused when they differ, everywhere, with both values and the fixing command. For the score and map recipes, a run
whose settings come from the user's command (bundle evaluate/inference, export) is refused as well (``follow=False``:
the user asked for one recipe and the thresholds mean something only for another); the served apps (Deploy, Label:
``follow=True``) have no per-run setting to disagree with — their config's recipe is a default, and a model trained
through MONAI Label with recipe overrides records them only in its calibration — so they serve the model as
calibrated and log the difference with both values. Without a calibration, scores and maps are produced, labels are
``-1`` and masks empty, and :attr:`AnomalyPredictor.calibrated` is ``False`` (``metrics.json`` says so).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medad_monai.evaluation.calibration import Calibration
from medad_monai.engine.checkpoints import check_weights_file, load_error_detail
from medad_monai.engine.distributed import unwrap_network
from medad_monai.evaluation.model_record import ModelRecordMismatch, bundle_identity, check_network_record, network_record
from medad_monai.networks.anomaly_map import follow_calibration, map_recipe
from medad_monai.evaluation.scoring import AnomalyOutput, aggregate_score, apply_thresholds

__all__ = [
    "AnomalyPredictor",
    "BundleLoadError",
    "record_in_calibration",
    "load_weights",
    "state_dict_of",
    "bundle_parser",
    "override_config_files",
    "CONFIGS_ENV",
    "INFERENCE_CONFIG",
]

logger = logging.getLogger("medad_monai")

#: the bundle's inference config, relative to the bundle folder
INFERENCE_CONFIG = os.path.join("configs", "inference.json")
#: environment variable naming override configs of the bundle to serve with (comma-separated, relative to the bundle)
CONFIGS_ENV = "MEDAD_BUNDLE_CONFIGS"
#: score methods whose value depends on ``percentile``
_PERCENTILE_METHODS = ("topk", "percentile")


class BundleLoadError(ValueError):
    """The bundle (or model) cannot be used; the message names the path and the problem."""


def state_dict_of(obj: Any, path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """The plain state dict in what ``torch.load`` returned: the bundle's own ``model.pt``, ``obj[key]`` when ``key``
    is given, or the ``"model"`` entry of a resumable training checkpoint.

    Raises:
        BundleLoadError: naming the file and what it holds instead.
    """
    if key:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise BundleLoadError(f"{path} has no entry {key!r} (it holds {keys}).")
        obj = obj[key]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):  # a checkpoint with several objects
        return dict(obj["model"])
    raise BundleLoadError(
        f"{path} is not a state dict of the bundle's network (got {type(obj).__name__}"
        + (f" with keys {sorted(obj)[:5]}" if isinstance(obj, Mapping) else "")
        + ")."
    )


def load_weights(network: torch.nn.Module, path: str | os.PathLike, key: str | None = None) -> torch.nn.Module:
    """Loads the weights file ``path`` into ``network`` strictly; the one loader of every entry point.

    Args:
        network: the bundle's ``network_def`` (an :class:`~medad_monai.networks.AnomalyMapNet` accepts the training
            network's plain keys).
        path: ``model.pt`` (a plain state dict) or a resumable checkpoint (its ``"model"`` entry is used).
        key: take ``torch.load(path)[key]`` instead.

    Raises:
        FileNotFoundError: no file (the message says to train first).
        BundleLoadError: a damaged file, a file that is not a state dict, or weights of another architecture or size.
    """
    path = str(path)
    try:
        check_weights_file(path)
    except ValueError as e:
        raise BundleLoadError(str(e)) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling refusals and read errors come in many kinds
        raise BundleLoadError(f"cannot read the weights {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    state = state_dict_of(obj, path, key)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        hint = (
            " It looks like a resumable checkpoint: pass its 'model' entry."
            if isinstance(obj, Mapping) and "optimizer" in obj and key is None and "model" not in obj
            else ""
        )
        detail = load_error_detail(e)
        raise BundleLoadError(
            f"cannot load the weights {path} into the network built from the config: they were trained with other "
            "size or architecture settings. Run with the override file or settings of the training (e.g. "
            f"configs/demo.json).{hint} ({detail})"
        ) from e
    return network


def override_config_files(bundle_dir: str | os.PathLike, names: Sequence[str] | str | None) -> list[Path]:
    """The bundle's override files ``names`` (relative to ``bundle_dir``, a list or one comma-separated string as in
    ``--conf bundle_configs``; default: ``$MEDAD_BUNDLE_CONFIGS``, comma-separated), each checked to exist and to lie
    inside the bundle: override files hold evaluated expressions, so only the bundle's own are read.

    Raises:
        BundleLoadError: a file outside the bundle or missing.
    """
    if names is None:
        names = os.environ.get(CONFIGS_ENV, "")
    if isinstance(names, str):
        names = [f.strip() for f in names.split(",") if f.strip()]
    root = Path(bundle_dir).resolve()
    files = []
    for name in names:
        f = (root / name).resolve()
        if root not in f.parents:
            raise BundleLoadError(
                f"the override config {name} is outside the bundle {bundle_dir}; copy it into the bundle's configs "
                "folder (override files are evaluated, so only the bundle's own are read)."
            )
        if not f.is_file():
            raise BundleLoadError(f"the override config {f} does not exist ({CONFIGS_ENV}).")
        files.append(f)
    return files


def bundle_parser(
    bundle_dir: str | os.PathLike,
    config_files: Sequence[str] | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    config_file: str = INFERENCE_CONFIG,
):
    """A ``ConfigParser`` of the bundle's ``config_file`` with its override files merged over it (as
    ``monai.bundle run --config_file "['configs/inference.json','configs/demo.json']"``), ``bundle_root`` set to
    ``bundle_dir`` (so it works from any working directory), then ``overrides`` (``{"id": value}``).

    Returns:
        ``(parser, files)``: the parser and the config files read, in order.
    """
    from monai.bundle import ConfigParser

    files = [Path(bundle_dir) / config_file] + override_config_files(bundle_dir, config_files)
    parser = ConfigParser()
    try:
        parser.read_config([str(f) for f in files])
    except Exception as e:  # noqa: BLE001 - re-raised with the file names
        raise BundleLoadError(f"cannot read {', '.join(map(str, files))}: {type(e).__name__}: {e}") from e
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser, files


def record_in_calibration(
    calibration: Calibration,
    network: torch.nn.Module,
    input_shape: Sequence[int] | None,
    bundle: dict[str, str] | None = None,
    images: dict[str, dict[str, Any]] | None = None,
) -> Calibration:
    """Writes into a just-fitted ``calibration`` what :class:`AnomalyPredictor` later checks runs against: the map
    recipe of ``network`` (smoothing, residual, healthy statistics), and the model record of the network fed
    ``input_shape`` = ``(C, H, W)`` (:func:`~medad_monai.evaluation.model_record.network_record`, with the package,
    MONAI and torch versions that made it, the ``bundle`` identity
    (:func:`~medad_monai.evaluation.model_record.bundle_identity`) and the fingerprints of the image lists in ``images``
    (``{"calibration_images": ..., "training_images": ...}``,
    :func:`~medad_monai.evaluation.model_record.list_fingerprint`); skipped when ``None``). Ends the
    healthy statistics' leave-one-out, which only the calibration's own images need. The one place both the bundle's
    calibration step and the demo's baselines stamp their calibrations.
    """
    recipe = map_recipe(network)
    calibration.map_sigma = recipe["map_sigma"]
    calibration.map_residual = recipe["map_residual"]
    normalizer = getattr(unwrap_network(network), "normalizer", None)
    if normalizer is not None:
        calibration.map_normalization = normalizer.state()
        normalizer.end_leave_one_out()
    if input_shape is not None:
        import monai

        from medad_monai import __version__

        # the versions are for the reader (what made this file), not compared: weights and thresholds carry over
        versions = {"medad_monai": __version__, "monai": monai.__version__, "torch": torch.__version__}
        record = network_record(network, input_shape)
        if bundle:
            record["bundle"] = dict(bundle)
        record.update({k: dict(v) for k, v in (images or {}).items()})
        calibration.model = {**record, "versions": versions}
    return calibration


class AnomalyPredictor:
    """A network that makes anomaly maps, checked against its calibration, turning images into the output contract.

    Args:
        network: an :class:`~medad_monai.networks.AnomalyMapNet` (or any module with ``predict(x) ->
            (reconstruction, anomaly_map)``), possibly wrapped in DDP.
        calibration: a :class:`~medad_monai.evaluation.calibration.Calibration`, the path of its JSON, or ``None``
            (scores and maps only: labels ``-1``, empty masks).
        score_method, percentile: the image score the run asks for
            (:func:`~medad_monai.evaluation.scoring.aggregate_score`); ``None``: the calibration's (``"mean"``, 99
            without one).
        input_shape: ``(channels, height, width)`` the run feeds, checked against the calibration's model record now;
            ``None``: checked on the first batch.
        follow: ``False`` (bundle CLI, export) refuses a score or map recipe other than the calibration's; ``True``
            (served apps) uses the calibration's recipe and logs the difference (module docstring: one policy).
        source: how messages name the calibration (its path).
        what: how messages name the run's settings (e.g. the config file).
        bundle: the run's bundle (:func:`~medad_monai.evaluation.model_record.bundle_identity`), refused when the
            calibration records another bundle name.

    Raises:
        ModelRecordMismatch: network, input or (``follow=False``) score recipe other than the calibration's.
        ValueError: (``follow=False``) another map recipe, or a damaged calibration.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        calibration: Calibration | str | os.PathLike | None = None,
        score_method: str | None = None,
        percentile: float | None = None,
        input_shape: Sequence[int] | None = None,
        follow: bool = False,
        source: str | None = None,
        what: str = "this run",
        bundle: dict[str, str] | None = None,
    ) -> None:
        if isinstance(calibration, (str, os.PathLike)):
            source = source or str(calibration)
            calibration = Calibration.load(calibration)
        self.network = network
        self.calibration: Calibration | None = calibration
        self.source = source or "the calibration"
        self.what = what
        self.bundle = bundle
        self.score_method, self.percentile = self._score_recipe(score_method, percentile, follow)
        if calibration is not None and not calibration.model:
            logger.warning(
                "%s does not record the network and input size it was fitted for (written by an older version), so a "
                "mismatch cannot be detected; re-run the calibration to add the record.", self.source,
            )
        # the maps the thresholds were fitted on (smoothing, residual, healthy statistics); installs the statistics
        follow_calibration(network, calibration, self.source, adopt=follow, what=what)
        self._checked_shapes: set[tuple[int, ...]] = set()
        if input_shape is not None:
            self.check_input(input_shape)

    def _score_recipe(self, method: str | None, percentile: float | None, follow: bool) -> tuple[str, float]:
        cal = self.calibration
        if cal is None:
            return (method or "mean"), float(99.0 if percentile is None else percentile)
        theirs = (cal.score_method, float(cal.percentile))
        ours = (method or theirs[0], float(theirs[1] if percentile is None else percentile))
        same = ours[0] == theirs[0] and (ours[0] not in _PERCENTILE_METHODS or ours[1] == theirs[1])
        if same:
            return theirs
        if follow:
            logger.warning(
                "%s asks for score_method=%r percentile=%g but %s was fitted with %r/%g; using the calibration's, "
                "since its image threshold only means something for those.", self.what, *ours, self.source, *theirs,
            )
            return theirs
        raise ModelRecordMismatch(
            f"{self.source} was fitted for score_method={theirs[0]!r} percentile={theirs[1]:g} but {self.what} uses "
            f"score_method={ours[0]!r} percentile={ours[1]:g}, so its image threshold would be meaningless. Run with "
            f"--score_method {theirs[0]} --percentile {theirs[1]:g}, or re-run the calibration with these settings "
            f"(`python -m monai.bundle run calibration --config_file <bundle>/configs/train.json --score_method "
            f"{ours[0]} --percentile {ours[1]:g}`) (or, for a bundle evaluation, `run recalibrate` instead of `run`: "
            "re-fits the thresholds on the validation list with these settings, then evaluates)."
        )

    @property
    def calibrated(self) -> bool:
        """Whether labels and masks are decided (a calibration was given)."""
        return self.calibration is not None

    def check_input(self, input_shape: Sequence[int]) -> None:
        """Refuses inputs of ``(C, H, W)`` other than the calibration's record (once per shape)."""
        shape = tuple(int(s) for s in input_shape)
        if self.calibration is None or shape in self._checked_shapes:
            return
        check_network_record(self.calibration.model, self.network, shape, self.source, self.bundle)
        self._checked_shapes.add(shape)

    def decide(self, anomaly_map: torch.Tensor) -> AnomalyOutput:
        """The output contract for ``(B, 1, H, W)`` maps: scores with the run's recipe, labels and masks from the
        calibration's thresholds (``-1`` and empty without one)."""
        amap = anomaly_map.float()
        scores = aggregate_score(amap, method=self.score_method, percentile=self.percentile)
        return apply_thresholds(amap, scores, self.calibration)

    def predict(self, x: torch.Tensor, autocast: Any = None) -> tuple[torch.Tensor, AnomalyOutput]:
        """``(reconstruction, output)`` for a ``(B, C, H, W)`` batch on the network's device.

        Args:
            x: the preprocessed batch.
            autocast: a context to predict in (e.g. ``torch.autocast`` for ``--amp``); the reconstruction and map
                come back as float32 either way.
        """
        self.check_input(x.shape[1:])
        net = unwrap_network(self.network)
        with torch.no_grad(), (autocast if autocast is not None else contextlib.nullcontext()):
            rec, amap = net.predict(x)
        if isinstance(rec, torch.Tensor) and rec.is_floating_point():
            rec = rec.float()
        return rec, self.decide(amap)

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | os.PathLike,
        weights_file: str | os.PathLike | None = None,
        config_files: Sequence[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        follow: bool = True,
    ) -> AnomalyPredictor:
        """The predictor of a trained bundle, with the bundle's preprocessing.

        The network, preprocessing and settings come from ``configs/inference.json`` with the override files
        ``config_files`` (default ``$MEDAD_BUNDLE_CONFIGS``) and ``overrides`` (:func:`bundle_parser`); the weights
        from ``weights_file`` (default ``<bundle>/models/model.pt``, :func:`load_weights`); the calibration from the
        config's ``calibration_file``, which must exist (served decisions need thresholds).

        The returned predictor also has ``bundle_dir``, ``weights_file``, ``config_files``, ``preprocessing`` (the
        config's transform), ``channels``, ``spatial_size`` (``None`` when the config keeps each image's size) and
        ``device``.

        Raises:
            BundleLoadError: a missing or unusable config, weights file or calibration, or a run that does not fit
                the calibration's record, naming the file and the override file to serve with.
        """
        bundle_dir = Path(bundle_dir)
        weights_file = Path(weights_file) if weights_file is not None else bundle_dir / "models" / "model.pt"
        parser, files = bundle_parser(bundle_dir, config_files, {"ckpt_dir": str(weights_file.parent), **(overrides or {})})
        config_file = files[0]
        missing = [k for k in ("network_def", "preprocessing") if k not in parser]
        if missing:
            raise BundleLoadError(f"{config_file} has no {missing}.")

        def parsed(key: str, default: Any = None) -> Any:
            return parser.get_parsed_content(key) if key in parser else default

        try:
            device = torch.device(device) if device is not None else torch.device(parsed("device", "cpu"))
            channels = int(parsed("channels", 1))
            spatial_size = [int(s) for s in parsed("spatial_size", [])] or None
            score = (parsed("score_method", None), parsed("percentile", None))
            calibration_file = Path(parsed("calibration_file", str(weights_file.parent / "calibration.json")))
            preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
            network = parser.get_parsed_content("network_def", instantiate=True)
        except Exception as e:  # noqa: BLE001 - config errors are many kinds; name the file
            raise BundleLoadError(
                f"cannot build the network/preprocessing of {config_file}: {type(e).__name__}: {e}"
            ) from e
        if not callable(getattr(network, "predict", None)):
            raise BundleLoadError(
                f"network_def of {config_file} is {type(network).__name__}, which has no predict(x) -> "
                "(reconstruction, anomaly_map); wrap it in medad_monai.networks.AnomalyMapNet."
            )
        hint = (
            f" To serve the settings of the training, name its override file ({CONFIGS_ENV}=configs/<override>.json, "
            "e.g. configs/demo.json)."
        )
        try:
            load_weights(network, weights_file)
        except FileNotFoundError as e:
            raise BundleLoadError(str(e)) from None
        except BundleLoadError as e:
            raise BundleLoadError(f"{e}{hint}") from None
        try:
            calibration = Calibration.load(calibration_file)
        except (FileNotFoundError, ValueError) as e:
            raise BundleLoadError(f"the bundle {bundle_dir} needs a calibration for its thresholds: {e}") from e
        what = " + ".join(str(f) for f in files)
        try:
            predictor = cls(
                network.to(device).eval(),
                calibration,
                score_method=score[0],
                percentile=None if score[1] is None else float(score[1]),
                input_shape=(channels, *spatial_size) if spatial_size else None,
                follow=follow,
                source=str(calibration_file),
                what=what,
                bundle=bundle_identity(bundle_dir),
            )
        except ValueError as e:
            raise BundleLoadError(f"{e}{hint}") from None
        predictor.bundle_dir = bundle_dir
        predictor.weights_file = weights_file
        predictor.config_files = files
        predictor.preprocessing = preprocessing
        predictor.channels = channels
        predictor.spatial_size = spatial_size
        predictor.device = device
        return predictor
