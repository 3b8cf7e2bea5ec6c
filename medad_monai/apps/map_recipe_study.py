"""The development study behind the demo's anomaly map: which map recipe finds lesions on real radiographs, chosen
without looking at any test split.

A map recipe is how :class:`~medad_monai.networks.AnomalyMapNet` turns a reconstruction into a map: the residual
(``abs``: smooth ``|x - x_rec|``; ``signed``: smooth ``x - x_rec``, then its magnitude; ``ssim``: ``1 - SSIM`` in a
Gaussian window of that sigma), the Gaussian ``map_sigma``,
and the healthy normalisation (``none``, ``healthy``: per-pixel z-value against healthy maps, or
``healthy_lungs``: the same inside the lung fields of the healthy images only); the image score
then aggregates the map (``score_methods``: max, top-1 % mean, mean). The study scores every recipe on one of two
**development sets**, neither of which shares a child with any test section:

- ``development="real"``: the prepared source's labelled ``development`` section (Kermany: 60 healthy children and
  50 with pneumonia from the source's test folder whom the test section did not draw;
  :mod:`medad_monai.data.sources.kermany`),
  with the healthy statistics fitted on the whole ``validation`` section, as the calibration does. Real
  abnormalities: the yardstick for the pneumonia task.
- ``development="lesions"`` (session 5's study): built from the real *validation* radiographs; the first ``n_fit``
  healthy validation images (sorted by file name) fit the healthy statistics, as a calibration would; each of the
  others is used twice, as in the lesion test task (:mod:`medad_monai.data.sources.lesions`): once with its own
  random acquisition (pose and exposure) as a normal image, once with one synthetic lesion (opacity, nodule, device
  or lucency, three sizes) and another acquisition as an abnormal one; a different seed from the test task.

Every recipe's AUROC is also given as a difference from the demo's recipe (the bundles' ``configs/demo.json``) with
a paired bootstrap interval per model (the same resampled development images for both): on the real section (110
images) the interval is about ±0.02–0.05 for a change of score and ±0.05–0.14 for a change of map, so small
differences do not select.

``memmc_inference`` adds MemMC-MAE rows with other inference masks (``K:ratio``: ``K`` complementary masks at that
masking ratio, the same trained weights), reported beside the others but left out of the mean that selects a recipe.

Trained checkpoints come from a demo run on the real benchmark (``python -m medad_monai demo --dataset_dir
data/real``), the mean-image and PCA baselines are fitted on the training images. The recipe with the highest mean
development AUROC over all models (ties: the smaller sigma) became the demo configs' default; the test splits were
evaluated once, afterwards (README, "Quality on real radiographs")::

    python -m medad_monai map_recipe_study --runs_dir runs/real_demo --output_dir runs/map_recipe_study
    python -m medad_monai map_recipe_study --runs_dir runs/real_demo2 --development real \
        --score_methods max,topk,mean --memmc_inference 2:0.5,4:0.25 --output_dir runs/map_recipe_study_real
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RECIPES", "build_development_set", "real_development_set", "map_recipe_study"]

#: ``(map_residual, map_sigma, map_normalization)`` of every recipe compared.
RECIPES: tuple[tuple[str, float, str], ...] = (
    ("abs", 1.0, "none"),
    ("abs", 1.0, "healthy"),
    ("signed", 1.0, "none"),
    ("signed", 2.0, "none"),
    ("signed", 3.0, "none"),
    ("signed", 1.0, "healthy"),
    ("signed", 2.0, "healthy"),
    ("signed", 3.0, "healthy"),
    ("signed", 1.0, "healthy_lungs"),
    ("signed", 2.0, "healthy_lungs"),
    ("signed", 3.0, "healthy_lungs"),
    ("signed", 4.0, "healthy_lungs"),
    ("signed", 6.0, "healthy_lungs"),
    ("signed", 8.0, "healthy_lungs"),
    ("ssim", 1.5, "none"),
    ("ssim", 1.5, "healthy"),
    ("ssim", 1.0, "healthy_lungs"),
    ("ssim", 1.5, "healthy_lungs"),
    ("ssim", 2.0, "healthy_lungs"),
)


def _select_recipes(recipes: str | Sequence[str] | None) -> tuple[tuple[str, float, str], ...]:
    """:data:`RECIPES`, or the ones named ``residual:sigma:normalization`` (comma-separated or a list)."""
    if not recipes:
        return RECIPES
    names = [r.strip() for r in recipes.split(",")] if isinstance(recipes, str) else [str(r) for r in recipes]
    known = {f"{r}:{s:g}:{n}": (r, s, n) for r, s, n in RECIPES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"recipes: {unknown} are not among the study's recipes {sorted(known)}.")
    return tuple(known[n] for n in names)


def build_development_set(source_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 7, n_fit: int = 50) -> dict:
    """Writes the development set (PNGs, masks) from a prepared source's healthy ``validation`` images.

    Returns:
        ``{"fit": [items], "dev": [items]}``; dev items carry ``label``, ``lesion`` and, for lesions, ``mask``.
    """
    from PIL import Image

    from medad_monai.data.sources import lesions, read_manifest, write_png_gray8

    source, out = Path(source_dir), Path(out_dir)
    rows = sorted(
        (r for r in read_manifest(source / "manifest.csv") if r["section"] == "validation" and r["label"] == "0"),
        key=lambda r: r["file"],
    )
    if len(rows) < n_fit + 4:
        raise ValueError(f"{source} has {len(rows)} healthy validation images; the study needs at least {n_fit + 4}.")
    items: dict[str, list[dict[str, Any]]] = {"fit": [{"image": str(source / r["file"]), "label": 0} for r in rows[:n_fit]]}
    items["dev"] = []
    for i, r in enumerate(rows[n_fit:]):
        img = np.asarray(Image.open(source / r["file"]).convert("L"), dtype=np.float64) / 255.0
        stem = Path(r["file"]).stem
        normal, _, _ = lesions.acquisition_jitter(img, None, np.random.default_rng([seed, 1, i]))
        write_png_gray8(out / "normal" / f"{stem}.png", np.round(normal * 255).astype(np.uint8))
        items["dev"].append({"image": str(out / "normal" / f"{stem}.png"), "label": 0, "lesion": "none"})
        kinds = lesions.INSERTED_LESION_KINDS
        kind, size = kinds[i % len(kinds)], lesions.LESION_SIZES[(i // len(kinds)) % len(lesions.LESION_SIZES)]
        rng = np.random.default_rng([seed, 2, i])
        drawn, mask, _ = lesions.insert_lesion(img, kind, size, rng)
        abnormal, mask, _ = lesions.acquisition_jitter(drawn, mask, rng)
        write_png_gray8(out / "lesion" / f"{stem}.png", np.round(abnormal * 255).astype(np.uint8))
        write_png_gray8(out / "masks" / f"{stem}.png", mask.astype(np.uint8) * 255)
        items["dev"].append(
            {"image": str(out / "lesion" / f"{stem}.png"), "label": 1, "lesion": kind, "mask": str(out / "masks" / f"{stem}.png")}
        )
    return items


def real_development_set(source_dir: str | os.PathLike, section: str = "development") -> dict:
    """``{"fit": [...], "dev": [...]}`` from a prepared source's ``datalist.json``: its healthy ``validation`` items
    (what the calibration fits on) and its labelled ``section``.

    Raises:
        ValueError: the datalist has no such section, or the section lacks healthy or abnormal items (a folder
            prepared before the development section existed: rebuild it with its prepare command).
    """
    source = Path(source_dir)
    with open(source / "datalist.json") as f:
        datalist = json.load(f)
    dev = datalist.get(section)
    if not isinstance(dev, list) or {int(i.get("label", -1)) for i in dev} != {0, 1}:
        have = sorted(k for k, v in datalist.items() if isinstance(v, list))
        raise ValueError(
            f"{source / 'datalist.json'} has no labelled section {section!r} with healthy and abnormal items "
            f"(sections: {have}); rebuild the folder with its prepare command (e.g. python -m medad_monai "
            "prepare_kermany, which writes 'development')."
        )
    fit = [{"image": str(source / i["image"]), "label": 0} for i in datalist["validation"]]
    return {
        "fit": fit,
        "dev": [{**i, "image": str(source / i["image"]), "lesion": i.get("lesion", "abnormal")} for i in dev],
    }


def _images(items: Sequence[dict], spatial_size: Sequence[int]):
    import torch
    from monai.data import DataLoader, Dataset

    from medad_monai.data import anomaly_transforms

    tf = anomaly_transforms(spatial_size=spatial_size, channels=1, with_mask=False)
    return torch.cat([b["image"] for b in DataLoader(Dataset(list(items), tf), batch_size=50, num_workers=0)])


def _memmc_variants(spec: str | Sequence[str]) -> list[tuple[int, float]]:
    """``"2:0.5,4:0.25"`` -> ``[(2, 0.5), (4, 0.25)]`` (inference passes ``K`` and their masking ratio)."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p) for p in spec]
    out = []
    for part in filter(None, parts):
        try:
            k, r = part.split(":")
            out.append((int(k), float(r)))
        except ValueError:
            raise ValueError(f"memmc_inference: expected K:ratio items such as '2:0.5', got {part!r}.") from None
    return out


