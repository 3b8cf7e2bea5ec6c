"""Export a trained bundle to TorchScript or ONNX, with its calibration inside the exported file.

A deployed anomaly detector needs two things: the network (``x -> anomaly map``) and the healthy-data thresholds that
turn maps into decisions. :func:`export_bundle` writes both into one file:

- **TorchScript** (``models/model.ts``): the same archive ``python -m monai.bundle ckpt_export`` writes
  (``extra/metadata.json``, ``extra/inference.json``), plus ``extra/calibration.json`` and ``extra/export.json``. The
  thresholds are also registered as scalar buffers of the module (``calibration_image_threshold``, ...; see
  :meth:`~medad_monai.evaluation.calibration.Calibration.register_buffers`), so runtimes that read no extra files still
  have them.
- **ONNX** (``models/model.onnx``): exported with the TorchScript-based exporter (``dynamo=False``; the dynamo
  exporter of torch 2.13 needs ``onnxscript``, which this project does not depend on), opset 17 by default
  (``grid_sample``, which MorphAEus' warping uses, needs opset >= 16), a dynamic batch axis, input/output names from
  the bundle metadata (``image`` -> ``pred``). The same JSON files are stored as ``metadata_props``.

:func:`load_exported` reads either format back as ``(model, calibration)``; ``model(x)`` returns the anomaly map and
``model.predict(x)`` the decisions (:func:`~medad_monai.evaluation.scoring.apply_thresholds` with the stored
calibration), the same rule the bundle's evaluator applies in eager mode.

Scripting vs tracing: both bundles script, as the model zoo's CI requires (it exports with ``ckpt_export`` without
``--use_trace``). MorphAEus warps with :class:`~medad_monai.networks.blocks.Warp2D`, MONAI ``Warp``'s math in a form
``torch.jit.script`` compiles (MONAI's ``Warp`` itself does not script), so nothing needs tracing; ``use_trace=True``
still traces either bundle, and ``None`` (default) scripts and falls back to tracing only if scripting fails.

Command line (through MONAI's CLI, without the calibration)::

    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json \\
        [--use_trace True --input_shape "[1,1,128,128]"]

With the calibration (``fire`` command line)::

    python -c "import fire, medad_monai.apps.export as e; fire.Fire(e.export_bundle)" bundles/morphaeus --fmt onnx
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata, save_net_with_metadata
from monai.networks.utils import convert_to_onnx, convert_to_torchscript

from medad_monai import __version__
from medad_monai.evaluation.calibration import Calibration
from medad_monai.evaluation.model_record import bundle_identity
from medad_monai.evaluation.predictor import AnomalyPredictor, BundleLoadError, load_weights, override_config_files
from medad_monai.evaluation.scoring import AnomalyOutput, apply_thresholds

__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_OPSET",
    "EXPORT_FORMATS",
    "ExportedAnomalyModel",
    "export_bundle",
    "load_exported",
]

logger = logging.getLogger(__name__)

#: name of the calibration in a TorchScript archive (``extra/``) and in ONNX ``metadata_props``.
CALIBRATION_FILE = "calibration.json"
#: the bundle metadata, under MONAI's name (``monai.data.torchscript_utils.METADATA_FILENAME``).
METADATA_FILE = "metadata.json"
#: how the file was made (format, scripting or tracing, input shape, versions, overrides).
EXPORT_INFO_FILE = "export.json"
#: formats :func:`export_bundle` writes.
EXPORT_FORMATS = ("torchscript", "onnx")
#: ONNX opset: >= 16 for ``GridSample`` (MorphAEus' warping; 15 fails). Tested: 16, 17, 18 and 20 with both bundles.
DEFAULT_OPSET = 17

_SUFFIX = {"torchscript": ".ts", "onnx": ".onnx"}


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"medad_monai.apps.export: ONNX export and loading need {module!r} (pip install onnx onnxruntime)."
        ) from e


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=4).encode()


def _bundle_file(bundle_root: str, given: str | None, *parts: str) -> str:
    path = os.path.abspath(given if given is not None else os.path.join(bundle_root, *parts))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"medad_monai.apps.export: {path} does not exist (bundle root {bundle_root}).")
    return path


def _example_shape(parser: ConfigParser, metadata: Mapping[str, Any]) -> list[int]:
    """``[1, C, *spatial]`` of the exported network's input.

    Our bundles size the network with the top-level ``channels`` and ``spatial_size`` keys, so these win (they carry
    the command line overrides); otherwise the metadata's first input (``num_channels``, ``spatial_shape``, which must
    then be integers).
    """
    if "spatial_size" in parser and "channels" in parser:
        spatial = parser.get_parsed_content("spatial_size")
        channels = parser.get_parsed_content("channels")
        spatial = [int(spatial)] * 2 if isinstance(spatial, (int, float)) else [int(s) for s in spatial]
        return [1, int(channels), *spatial]
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    if not inputs:
        raise ValueError("medad_monai.apps.export: no input_shape given and no network_data_format.inputs in the metadata.")
    first = next(iter(inputs.values()))
    shape = [first.get("num_channels"), *first.get("spatial_shape", [])]
    if not all(isinstance(s, int) for s in shape):
        raise ValueError(
            f"medad_monai.apps.export: cannot derive an input shape from the metadata ({shape}); pass input_shape."
        )
    return [1, *shape]


def _io_names(metadata: Mapping[str, Any]) -> tuple[str, str]:
    """Names of the first input and first output of ``network_data_format`` (default ``image`` / ``pred``): the names
    MONAI's tools, MONAI Label and MONAI Deploy read."""
    fmt = metadata.get("network_data_format", {})
    inputs, outputs = fmt.get("inputs") or {"image": None}, fmt.get("outputs") or {"pred": None}
    return next(iter(inputs)), next(iter(outputs))


