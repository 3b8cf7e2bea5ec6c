"""Small helpers the bundle configs call, so the JSON stays short.

- :func:`find_bundle_root`: the bundle folder, wherever the command is run from.
- :func:`resolve_data`: where the datalist and its root are; the embedded demo data when the user gives none.
- :func:`datalist_items` / :func:`inference_items` / :func:`pending_items`: the items a dataset is built from.
- :func:`amp_settings` / :func:`amp_inferer` / :func:`set_cudnn_benchmark`: the ``--amp`` and ``--cudnn_benchmark``
  switches.
"""

from __future__ import annotations

import ast
import glob
import logging
import os
import sys
from collections.abc import Sequence

from monai.data import Dataset, list_data_collate

from medad_monai.data.readers import SUPPORTED_EXTENSIONS

__all__ = [
    "find_bundle_root",
    "resolve_data",
    "datalist_items",
    "inference_items",
    "section_fingerprint",
    "pending_items",
    "readable_items",
    "SkipBadItemsDataset",
    "collate_skip_none",
    "failure_reason",
    "SKIPPED_KEY",
    "IMAGE_EXTENSIONS",
    "AMP_CHOICES",
    "amp_settings",
    "amp_inferer",
    "check_amp_device",
    "set_cudnn_benchmark",
]

logger = logging.getLogger("medad_monai")

#: what ``--input_dir`` picks up: every file type :func:`medad_monai.data.load_image` reads.
IMAGE_EXTENSIONS = SUPPORTED_EXTENSIONS


def _config_files_from_argv(argv: Sequence[str]) -> list[str]:
    files: list[str] = []
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        if value.strip().startswith("["):
            try:
                files.extend(str(v) for v in ast.literal_eval(value))
                continue
            except (ValueError, SyntaxError):
                pass
        files.append(value)
    return files


def find_bundle_root(default: str = ".") -> str:
    """The folder that holds ``configs/`` of the bundle being run.

    ``python -m monai.bundle run --config_file bundles/morphaeus/configs/train.json`` works from any folder, so the
    configs cannot assume the current directory is the bundle. The root is taken, in order, from the
    ``MEDAD_BUNDLE_ROOT`` environment variable, the first ``--config_file`` on the command line that sits in a
    ``configs`` folder, the current directory when it holds ``configs/metadata.json``, else ``default``. A
    ``--bundle_root`` override on the command line replaces all of this.
    """
    env = os.environ.get("MEDAD_BUNDLE_ROOT")
    if env:
        return os.path.abspath(env)
    for f in _config_files_from_argv(sys.argv):
        parent = os.path.dirname(os.path.abspath(f))
        if os.path.basename(parent) == "configs":
            return os.path.dirname(parent)
    if os.path.isfile(os.path.join("configs", "metadata.json")):
        return os.path.abspath(".")
    return os.path.abspath(default)


def resolve_data(datalist: str | None = None, dataset_dir: str | None = None, demo_kwargs: dict | None = None):
    """Returns ``(datalist_path, dataset_dir)``.

    - ``datalist`` given: used as is; ``dataset_dir`` defaults to the datalist's folder.
    - only ``dataset_dir`` given: ``<dataset_dir>/datalist.json``.
    - neither: the embedded demo data (chest-radiograph phantoms), generated once into its cache folder
      (``$MEDAD_DEMO_DIR`` or ``~/.cache/medad_monai/demo_cxr``).
    """
    if datalist:
        datalist = os.path.abspath(os.path.expanduser(str(datalist)))
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"Datalist not found: {datalist}")
        return datalist, os.path.abspath(os.path.expanduser(str(dataset_dir))) if dataset_dir else os.path.dirname(datalist)
    if dataset_dir:
        dataset_dir = os.path.abspath(os.path.expanduser(str(dataset_dir)))
        path = os.path.join(dataset_dir, "datalist.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{dataset_dir} has no datalist.json. Pass --datalist <file.json>, or make one with "
                f"`python -m medad_monai datalist_from_folders <normal_dir> {path}`."
            )
        return path, dataset_dir
    from medad_monai.data.phantoms import default_demo_dir, generate_demo_dataset

    demo_dir = default_demo_dir()
    path = generate_demo_dataset(demo_dir, **(demo_kwargs or {}))
    return str(path), os.path.dirname(str(path))


