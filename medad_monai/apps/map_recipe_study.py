"""The development study behind the demo's anomaly map: which map recipe finds lesions on real radiographs, chosen
without looking at any test split.

A map recipe is how :class:`~medad_monai.networks.AnomalyMapNet` turns a reconstruction into a map: the residual
(``abs``: smooth ``|x - x_rec|``; ``signed``: smooth ``x - x_rec``, then its magnitude), the Gaussian ``map_sigma``,
and the healthy normalisation (``none`` or ``healthy``: per-pixel z-value against healthy maps). The study scores
every recipe on a **development set** built from the real Kermany *validation* radiographs, which no test section
shares a child with:

- the first ``n_fit`` healthy validation images (sorted by file name) fit the healthy statistics, as a calibration
  would;
- each of the others is used twice, as in the lesion test task (:mod:`medad_monai.data.sources.lesions`): once with
  its own random acquisition (pose and exposure) as a normal image, once with one synthetic lesion (opacity, nodule,
  device or lucency, three sizes) and another acquisition as an abnormal one; a different seed from the test task.

Trained checkpoints come from a demo run on the real benchmark (``python -m medad_monai demo --dataset_dir
data/real``), the mean-image and PCA baselines are fitted on the training images. The recipe with the highest mean
development AUROC over all models (ties: the smaller sigma) became the demo configs' default; the test splits were
evaluated once, afterwards (README, "Quality on real radiographs")::

    python -m medad_monai map_recipe_study --runs_dir runs/real_demo --output_dir runs/map_recipe_study
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RECIPES", "build_development_set", "map_recipe_study"]

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
)


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


def _images(items: Sequence[dict], spatial_size: Sequence[int]):
    import torch
    from monai.data import DataLoader, Dataset

    from medad_monai.data import anomaly_transforms

    tf = anomaly_transforms(spatial_size=spatial_size, channels=1, with_mask=False)
    return torch.cat([b["image"] for b in DataLoader(Dataset(list(items), tf), batch_size=50, num_workers=0)])


def _reconstruction_models(runs_dir: str, methods: Sequence[str], training: Any) -> dict:
    """``name -> model`` for the methods' checkpoints (bundle demo configs) and the two baselines."""
    import torch
    from monai.bundle import ConfigParser

    from medad_monai.evaluation import scoring
    from medad_monai.apps.demo import BASELINES, METHODS, bundles_dir

    models: dict[str, Any] = {}
    for name in methods:
        bundle, extra = METHODS[name]
        configs = os.path.join(bundles_dir(), bundle, "configs")
        parser = ConfigParser()
        parser.read_config([os.path.join(configs, f) for f in ("train.json", "demo.json", *extra)])
        parser["bundle_root"] = os.path.join(bundles_dir(), bundle)
        net = parser.get_parsed_content("network_def")
        weights = os.path.join(runs_dir, name, "models", "model.pt")
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"No {weights}: train the methods first, e.g. `python -m medad_monai demo --dataset_dir data/real "
                f"--output_dir {runs_dir} --methods {','.join(methods)}`."
            )
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        models[name] = net.eval()
    for name, (cls_name, kwargs) in BASELINES.items():
        models[name] = getattr(scoring, cls_name)(**kwargs).fit([training])
    return models


def map_recipe_study(
    runs_dir: str = "runs/real_demo",
    source_dir: str | None = None,
    output_dir: str = "runs/map_recipe_study",
    methods: str | Sequence[str] = ("morphaeus", "morphaeus_ablation_ae", "memmc_mae"),
    seed: int = 7,
    n_fit: int = 50,
) -> dict:
    """Scores every recipe of :data:`RECIPES` for every model on the development set; prints and writes the table.

    Args:
        runs_dir: a demo output folder with ``<method>/models/model.pt`` trained on the real benchmark.
        source_dir: the prepared Kermany folder (default ``data/real/kermany``).
        output_dir: where the development images and ``map_recipe_study.json`` / ``.md`` go.
        methods: demo methods to include (comma-separated or a list).
        seed: seed of the lesions and acquisitions (the test task uses 0).
        n_fit: healthy validation images that fit the healthy statistics; the rest make the development set.

    Returns:
        ``{"recipes": [...], "auroc": {model: {recipe: value}}, "by_kind": ..., "selected": recipe}``.
    """
    import torch

    from medad_monai.data.sources import real_data_dir
    from medad_monai.apps.demo import demo_spatial_size
    from medad_monai.evaluation.metrics import image_auroc
    from medad_monai.networks import AnomalyMapNet, fit_map_normalization
    from medad_monai.evaluation.scoring import aggregate_score

    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    source = Path(source_dir) if source_dir else real_data_dir() / "kermany"
    items = build_development_set(source, Path(output_dir) / "development_set", seed=seed, n_fit=n_fit)
    size = demo_spatial_size()
    with open(source / "datalist.json") as f:
        training_items = [{"image": str(source / it["image"])} for it in json.load(f)["training"]]
    fit_x, dev_x, train_x = _images(items["fit"], size), _images(items["dev"], size), _images(training_items, size)
    labels = torch.tensor([it["label"] for it in items["dev"]])
    kinds = np.array([it["lesion"] for it in items["dev"]])
    models = _reconstruction_models(runs_dir, methods, train_x)
    names = [f"{r} sigma={s:g} {n}" for r, s, n in RECIPES]
    auroc: dict[str, dict[str, float]] = {m: {} for m in models}
    by_kind: dict[str, dict[str, dict[str, float]]] = {m: {} for m in models}
    torch.manual_seed(0)
    for model_name, model in models.items():
        for (residual, sigma, normalization), recipe in zip(RECIPES, names):
            net = AnomalyMapNet(model, smooth_sigma=sigma, map_residual=residual, map_normalization=normalization).eval()
            fit_map_normalization(net, fit_x.split(25), leave_one_out=False)
            with torch.no_grad():
                scores = torch.cat([aggregate_score(net(x), "max") for x in dev_x.split(25)])
            auroc[model_name][recipe] = float(image_auroc(scores, labels))
            by_kind[model_name][recipe] = {
                k: float(image_auroc(scores[torch.from_numpy((kinds == k) | (kinds == "none"))],
                                     labels[torch.from_numpy((kinds == k) | (kinds == "none"))]))
                for k in sorted(set(kinds) - {"none"})
            }
    mean = {r: float(np.mean([auroc[m][r] for m in models])) for r in names}
    selected = max(names, key=lambda r: (round(mean[r], 3), -RECIPES[names.index(r)][1]))
    header = "| recipe | " + " | ".join(models) + " | mean |\n|---|" + "---|" * (len(models) + 1) + "\n"
    rows = "".join(
        f"| {r}{' (selected)' if r == selected else ''} | " + " | ".join(f"{auroc[m][r]:.3f}" for m in models)
        + f" | {mean[r]:.3f} |\n"
        for r in names
    )
    text = (
        f"Development set: {len(items['dev']) // 2} normal + {len(items['dev']) // 2} lesion images from real healthy "
        f"validation radiographs (seed {seed}), healthy statistics fitted on {len(items['fit'])} others; image AUROC, "
        f"score = max of the map, {size[0]}x{size[1]}.\n\n{header}{rows}"
    )
    print(text)
    result = {"recipes": names, "auroc": auroc, "mean": mean, "by_kind": by_kind, "selected": selected, "seed": seed}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "map_recipe_study.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(output_dir, "map_recipe_study.md"), "w") as f:
        f.write(text)
    return result
