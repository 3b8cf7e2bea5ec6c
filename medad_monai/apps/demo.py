"""End-to-end demo on the embedded chest-radiograph phantoms.

Runs exactly the commands a user would type (``python -m monai.bundle run ...`` in subprocesses) for each bundle
and its ablation: train briefly, calibrate on healthy validation images, evaluate on the labelled test list, infer on
a folder; then fits the trivial mean-image and PCA baselines on the same data and prints every method's metrics side
by side, and whether each method beats its ablations and the baselines beyond a paired bootstrap interval.

``--train False`` keeps the models already in ``<output_dir>/<method>/models`` and only re-calibrates (the bundle's
``recalibrate`` run), evaluates and infers: how to try another image score or map on trained models.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence

from medad_monai.apps.bundle_cli import bundle_command, run_logged

__all__ = ["run_demo", "bundles_dir", "METHODS", "DEFAULT_METHODS"]

# name -> (bundle, extra override configs); configs/demo.json of the bundle sizes the run for a 2-core CPU.
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "morphaeus": ("morphaeus", ()),
    "morphaeus_ablation_ae": ("morphaeus", ("ablation_ae.json",)),
    "memmc_mae": ("memmc_mae", ()),
    "memmc_mae_ablation_mae": ("memmc_mae", ("ablation_mae.json",)),
    "memmc_mae_ablation_memory_only": ("memmc_mae", ("ablation_memory_only.json",)),
    "memmc_mae_ablation_multilevel_only": ("memmc_mae", ("ablation_multilevel_only.json",)),
}
# The default demo (about 14 minutes on 2 idle CPU cores): each bundle, MorphAEus' main comparison and the baseline.
DEFAULT_METHODS = ("morphaeus", "morphaeus_ablation_ae", "memmc_mae")

REPORT_KEYS = (
    "image_auroc",
    "image_ap",
    "image_fpr_at_95tpr",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_best_dice",
    "pixel_dice_at_threshold",
)


def bundles_dir() -> str:
    """The repository's ``bundles/`` folder (the demo runs from a clone of the repository)."""
    env = os.environ.get("MEDAD_BUNDLES_DIR")
    if env:
        return os.path.abspath(env)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    path = os.path.join(here, "bundles")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Bundles folder not found at {path}; run the demo from a clone of the repository "
            "(pip install -e .) or set MEDAD_BUNDLES_DIR."
        )
    return path