def datalist_items(
    datalist: str | None,
    dataset_dir: str | None,
    section: str,
    limit: int | None = None,
    allow_outside: bool = False,
    check_files: bool = True,
    require_label: bool | None = None,
) -> list[dict]:
    """Items of one datalist section with absolute paths (embedded demo data when nothing is given).

    Checked before any work (:func:`~medad_monai.data.datalist.load_datalist`): paths stay inside the dataset folder
    unless ``allow_outside`` (``--allow_outside_dataset_dir True``), no image is listed twice, and every item of a
    ``test*`` section has a label (``require_label``, default: whether ``section`` starts with ``test``; inference
    passes ``False``). ``check_files=False`` lets missing files through, so that evaluation skips and
    reports them with the unreadable ones instead of refusing the whole list.
    """
    from medad_monai.data.datalist import load_datalist

    path, root = resolve_data(datalist, dataset_dir)
    items = load_datalist(
        path,
        section,
        dataset_dir=root,
        check_files=check_files,
        require_label=section.startswith("test") if require_label is None else require_label,
        allow_outside=allow_outside,
    )
    if limit:
        items = items[: int(limit)]
    if not items:
        raise ValueError(f"Section '{section}' of {path} is empty.")
    return items


def section_fingerprint(
    datalist: str | None, dataset_dir: str | None, section: str, allow_outside: bool = False
) -> dict | None:
    """:func:`~medad_monai.evaluation.model_record.fingerprint_of` the image paths of one datalist section, as
    :func:`datalist_items` resolves them (no file is read), for the model record (e.g. the training list a calibration
    belongs to); ``None`` when the datalist has no such section."""
    from medad_monai.evaluation.model_record import fingerprint_of

    try:
        items = datalist_items(datalist, dataset_dir, section, allow_outside=allow_outside, check_files=False)
    except (KeyError, ValueError, FileNotFoundError):
        return None
    return fingerprint_of(str(it["image"]) for it in items)


def inference_items(
    input_dir: str | None = None,
    datalist: str | None = None,
    dataset_dir: str | None = None,
    files: str | Sequence[str] | None = None,
    section: str = "test",
    allow_outside: bool = False,
) -> list[dict]:
    """What inference runs on: a folder (``--input_dir``, searched recursively for every file type the readers
    support), a file list (a Python list or a text file with one path per line) or a datalist section
    (``--datalist``, default ``test``; labels not needed, paths inside the dataset folder unless ``allow_outside``).
    With none of them, the demo data's test section. Files that do not exist are kept: the run skips and reports them
    with the unreadable ones (:class:`SkipBadItemsDataset`). :func:`pending_items` leaves out what a resumed run has
    already done.
    """
    return _inference_items(input_dir, datalist, dataset_dir, files, section, allow_outside)


def pending_items(items: list[dict], output_dir: str, resume: bool = False) -> list[dict]:
    """``items`` without the images that already have a complete row in ``output_dir`` (``scores.csv``, or the part
    files of a distributed run stopped before merging), when ``resume``; so an interrupted batch job continues where
    it stopped. A row cut short by a killed run does not count."""
    if not resume:
        return list(items)
    from medad_monai.io.writers import done_images_in

    done = done_images_in(output_dir)
    kept = [it for it in items if it["image"] not in done]
    logger.info("Resuming: %d of %d images already in %s", len(items) - len(kept), len(items), output_dir)
    return kept