def _reconstruction_models(
    runs_dir: str, methods: Sequence[str], training: Any, memmc_inference: Sequence[tuple[int, float]] = ()
) -> tuple[dict, set]:
    """``(name -> model, names of the MemMC-MAE inference variants)`` for the methods' checkpoints (bundle demo
    configs), their variants and the two baselines."""
    from monai.bundle import ConfigParser

    from medad_monai import networks
    from medad_monai.apps.demo import BASELINES, METHODS, bundles_dir
    from medad_monai.evaluation.predictor import load_weights

    models: dict[str, Any] = {}
    variants: set[str] = set()
    for name in methods:
        bundle, extra = METHODS[name]
        weights = os.path.join(runs_dir, name, "models", "model.pt")
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"No {weights}: train the methods first, e.g. `python -m medad_monai demo --dataset_dir data/real "
                f"--output_dir {runs_dir} --methods {','.join(methods)}`."
            )
        configs = os.path.join(bundles_dir(), bundle, "configs")
        for k, ratio in [(None, None)] + (list(memmc_inference) if bundle == "memmc_mae" else []):
            parser = ConfigParser()
            parser.read_config([os.path.join(configs, f) for f in ("train.json", "demo.json", *extra)])
            parser["bundle_root"] = os.path.join(bundles_dir(), bundle)
            label = name
            if k is not None:
                parser["num_inference_masks"] = k
                parser["model_def"]["inference_masking_ratio"] = ratio
                label = f"{name} K={k} ratio={ratio:g}"
                variants.add(label)
            models[label] = load_weights(parser.get_parsed_content("network_def"), weights).eval()
    for name, (cls_name, kwargs) in BASELINES.items():
        models[name] = getattr(networks, cls_name)(**kwargs).fit([training])
    return models, variants