def run_method(
    name: str,
    output_dir: str,
    dataset_dir: str,
    max_epochs: int | None = None,
    score_method: str | None = None,
    map_sigma: float | None = None,
    map_residual: str | None = None,
    map_normalization: str | None = None,
    train: bool = True,
) -> dict:
    """Train + calibrate, evaluate and infer one method through the bundle CLI; returns its metrics and times.

    ``score_method`` / ``map_sigma`` / ``map_residual`` / ``map_normalization`` override the demo configs' image
    score and map recipe in every command (calibration, evaluation and inference always agree). ``train=False``
    re-calibrates and evaluates the model already in ``<output_dir>/<name>/models`` (``run recalibrate``)."""
    bundle, extra = METHODS[name]
    root = os.path.join(bundles_dir(), bundle)
    work = os.path.join(output_dir, name)
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "log.txt")
    common = {"dataset_dir": dataset_dir, "ckpt_dir": os.path.join(work, "models"), "progress_bar": False}
    if score_method is not None:
        common["score_method"] = score_method
    if map_sigma is not None:
        common["map_sigma"] = float(map_sigma)
    if map_residual is not None:
        common["map_residual"] = map_residual
    if map_normalization is not None:
        common["map_normalization"] = map_normalization
    train_cfg = ["train.json", "demo.json", *extra]
    times = {}
    ov = dict(common, output_dir=os.path.join(work, "eval"))
    if train:
        print(f"\n== {name}: train + calibrate", flush=True)
        if max_epochs:
            ov["max_epochs"] = max_epochs
        times["train_s"] = run_logged(bundle_command(root, train_cfg, **ov), log)
        print(f"== {name}: evaluate", flush=True)
        times["evaluate_s"] = run_logged(bundle_command(root, [*train_cfg, "evaluate.json"], **ov), log)
    else:
        weights = os.path.join(common["ckpt_dir"], "model.pt")
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"--train False needs a trained model at {weights}; run the demo with this --output_dir and "
                f"--methods {name} without --train False first."
            )
        print(f"\n== {name}: re-calibrate the trained model, evaluate", flush=True)
        times["evaluate_s"] = run_logged(bundle_command(root, [*train_cfg, "evaluate.json"], "recalibrate", **ov), log)
    print(f"== {name}: inference on a folder", flush=True)
    infer_cfg = ["inference.json", "demo.json", *extra]
    iov = {**common, "output_dir": os.path.join(work, "inference")}
    times["inference_s"] = run_logged(bundle_command(root, infer_cfg, **iov), log)
    with open(os.path.join(work, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    scores_csv = os.path.join(work, "eval", "test_results", "scores.csv")
    datalist = os.path.join(dataset_dir, "datalist.json")
    if os.path.isfile(scores_csv) and os.path.isfile(datalist):
        metrics["image_auroc_by_lesion"] = auroc_by_lesion(scores_csv, datalist)
    report = _report(os.path.join(work, "eval"), dataset_dir, title=f"{name} (demo)")
    return {**metrics, **times, **({"report": report} if report else {})}


def _report(eval_dir: str, dataset_dir: str, title: str) -> str | None:
    """The readable report of one evaluation (:func:`medad_monai.io.report.evaluation_report`); its path, or ``None``
    with the reason printed when it cannot be drawn (the metrics stand without it)."""
    from medad_monai.io.report import evaluation_report

    try:
        path = evaluation_report(eval_dir, dataset_dir=dataset_dir, title=title)["output"]
    except (OSError, ValueError, KeyError) as e:
        print(f"  (no report for {eval_dir}: {type(e).__name__}: {e})", flush=True)
        return None
    return str(path)


def demo_settings(bundle: str = "morphaeus") -> dict:
    """The bundle's ``configs/demo.json`` (input size, image score, map smoothing of the demo)."""
    with open(os.path.join(bundles_dir(), bundle, "configs", "demo.json")) as f:
        return json.load(f)


def demo_scoring(score_method: str | None = None, map_sigma: float | None = None) -> tuple[str, float]:
    """``(score_method, map_sigma)``: the given ones, else the demo configs'."""
    settings = demo_settings()
    score = score_method or settings.get("score_method", "mean")
    return score, float(settings.get("map_sigma", 0.0) if map_sigma is None else map_sigma)


def demo_map_recipe(map_residual: str | None = None, map_normalization: str | None = None) -> tuple[str, str]:
    """``(map_residual, map_normalization)``: the given ones, else the demo configs'."""
    settings = demo_settings()
    return (
        map_residual or settings.get("map_residual", "abs"),
        map_normalization or settings.get("map_normalization", "none"),
    )


def demo_spatial_size(bundle: str = "morphaeus") -> list[int]:
    """The input size the demo runs at (from the bundle's ``configs/demo.json``)."""
    return list(demo_settings(bundle)["spatial_size"])


#: the references the demo reports beside the methods: ``name -> (class name in medad_monai.networks, kwargs)``.
BASELINES = {
    "mean_image_baseline": ("MeanImageBaseline", {}),
    "pca_baseline": ("PCABaseline", {"variance": 0.95}),
}


def run_baseline(
    output_dir: str,
    dataset_dir: str,
    spatial_size: Sequence[int] | None = None,
    score_method: str | None = None,
    map_sigma: float | None = None,
    name: str = "mean_image_baseline",
    map_residual: str | None = None,
    map_normalization: str | None = None,
) -> dict:
    """A reference of :data:`BASELINES`, calibrated and evaluated like the methods (same image score and map
    smoothing as the demo configs unless given): ``mean_image_baseline`` (the trivial one, |x - mean healthy
    image|) or ``pca_baseline`` (classical, non-deep: residual of the healthy principal subspace, 95 % of the
    training variance). The map recipe (residual, smoothing, healthy normalisation fitted on the validation list,
    leave-one-out for its thresholds) is the demo configs' unless given. Results in
    ``<output_dir>/<name>/metrics.json``."""
    import torch
    from monai.data import DataLoader, Dataset

    from medad_monai.engine.bundle_utils import datalist_items, write_json
    from medad_monai.evaluation.calibration import CalibrationAccumulator
    from medad_monai.data import anomaly_transforms
    from medad_monai.evaluation.metrics import AnomalyMetricAccumulator
    from medad_monai.networks import AnomalyMapNet, fit_map_normalization
    from medad_monai.evaluation.predictor import AnomalyPredictor, record_in_calibration
    from medad_monai import networks
    from medad_monai.evaluation.scoring import aggregate_score

    t0 = time.perf_counter()
    score_method, map_sigma = demo_scoring(score_method, map_sigma)
    map_residual, map_normalization = demo_map_recipe(map_residual, map_normalization)
    tf = anomaly_transforms(spatial_size=spatial_size or demo_spatial_size(), channels=1)

    def loader(section):
        return DataLoader(Dataset(datalist_items(None, dataset_dir, section), tf), batch_size=32, num_workers=0)

    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; one of {sorted(BASELINES)}.")
    cls_name, kwargs = BASELINES[name]
    base = getattr(networks, cls_name)(**kwargs)
    base.fit(b["image"] for b in loader("training"))
    net = AnomalyMapNet(
        base, smooth_sigma=map_sigma, map_residual=map_residual, map_normalization=map_normalization
    ).eval()
    fit_map_normalization(net, (b["image"] for b in loader("validation")), leave_one_out=True)
    cal = CalibrationAccumulator(score_method=score_method)
    with torch.no_grad():
        for b in loader("validation"):
            m = net(b["image"])
            cal.update(m, aggregate_score(m, score_method))
            shape = b["image"].shape[1:]
    # then the test images go through the package's one predictor, as the methods' bundle evaluation does
    predictor = AnomalyPredictor(net, record_in_calibration(cal.compute(), net, shape), score_method, what=name)
    acc = AnomalyMetricAccumulator(calibration=predictor.calibration)
    test_scores: list[float] = []
    for b in loader("test"):
        out = predictor.predict(b["image"])[1]
        test_scores += out.pred_score.tolist()
        acc.update(
            scores=out.pred_score,
            labels=b["label"].view(-1),
            maps=out.anomaly_map,
            masks=b["mask"],
            has_mask=b["has_mask"].view(-1).bool(),
        )
    metrics = acc.compute()
    test_items = datalist_items(None, dataset_dir, "test")  # the loader keeps list order
    by_kind = _auroc_by_kind(test_items, test_scores)
    if by_kind:
        metrics["image_auroc_by_lesion"] = by_kind
    metrics["train_s"] = time.perf_counter() - t0
    write_json(metrics, os.path.join(output_dir, name, "metrics.json"))
    with open(os.path.join(output_dir, name, "scores.csv"), "w", newline="") as f:  # per image, as the methods' runs
        w = csv.writer(f)
        w.writerow(["image", "pred_score", "label"])
        w.writerows([it["image"], score, it["label"]] for it, score in zip(test_items, test_scores))
    return metrics


def _auroc_by_kind(items: Sequence[dict], scores: Sequence[float]) -> dict[str, float]:
    from medad_monai.evaluation.metrics import image_auroc

    by_kind: dict[str, list[float]] = {}
    normal: list[float] = []
    for item, score in zip(items, scores):
        if score is None:
            continue
        if int(item.get("label", 0)) == 0:
            normal.append(score)
        elif item.get("lesion"):
            by_kind.setdefault(str(item["lesion"]), []).append(score)
    if not normal:
        return {}
    return {k: image_auroc(normal + v, [0] * len(normal) + [1] * len(v)) for k, v in sorted(by_kind.items())}


def auroc_by_lesion(scores_csv: str, datalist: str) -> dict[str, float]:
    """Image AUROC of each lesion kind against all normal test images, from an evaluation's ``scores.csv`` and the
    test items' ``lesion`` field (the phantoms record it; items without one are skipped)."""
    import csv

    from medad_monai.data import load_datalist

    with open(scores_csv) as f:
        scores = {os.path.normpath(r["image"]): float(r["pred_score"]) for r in csv.DictReader(f)}
    items = load_datalist(datalist, "test", check_files=False)
    return _auroc_by_kind(items, [scores.get(os.path.normpath(it["image"])) for it in items])


def print_table(results: dict[str, dict], keys: Sequence[str] | None = None) -> str:
    """Prints (and returns) one aligned row per method: the report metrics and times, or the given ``keys``."""
    if keys is None:
        keys = [k for k in REPORT_KEYS if any(k in r for r in results.values())]
        time_keys = ["train_s", "evaluate_s", "inference_s"]
    else:
        keys, time_keys = list(keys), []
    cols = [*keys, *time_keys]
    widths = [max(len(k) + 2, 10) for k in cols]
    name_w = max([len("method")] + [len(n) for n in results]) + 2
    head = f"{'method':{name_w}s}" + "".join(f"{k:>{w}s}" for k, w in zip(cols, widths))
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        cells = []
        for k, w in zip(cols, widths):
            v = r.get(k)
            cells.append(f"{v:{w}.3f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}")
        lines.append(f"{name:{name_w}s}" + "".join(cells))
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    return table


def _comparisons(output_dir: str, dataset_dir: str, methods: Sequence[str], n_resamples: int) -> tuple[dict, list]:
    """Each method against its own ablations (those run) and the baselines, paired on the same test images
    (:func:`medad_monai.apps.compare.compare_results`); ``({method: comparisons}, table rows)``. A folder that
    cannot be read is reported and left out (the metrics stand without it)."""
    from medad_monai.apps.compare import compare_results, format_comparisons
    from medad_monai.io.report import load_evaluation

    def load(name: str, folder: str):
        try:
            return load_evaluation(folder, dataset_dir=dataset_dir)
        except (OSError, ValueError) as e:
            print(f"  (no comparison for {name}: {type(e).__name__}: {e})", flush=True)
            return None

    loaded = {m: load(m, os.path.join(output_dir, m, "eval")) for m in methods}
    loaded.update({b: load(b, os.path.join(output_dir, b)) for b in BASELINES})
    comparisons: dict[str, dict] = {}
    rows: list[str] = []
    for m in methods:
        refs = [a for a in methods if a.startswith(f"{m}_ablation")] + list(BASELINES)
        refs = {r: loaded[r] for r in refs if loaded.get(r) is not None}
        if loaded.get(m) is None or not refs:
            continue
        comparisons[m] = compare_results(loaded[m], refs, n_resamples)
        rows += format_comparisons(m, comparisons[m])
    return comparisons, rows


def run_demo(
    output_dir: str = "runs/demo",
    methods: str | Sequence[str] = DEFAULT_METHODS,
    max_epochs: int | None = None,
    dataset_dir: str | None = None,
    score_method: str | None = None,
    map_sigma: float | None = None,
    map_residual: str | None = None,
    map_normalization: str | None = None,
    train: bool = True,
    n_resamples: int = 1000,
) -> dict:
    """Runs the whole demo; returns ``{method: metrics}`` and writes ``<output_dir>/summary.json`` and ``.md``.

    Args:
        output_dir: where models, metrics, maps and overlays go.
        methods: subset of :data:`METHODS` (comma-separated string or list), or ``"all"`` for every ablation.
        max_epochs: override the demo's epoch count (e.g. 1 for a smoke run).
        dataset_dir: a datalist folder to use instead of the embedded phantoms.
        score_method: image score for every method and the baseline (``mean`` is the papers'; default: the demo
            configs', ``max``).
        map_sigma: Gaussian smoothing of every map in pixels (default: the demo configs', 2; 0 = none).
        map_residual: ``signed`` (default: the demo configs') smooths the signed residual before its magnitude,
            ``abs`` smooths the magnitude (the papers' map with ``map_sigma`` 0), ``ssim`` is ``1 - SSIM`` in a
            Gaussian window of sigma ``map_sigma``.
        map_normalization: ``healthy_lungs`` (default: the demo configs') scores each pixel against the healthy
            calibration maps there and only inside the lung fields of the healthy calibration images; ``healthy``
            everywhere; ``none`` is the papers' raw map.
        train: False keeps the trained models of an earlier run in ``output_dir`` and re-calibrates them with the
            settings given (``run recalibrate``), then evaluates and infers; the baselines are refitted (seconds).
        n_resamples: bootstrap resamples of the paired comparisons (each method against its ablations and the
            baselines, :mod:`medad_monai.apps.compare`).
    """
    from medad_monai.engine.bundle_utils import resolve_data

    if methods == "all":
        methods = list(METHODS)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}")
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    t0 = time.perf_counter()
    print("== demo data", flush=True)
    _, dataset_dir = resolve_data(None, dataset_dir)
    print(f"  dataset: {dataset_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)
    results: dict[str, dict] = {}
    for m in methods:
        results[m] = run_method(
            m, output_dir, dataset_dir, max_epochs, score_method, map_sigma, map_residual, map_normalization, train
        )
    print("\n== baselines (mean healthy image; PCA of healthy images)", flush=True)
    for name in BASELINES:
        results[name] = run_baseline(
            output_dir, dataset_dir, None, score_method, map_sigma, name, map_residual, map_normalization
        )
        report = _report(os.path.join(output_dir, name), dataset_dir, title=f"{name} (demo)")
        if report:
            results[name]["report"] = report
    score, sigma = demo_scoring(score_method, map_sigma)
    residual, normalization = demo_map_recipe(map_residual, map_normalization)
    recipe = (
        f"Image score: {score} of the anomaly map; maps: {residual} residual smoothed with sigma={sigma:g} px"
        + (", normalised per pixel against the healthy calibration maps" if normalization != "none" else "")
        + (", restricted to the lung fields of the healthy calibration images" if normalization == "healthy_lungs"
           else "")
        + "."
    )
    print(f"\n{recipe}", flush=True)
    table = print_table(results)
    kinds = sorted({k for r in results.values() for k in r.get("image_auroc_by_lesion", {})})
    if kinds:
        print("\nImage AUROC by lesion kind (each kind against all normal test images):", flush=True)
        table += "\n\n" + print_table(
            {n: r["image_auroc_by_lesion"] for n, r in results.items() if "image_auroc_by_lesion" in r}, keys=kinds
        )
    comparisons, rows = _comparisons(output_dir, dataset_dir, methods, n_resamples)
    if rows:
        paired = (
            f"Paired bootstrap differences of image AUROC ({n_resamples} resamples of the test images, 95 % "
            "interval): each method against its ablations and the baselines.\n\n"
            "| comparison | image AUROC difference [interval] | verdict |\n|---|---|---|\n" + "\n".join(rows) + "\n"
        )
        print("\n" + paired, flush=True)
    total = time.perf_counter() - t0
    print(f"\nTotal demo time: {total:.0f} s. Results under {output_dir}", flush=True)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump({"results": results, "comparisons": comparisons, "total_s": total}, f, indent=4)
    reports = "".join(
        f"- {n}: [{os.path.relpath(r['report'], output_dir)}]({os.path.relpath(r['report'], output_dir)})\n"
        for n, r in results.items() if r.get("report")
    )
    with open(os.path.join(output_dir, "summary.md"), "w") as f:
        f.write(f"{recipe}\n\n```\n{table}\n```\n")
        if rows:
            f.write(f"\n{paired}")
        if reports:
            f.write(f"\nReports (curves with confidence intervals, score histograms, best and worst cases):\n\n{reports}")
    return results