def _inference_items(input_dir, datalist, dataset_dir, files, section, allow_outside) -> list[dict]:
    if input_dir:
        root = os.path.abspath(os.path.expanduser(str(input_dir)))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--input_dir {root} is not a folder.")
        paths = sorted(
            p
            for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
            if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not paths:
            raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}.")
        return [{"image": p} for p in paths]
    if files:
        if isinstance(files, str) and os.path.isfile(files) and not files.lower().endswith(IMAGE_EXTENSIONS):
            with open(files) as f:
                paths = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        else:
            paths = [files] if isinstance(files, str) else list(files)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            logger.warning("%d input file(s) do not exist and will be skipped, e.g. %s", len(missing), missing[:3])
        return [{"image": os.path.abspath(p)} for p in paths]
    return datalist_items(
        datalist, dataset_dir, section, allow_outside=allow_outside, check_files=False, require_label=False
    )


#: key of the entries :class:`SkipBadItemsDataset` puts in place of an unreadable item, and of the list of
#: ``{"image", "reason"}`` that :func:`collate_skip_none` attaches to a batch (it crosses worker processes).
SKIPPED_KEY = "skipped"


def failure_reason(exc: BaseException) -> str:
    """Why an item failed, as one line: the reader's :class:`~medad_monai.data.readers.ImageReadError` (file and
    problem) when it is in the chain, else the innermost cause. MONAI wraps a transform's error in ``applying
    transform <...>``, which says nothing about the file."""
    from medad_monai.data.readers import ImageReadError

    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    chosen = next((e for e in chain if isinstance(e, ImageReadError)), chain[-1])
    text = str(chosen).strip()
    return text.splitlines()[-1] if text else type(chosen).__name__


def readable_items(items: Sequence[dict], section: str = "training", strict: bool = False) -> list[dict]:
    """``items`` whose image (and mask, when given) can be read, checked before a training or calibration starts.

    The training and validation lists go into a ``CacheDataset``, which stops at the first unreadable file with
    MONAI's ``Failed to instantiate component`` far below the reader's reason. Here each file is read once
    (:func:`~medad_monai.data.readers.load_image`); an unreadable one is logged with the file and the reason, counted
    in one summary line and left out, and the run goes on, as evaluation and inference do. ``strict`` (``--strict
    True``) fails instead, naming every bad file.

    Raises:
        ValueError: with ``strict`` and any unreadable file, or when no item of ``section`` is readable.
    """
    from medad_monai.data.readers import load_image, load_mask

    kept, bad = [], []
    for item in items:
        try:
            load_image(item["image"])
            if item.get("mask"):
                load_mask(item["mask"])
            kept.append(item)
        except Exception as e:  # noqa: BLE001 - any reader error is reported, not raised
            bad.append((str(item.get("image")), failure_reason(e)))
    for name, reason in bad:
        logger.error("Skipping %s item %s: %s", section, name, reason)
    if bad and strict:
        raise ValueError(
            f"--strict True: {len(bad)} of {len(items)} '{section}' item(s) cannot be read, first {bad[0][0]}: "
            f"{bad[0][1]}. Fix or remove them, or run without --strict to leave them out."
        )
    if bad:
        logger.warning("%d of %d '%s' item(s) cannot be read and are left out (listed above).", len(bad), len(items),
                       section)
    if items and not kept:
        raise ValueError(f"No '{section}' item can be read ({len(bad)} tried; first {bad[0][0]}: {bad[0][1]}).")
    return kept