def _recipe_name(residual: str, sigma: float, normalization: str, score_method: str) -> str:
    """A recipe's name in the tables and the JSON, e.g. ``"signed sigma=2 healthy_lungs | max"``."""
    return f"{residual} sigma={float(sigma):g} {normalization} | {score_method}"


def _reference_recipe(names: list[str], scores_by: list[str]) -> str | None:
    """The demo's map recipe (``configs/demo.json``) with the first score method, or None when it was not scored (or
    is the only one)."""
    from medad_monai.apps.demo import demo_settings

    demo = demo_settings("morphaeus")
    name = _recipe_name(demo["map_residual"], demo["map_sigma"], demo["map_normalization"], scores_by[0])
    return name if name in names and len(names) > 1 else None


def _paired_table(paired: dict, reference: str | None, models: Sequence[str], n_resamples: int) -> str:
    """Markdown: each recipe's AUROC minus the reference's per model, with its paired interval; ``*`` marks a
    difference beyond it."""
    if not reference:
        return ""
    recipes = list(next(iter(paired.values())))

    def cell(d: dict) -> str:
        return f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" + ("*" if d["beyond"] else "")

    return (
        f"\nAUROC minus the reference recipe's ({reference}), paired bootstrap of the development images "
        f"({n_resamples} resamples, 95 %); * = beyond the interval.\n\n| recipe | score | " + " | ".join(models)
        + " |\n|---|---|" + "---|" * len(models) + "\n"
        + "".join(
            f"| {r.split(' | ')[0]} | {r.split(' | ')[1]} | " + " | ".join(cell(paired[m][r]) for m in models) + " |\n"
            for r in recipes
        )
    )