def export_bundle(
    bundle_root: str,
    ckpt_dir: str | None = None,
    output_dir: str | None = None,
    fmt: str = "torchscript",
    net_id: str = "network_def",
    config_file: str | None = None,
    config_files: Sequence[str] | None = None,
    meta_file: str | None = None,
    ckpt_file: str | None = None,
    calibration_file: str | None = None,
    filename: str | None = None,
    key_in_ckpt: str | None = None,
    use_trace: bool | None = None,
    input_shape: Sequence[int] | None = None,
    opset_version: int = DEFAULT_OPSET,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    **override: Any,
) -> str:
    """Exports ``net_id`` of the bundle's inference config with the trained weights and the calibration.

    Same steps as ``python -m monai.bundle ckpt_export`` (build ``network_def`` from ``inference.json`` + metadata with
    the overrides, load ``model.pt``, script or trace, save with the metadata and the config as extra files), plus the
    calibration and, optionally, ONNX. One difference: the config stored in the file has the ``override`` values
    applied, so it describes the exported network (``ckpt_export`` stores the file as it is on disk).

    Args:
        bundle_root: the bundle folder (holds ``configs/``).
        ckpt_dir: folder with ``model.pt`` and ``calibration.json``; default ``<bundle_root>/models``.
        output_dir: where to write; default ``ckpt_dir``.
        fmt: ``"torchscript"`` (``model.ts``) or ``"onnx"`` (``model.onnx``).
        net_id: the config id of the single-tensor network (``x -> anomaly map``).
        config_file: default ``<bundle_root>/configs/inference.json``.
        config_files: override files of the bundle merged over ``config_file``, as ``monai.bundle run --config_file
            "['configs/inference.json','configs/demo.json']"`` (a model trained with ``demo.json`` is exported with
            ``["configs/demo.json"]``); relative to the bundle folder and inside it
            (:func:`~medad_monai.evaluation.predictor.override_config_files`).
        meta_file: default ``<bundle_root>/configs/metadata.json``.
        ckpt_file: default ``<ckpt_dir>/model.pt`` (a plain state dict of the training network, as training writes).
        calibration_file: default ``<ckpt_dir>/calibration.json``; required (run the bundle's calibration first).
        filename: output file name; default ``model.ts`` / ``model.onnx``.
        key_in_ckpt: key of the weights in a nested checkpoint (``"model"`` for the resumable checkpoints).
        use_trace: TorchScript only. ``True`` traces, ``False`` scripts, ``None`` scripts and falls back to tracing.
        input_shape: example input ``[N, C, H, W]`` for tracing/ONNX; default ``[1, channels, *spatial_size]`` of the
            config (or the metadata's first input).
        opset_version: ONNX opset (>= 16 for ``grid_sample``).
        verify: reload the written file and compare it with the eager network on a random batch of 2 (a batch size
            other than the example's, which also checks that a trace generalises over the batch); raises
            ``RuntimeError`` beyond ``atol``/``rtol`` or when the stored calibration differs.
        atol, rtol: tolerances of ``verify``.
        override: config id -> value, applied before parsing (e.g. ``spatial_size=[32, 32]``).

    Returns:
        The path of the written file.

    Example::

        >>> path = export_bundle("bundles/memmc_mae", fmt="onnx")  # doctest: +SKIP
        >>> model, calibration = load_exported(path)  # doctest: +SKIP
        >>> model.predict(torch.rand(1, 1, 224, 224)).pred_label  # doctest: +SKIP
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"medad_monai.apps.export: fmt must be one of {EXPORT_FORMATS}, got {fmt!r}.")
    bundle_root = os.path.abspath(str(bundle_root))
    if not os.path.isdir(os.path.join(bundle_root, "configs")):
        raise FileNotFoundError(f"medad_monai.apps.export: {bundle_root} is not a bundle (no configs/ folder).")
    ckpt_dir = os.path.abspath(ckpt_dir) if ckpt_dir is not None else os.path.join(bundle_root, "models")
    output_dir = os.path.abspath(output_dir) if output_dir is not None else ckpt_dir
    config_file = _bundle_file(bundle_root, config_file, "configs", "inference.json")
    meta_file = _bundle_file(bundle_root, meta_file, "configs", "metadata.json")
    ckpt_file = _bundle_file(ckpt_dir, ckpt_file, "model.pt")
    calibration_file = os.path.abspath(calibration_file or os.path.join(ckpt_dir, CALIBRATION_FILE))
    calibration = Calibration.load(calibration_file)

    parser = ConfigParser()
    try:
        files = [config_file] + [str(f) for f in override_config_files(bundle_root, list(config_files or []))]
    except BundleLoadError as e:
        raise BundleLoadError(f"medad_monai.apps.export: {e}") from None
    parser.read_config(f=files)
    parser.read_meta(f=meta_file)
    for k, v in override.items():
        parser[k] = v
    metadata = parser.get("_meta_", {})
    # the config stored with the model: the file plus the overrides, without the metadata (stored separately)
    stored_config = {k: v for k, v in parser.get().items() if k != "_meta_"}
    try:
        net = parser.get_parsed_content(net_id)
    except KeyError as e:
        raise KeyError(f"medad_monai.apps.export: {config_file} has no {net_id!r}.") from e
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"medad_monai.apps.export: {net_id!r} of {config_file} is a {type(net).__name__}, not a Module.")
    try:
        load_weights(net, ckpt_file, key_in_ckpt)
    except BundleLoadError as e:
        raise BundleLoadError(f"medad_monai.apps.export: {e}") from None
    net = net.cpu().eval()
    shape = [int(s) for s in (input_shape if input_shape is not None else _example_shape(parser, metadata))]
    try:  # the predictor's checks (model record, score and map recipes); installs the healthy statistics, exported too
        AnomalyPredictor(
            net,
            calibration,
            parser.get_parsed_content("score_method") if "score_method" in parser else None,
            parser.get_parsed_content("percentile") if "percentile" in parser else None,
            input_shape=shape[1:],
            follow=False,
            source=calibration_file,
            what=f"{net_id!r} of {config_file}",
            bundle=bundle_identity(bundle_root),
        )
    except ValueError as e:
        raise ValueError(f"medad_monai.apps.export: {e} For export, pass the same settings as override={{...}}.") from None
    calibration.register_buffers(net)

    example = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    in_name, out_name = _io_names(metadata)
    info: dict[str, Any] = {
        "format": fmt,
        "net_id": net_id,
        "input_shape": shape,
        "input_name": in_name,
        "output_name": out_name,
        "config_file": os.path.basename(config_file),
        "config_files": [os.path.relpath(f, bundle_root) for f in files[1:]],
        "overrides": {k: v for k, v in override.items()},
        "medad_monai_version": __version__,
        "torch_version": torch.__version__,
    }
    extra = {
        os.path.basename(config_file): _json_bytes(stored_config),
        CALIBRATION_FILE: _json_bytes(calibration.to_dict()),
    }
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, filename or "model" + _SUFFIX[fmt])

    start = time.perf_counter()
    if fmt == "torchscript":
        jit_obj, info["method"] = _to_torchscript(net, example, use_trace)
        save_net_with_metadata(
            jit_obj,
            path,
            include_config_vals=False,
            append_timestamp=False,
            meta_values=metadata,
            more_extra_files={**extra, EXPORT_INFO_FILE: _json_bytes(info)},
        )
    else:
        info["method"] = "onnx (torch.onnx.export, dynamo=False)"
        info["opset_version"] = int(opset_version)
        _to_onnx(net, example, path, in_name, out_name, int(opset_version), metadata, extra, info)
    info["seconds"] = round(time.perf_counter() - start, 3)
    logger.info("medad_monai.apps.export: wrote %s (%s, %s) in %.1f s.", path, fmt, info["method"], info["seconds"])

    if verify:
        _verify(net, path, calibration, shape, atol, rtol)
    return path


def _to_torchscript(net: torch.nn.Module, example: torch.Tensor, use_trace: bool | None):
    if use_trace is None:
        try:
            return convert_to_torchscript(net, use_trace=False), "script"
        except Exception as e:  # TorchScript raises several types; any failure means "trace instead"
            logger.warning("medad_monai.apps.export: scripting failed (%s); tracing instead.", str(e).strip().split("\n")[0])
            use_trace = True
    if use_trace:
        return convert_to_torchscript(net, use_trace=True, inputs=[example]), "trace"
    return convert_to_torchscript(net, use_trace=False), "script"


def _to_onnx(
    net: torch.nn.Module,
    example: torch.Tensor,
    path: str,
    in_name: str,
    out_name: str,
    opset_version: int,
    metadata: Mapping[str, Any],
    extra: Mapping[str, bytes],
    info: Mapping[str, Any],
) -> None:
    onnx = _optional("onnx")
    model = convert_to_onnx(
        net,
        inputs=[example],
        input_names=[in_name],
        output_names=[out_name],
        opset_version=opset_version,
        dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
        filename=path,
        use_trace=True,
        dynamo=False,
    )
    props = {METADATA_FILE: _json_bytes(metadata), **extra, EXPORT_INFO_FILE: _json_bytes(info)}
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value.decode()
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _verify(
    net: torch.nn.Module, path: str, calibration: Calibration, shape: Sequence[int], atol: float, rtol: float
) -> None:
    model, stored = load_exported(path)
    if stored != calibration:
        raise RuntimeError(f"medad_monai.apps.export: the calibration read back from {path} differs from the original.")
    x = torch.rand([2, *shape[1:]], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(x)
    got = model(x)
    err = float((got - expected).abs().max())
    if not torch.allclose(got, expected, atol=atol, rtol=rtol):
        raise RuntimeError(
            f"medad_monai.apps.export: {path} differs from the eager network by up to {err:.3g} "
            f"(atol={atol}, rtol={rtol})."
        )
    logger.info("medad_monai.apps.export: verified %s, max |exported - eager| = %.3g.", path, err)


class ExportedAnomalyModel:
    """An exported anomaly-map network with its calibration: ``model(x)`` -> map, ``model.predict(x)`` -> decisions.

    Made by :func:`load_exported`. ``x`` is a ``(B, C, H, W)`` float tensor or array in [0, 1]; the map comes back as
    a CPU float tensor for ONNX and on ``device`` for TorchScript.

    Attributes:
        format: ``"torchscript"`` or ``"onnx"``.
        path: the file.
        calibration: the stored :class:`~medad_monai.evaluation.calibration.Calibration` (``None`` for files written
            without one, e.g. by plain ``ckpt_export``).
        metadata: the bundle metadata stored with the model.
        config: the inference config stored with the model (``{}`` when absent).
        export_info: how the file was made (``{}`` for files not written by :func:`export_bundle`).
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor], torch.Tensor],
        fmt: str,
        path: str,
        calibration: Calibration | None,
        metadata: dict[str, Any],
        config: dict[str, Any],
        export_info: dict[str, Any],
    ) -> None:
        self._run = run
        self.format = fmt
        self.path = path
        self.calibration = calibration
        self.metadata = metadata
        self.config = config
        self.export_info = export_info

    def __call__(self, x: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
        if x.ndim != 4:
            raise ValueError(f"medad_monai.apps.export: expected a (B, C, H, W) input, got shape {tuple(x.shape)}.")
        return self._run(x)

    def predict(self, x: Any) -> AnomalyOutput:
        """Scores, labels and masks from the stored calibration (labels ``-1`` and empty masks without one)."""
        return apply_thresholds(self(x), calibration=self.calibration)

    def __repr__(self) -> str:
        return f"ExportedAnomalyModel({self.format}, {self.path!r}, calibrated={self.calibration is not None})"


def _parse_json(raw: str | bytes | None, what: str, path: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"medad_monai.apps.export: {what} stored in {path} is not valid JSON ({e}).") from e


def load_exported(path: str, device: str | torch.device = "cpu") -> tuple[ExportedAnomalyModel, Calibration | None]:
    """Loads a file written by :func:`export_bundle` (or by ``ckpt_export``/``onnx_export``).

    ``.onnx`` runs with onnxruntime (CPU); anything else is loaded as TorchScript onto ``device``.

    Returns:
        ``(model, calibration)``; ``calibration`` is ``None`` when the file carries none.

    Example::

        >>> model, cal = load_exported("bundles/morphaeus/models/model.ts")  # doctest: +SKIP
        >>> out = model.predict(torch.rand(4, 1, 128, 128))  # doctest: +SKIP
        >>> out.pred_label, out.pred_mask.shape  # doctest: +SKIP
    """
    path = os.path.abspath(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"medad_monai.apps.export: no exported model at {path}.")
    if path.endswith(".onnx"):
        ort = _optional("onnxruntime")
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        props = session.get_modelmeta().custom_metadata_map
        in_name = session.get_inputs()[0].name
        out_name = session.get_outputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            out = session.run([out_name], {in_name: x.detach().cpu().numpy().astype(np.float32, copy=False)})[0]
            return torch.from_numpy(out)

        fmt, get = "onnx", props.get
    else:
        dev = torch.device(device)
        names = (CALIBRATION_FILE, EXPORT_INFO_FILE, "inference.json")
        module, meta, files = load_net_with_metadata(path, map_location=dev, more_extra_files=names)
        module.eval()
        config_name = _parse_json(files[EXPORT_INFO_FILE], EXPORT_INFO_FILE, path).get("config_file", "inference.json")
        if config_name not in files:  # exported from another config file than inference.json
            files.update(load_net_with_metadata(path, map_location=dev, more_extra_files=(config_name,))[2])
        files[METADATA_FILE] = json.dumps(meta)

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x.to(dev))

        fmt, get = "torchscript", files.get
    export_info = _parse_json(get(EXPORT_INFO_FILE), EXPORT_INFO_FILE, path)
    config = _parse_json(get(export_info.get("config_file", "inference.json")), "the config", path)
    raw_cal = _parse_json(get(CALIBRATION_FILE), CALIBRATION_FILE, path)
    calibration = Calibration.from_dict(raw_cal, source=f"{path}:{CALIBRATION_FILE}") if raw_cal else None
    metadata = _parse_json(get(METADATA_FILE), METADATA_FILE, path)
    model = ExportedAnomalyModel(run, fmt, path, calibration, metadata, config, export_info)
    return model, calibration