class SkipBadItemsDataset(Dataset):
    """A MONAI ``Dataset`` that reports unreadable items and goes on instead of stopping the whole job.

    A failing item is logged with its file name and the real reason (:func:`failure_reason`), kept in
    :attr:`failures` (in the process that read it), and returned as ``{SKIPPED_KEY: [{"image", "reason"}]}``, which
    :func:`collate_skip_none` moves into the batch's ``SKIPPED_KEY`` list, so the evaluator counts it even when a
    worker process read it.
    """

    def __init__(self, data: Sequence, transform=None) -> None:
        super().__init__(data=data, transform=transform)
        self.failures: list[tuple[str, str]] = []

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as e:  # noqa: BLE001 - any reader/transform error must not stop a batch job
            item = self.data[index]
            name = str(item.get("image", index) if isinstance(item, dict) else index)
            reason = failure_reason(e)
            logger.error("Skipping %s: %s", name, reason)
            self.failures.append((name, reason))
            return {SKIPPED_KEY: [{"image": name, "reason": reason}]}


def collate_skip_none(batch: list):
    """``collate_fn`` for :class:`SkipBadItemsDataset`: collates the readable items and lists the skipped ones under
    ``SKIPPED_KEY``; keys that only some items carry (e.g. an optional ``lesion``) are dropped from the batch.
    ``None`` when the batch is empty."""
    good, skipped = [], []
    for b in batch:
        if b is None:
            continue
        if isinstance(b, dict) and SKIPPED_KEY in b and len(b) == 1:
            skipped.extend(b[SKIPPED_KEY])
        else:
            good.append(b)
    out: dict = {}
    if good:
        if isinstance(good[0], dict):
            common = set.intersection(*(set(b) for b in good))
            if any(len(b) != len(common) for b in good):
                good = [{k: v for k, v in b.items() if k in common} for b in good]
        out = list_data_collate(good)
    if skipped:
        out[SKIPPED_KEY] = skipped
    return out if (good or skipped) else None


def write_json(obj, path: str) -> str:
    """``obj`` as JSON at ``path``, written whole or not at all (:func:`medad_monai.io.outputs.write_json_atomic`)."""
    from medad_monai.io.outputs import write_json_atomic

    write_json_atomic(obj, path)
    return path


#: ``--amp`` values and the autocast dtype each one asks for (``None``: full float32, no autocast).
AMP_CHOICES = {"none": None, "bf16": "bfloat16", "fp16": "float16"}


def _amp_key(amp) -> str:
    key = "none" if amp is None else str(amp).strip().lower()  # the CLI parses `--amp None` to None
    if key not in AMP_CHOICES:
        raise ValueError(
            f"--amp {amp!r} is not a mixed-precision setting: it must be one of 'none' (float32, the default), 'bf16' "
            "(bfloat16 autocast, CPU or GPU) or 'fp16' (float16 autocast with gradient scaling, GPU only); e.g. "
            "--amp bf16, or leave it out for float32."
        )
    return key


def check_amp_device(dtype, device) -> None:
    """Refuses an autocast ``dtype`` that ``device`` cannot run: float16 on a CPU (use bfloat16 there), bfloat16 on a
    GPU without it (use float16 there)."""
    import torch

    device = torch.device(device) if device is not None else None
    if dtype is None or device is None:
        return
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError(
            f"--amp fp16 (float16 autocast) was asked for on device {device}, but float16 mixed precision is for GPUs: "
            "use --amp bf16 on CPU or run on a GPU."
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"--amp bf16 (bfloat16 autocast) was asked for on {torch.cuda.get_device_name(device)} ({device}), "
                "which does not support bfloat16: use --amp fp16 on this GPU, or --amp none."
            )