def map_recipe_study(
    runs_dir: str = "runs/real_demo",
    source_dir: str | None = None,
    output_dir: str = "runs/map_recipe_study",
    methods: str | Sequence[str] = ("morphaeus", "morphaeus_ablation_ae", "memmc_mae"),
    seed: int = 7,
    n_fit: int = 50,
    development: str = "lesions",
    score_methods: str | Sequence[str] = "max",
    memmc_inference: str | Sequence[str] = "",
    recipes: str | Sequence[str] | None = None,
    n_resamples: int = 1000,
) -> dict:
    """Scores every recipe of :data:`RECIPES` (or ``recipes``; times every score method) for every model on a
    development set; prints and writes the table.

    Args:
        runs_dir: a demo output folder with ``<method>/models/model.pt`` trained on the real benchmark.
        source_dir: the prepared Kermany folder (default ``data/real/kermany``).
        output_dir: where the development images and ``map_recipe_study.json`` / ``.md`` go.
        methods: demo methods to include (comma-separated or a list).
        seed: seed of the lesions and acquisitions (the test task uses 0); ``development="lesions"`` only.
        n_fit: healthy validation images that fit the healthy statistics; the rest make the development set;
            ``development="lesions"`` only.
        development: ``"lesions"`` (synthetic lesions on validation radiographs) or ``"real"`` (the source's
            labelled ``development`` section; healthy statistics from the whole ``validation`` section).
        score_methods: image scores compared (comma-separated or a list of
            :data:`~medad_monai.evaluation.scoring.SCORE_METHODS`; ``topk`` = mean of the top 1 %).
        memmc_inference: extra MemMC-MAE inference masks, ``"K:ratio,..."`` (e.g. ``"2:0.5,4:0.25"``).
        recipes: only these recipes of :data:`RECIPES`, ``"residual:sigma:normalization,..."`` (e.g.
            ``"signed:2:healthy_lungs,ssim:1.5:healthy_lungs"``); None = all.
        n_resamples: bootstrap resamples of the development images for the paired interval of each recipe's AUROC
            minus the reference's (the demo's recipe with the first score method, when it is among the recipes),
            per model: a development section of about a hundred images resolves only large differences,
            and the table says which ones.

    Returns:
        ``{"recipes": [...], "auroc": {model: {recipe: value}}, "by_kind": ..., "selected": recipe, "reference":
        recipe or None, "paired": {model: {recipe: paired_bootstrap_difference(...)}}}``; a recipe's name ends with
        `` | <score method>``.
    """
    import torch

    from medad_monai.data.sources import real_data_dir
    from medad_monai.apps.demo import demo_spatial_size
    from medad_monai.evaluation.metrics import image_auroc
    from medad_monai.networks import AnomalyMapNet, fit_map_normalization
    from medad_monai.evaluation.scoring import SCORE_METHODS, aggregate_score
    from medad_monai.io.report import paired_bootstrap_difference

    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    scores_by = [m.strip() for m in score_methods.split(",")] if isinstance(score_methods, str) else list(score_methods)
    if not scores_by or any(m not in SCORE_METHODS for m in scores_by):
        raise ValueError(f"score_methods must be some of {SCORE_METHODS}, got {scores_by}.")
    source = Path(source_dir) if source_dir else real_data_dir() / "kermany"
    if development == "lesions":
        items = build_development_set(source, Path(output_dir) / "development_set", seed=seed, n_fit=n_fit)
        described = (
            f"{sum(i['label'] == 0 for i in items['dev'])} normal + {sum(i['label'] == 1 for i in items['dev'])} "
            f"lesion images from real healthy validation radiographs (seed {seed})"
        )
    elif development == "real":
        items = real_development_set(source)
        described = (
            f"the labelled development section of {source} ({sum(i['label'] == 0 for i in items['dev'])} healthy, "
            f"{sum(i['label'] == 1 for i in items['dev'])} abnormal; no test image)"
        )
    else:
        raise ValueError(f"development must be 'lesions' or 'real', got {development!r}.")
    size = demo_spatial_size()
    with open(source / "datalist.json") as f:
        training_items = [{"image": str(source / it["image"])} for it in json.load(f)["training"]]
    fit_x, dev_x, train_x = _images(items["fit"], size), _images(items["dev"], size), _images(training_items, size)
    labels = torch.tensor([it["label"] for it in items["dev"]])
    kinds = np.array([it["lesion"] for it in items["dev"]])
    models, variants = _reconstruction_models(runs_dir, methods, train_x, _memmc_variants(memmc_inference))
    chosen = _select_recipes(recipes)
    sigma_of = {_recipe_name(r, s, n, m): s for r, s, n in chosen for m in scores_by}
    names = list(sigma_of)
    kind_masks = {k: torch.from_numpy((kinds == k) | (kinds == "none")) for k in sorted(set(kinds) - {"none"})}
    auroc: dict[str, dict[str, float]] = {m: {} for m in models}
    scored: dict[str, dict[str, np.ndarray]] = {m: {} for m in models}
    by_kind: dict[str, dict[str, dict[str, float]]] = {m: {} for m in models}
    torch.manual_seed(0)
    for model_name, model in models.items():
        for residual, sigma, normalization in chosen:
            net = AnomalyMapNet(model, smooth_sigma=sigma, map_residual=residual, map_normalization=normalization)
            net.eval()
            fit_map_normalization(net, fit_x.split(25), leave_one_out=False)
            with torch.no_grad():
                maps = torch.cat([net(x) for x in dev_x.split(25)])
            for method in scores_by:
                recipe = _recipe_name(residual, sigma, normalization, method)
                scores = aggregate_score(maps, method)
                scored[model_name][recipe] = scores.numpy()
                auroc[model_name][recipe] = float(image_auroc(scores, labels))
                by_kind[model_name][recipe] = {
                    k: float(image_auroc(scores[m], labels[m])) for k, m in kind_masks.items()
                }
    primary = [m for m in models if m not in variants]
    mean = {r: float(np.mean([auroc[m][r] for m in primary])) for r in names}
    selected = max(names, key=lambda r: (round(mean[r], 3), -sigma_of[r]))
    reference = _reference_recipe(names, scores_by)
    paired = {
        m: {r: paired_bootstrap_difference(scored[m][r], scored[m][reference], labels.numpy(), n_resamples=n_resamples)
            for r in names if r != reference}
        for m in models
    } if reference else {}
    header = "| recipe | score | " + " | ".join(models) + " | mean |\n|---|---|" + "---|" * (len(models) + 1) + "\n"
    rows = "".join(
        f"| {r.split(' | ')[0]}{' (selected)' if r == selected else ''} | {r.split(' | ')[1]} | "
        + " | ".join(f"{auroc[m][r]:.3f}" for m in models) + f" | {mean[r]:.3f} |\n"
        for r in names
    )
    text = (
        f"Development set: {described}; healthy statistics fitted on {len(items['fit'])} healthy validation images; "
        f"image AUROC, {size[0]}x{size[1]}; mean over {', '.join(primary)}"
        + (" (MemMC-MAE inference variants not in the mean)" if variants else "")
        + f".\n\n{header}{rows}"
        + _paired_table(paired, reference, models, n_resamples)
    )
    print(text)
    result = {
        "recipes": names, "auroc": auroc, "mean": mean, "by_kind": by_kind, "selected": selected, "seed": seed,
        "development": development, "score_methods": scores_by, "variants": sorted(variants),
        "reference": reference, "paired": paired,
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "map_recipe_study.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(output_dir, "map_recipe_study.md"), "w") as f:
        f.write(text)
    return result