def amp_settings(amp="none", device=None) -> dict:
    """The ``amp`` and ``amp_kwargs`` arguments of MONAI's engines (``SupervisedTrainer``, ``SupervisedEvaluator``)
    and of :class:`~medad_monai.engine.evaluator.AnomalyEvaluator` for the bundles' ``--amp`` switch.

    ``"none"`` (default): ``{"amp": False, "amp_kwargs": {}}``, i.e. float32 as before. ``"bf16"`` / ``"fp16"``:
    ``{"amp": True, "amp_kwargs": {"dtype": torch.bfloat16 / torch.float16}}``. MONAI passes ``amp_kwargs`` to
    ``torch.autocast("cuda", ...)`` and, when ``amp`` is on, makes the trainer step through a ``GradScaler`` (needed
    by float16, harmless with bfloat16); both are CUDA-only in MONAI 1.6, so the train/validation inferer
    (:func:`amp_inferer`) autocasts the network's forward on the input's device as well, which makes ``bf16`` work on
    CPUs too. :class:`~medad_monai.engine.evaluator.AnomalyEvaluator` autocasts on the batch's device itself.

    Raises:
        ValueError: ``amp`` is not one of ``"none"``, ``"bf16"``, ``"fp16"``; ``fp16`` on a CPU device; ``bf16`` on a
            GPU without bfloat16.
    """
    import torch

    key = _amp_key(amp)
    if AMP_CHOICES[key] is None:
        return {"amp": False, "amp_kwargs": {}}
    dtype = getattr(torch, AMP_CHOICES[key])
    check_amp_device(dtype, device)
    if device is not None and torch.device(device).type != "cuda":
        _quiet_monai_cuda_amp(key, device)
    return {"amp": True, "amp_kwargs": {"dtype": dtype}}


def _quiet_monai_cuda_amp(key: str, device) -> None:
    """Off CUDA, MONAI's trainer/evaluator still enter ``torch.autocast("cuda")`` and make a CUDA ``GradScaler``,
    and torch warns that it disables both, which reads as if ``--amp`` were off; the autocast that does happen
    there is :class:`~medad_monai.engine.evaluator.AmpInferer`'s and
    :class:`~medad_monai.engine.evaluator.AnomalyEvaluator`'s. Only those two messages are silenced."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=r"CUDA is not available or torch_xla is imported\. Disabling autocast")
    warnings.filterwarnings("ignore", message=r"torch\.cuda\.amp\.GradScaler is enabled, but CUDA is not available")
    note = (key, str(device))
    if note not in _AMP_NOTED:  # once per process: amp_settings is called for each engine and inferer
        _AMP_NOTED.add(note)
        logger.info("--amp %s on %s: the networks run under torch.autocast('%s'); MONAI's CUDA autocast and gradient "
                    "scaler are not used here.", key, device, torch.device(device).type)


_AMP_NOTED: set = set()


def amp_inferer(amp="none", device=None):
    """The inferer of the training and validation engines: MONAI's ``SimpleInferer`` with ``--amp none`` (unchanged),
    else :class:`~medad_monai.engine.evaluator.AmpInferer`, which runs the network under ``torch.autocast`` on the
    input's device and returns float32 outputs, so that losses and validation criteria compute in float32."""
    from monai.inferers import SimpleInferer

    settings = amp_settings(amp, device)
    if not settings["amp"]:
        return SimpleInferer()
    from medad_monai.engine.evaluator import AmpInferer

    return AmpInferer(dtype=settings["amp_kwargs"]["dtype"])


def set_cudnn_benchmark(enabled=False) -> bool:
    """Sets ``torch.backends.cudnn.benchmark`` (``--cudnn_benchmark``; no effect on CPU). Called in the configs'
    ``initialize`` after ``set_determinism``, which turns it off. On: cuDNN times its convolution algorithms for each
    new input shape and keeps the fastest, which speeds up fixed-size training but may pick a different algorithm in
    another run, so results are no longer bit-for-bit repeatable across runs."""
    import torch

    if isinstance(enabled, str) and enabled.strip().lower() in ("true", "false", "1", "0"):
        enabled = enabled.strip().lower() in ("true", "1")
    if not isinstance(enabled, (bool, int)) or isinstance(enabled, int) and enabled not in (0, 1):
        raise ValueError(f"--cudnn_benchmark must be true or false, got {enabled!r}.")
    torch.backends.cudnn.benchmark = bool(enabled)
    return bool(enabled)
