"""Is one method better than another on the same test images, beyond chance? Paired bootstrap differences of image
AUROC (and AP) between evaluation folders.

::

    python -m medad_monai compare runs/real/morphaeus/eval runs/real/morphaeus_ablation_ae/eval \\
        runs/real/pca_baseline --dataset_dir data/real
    # -> morphaeus against each of the others: difference of image AUROC [95 % interval], and which is better

Each folder is what an evaluation wrote (the bundles' ``evaluate.json`` ``--output_dir``, or a demo baseline's
folder): ``metrics.json`` and ``scores.csv``, read with :func:`medad_monai.io.report.load_evaluation` against the
datalist section the evaluations ran on. The first folder is compared with every other one on the images both
scored; the interval is :func:`medad_monai.io.report.paired_bootstrap_difference`'s (the same resampled images for
both methods). "Beyond the interval" means the interval of the difference excludes 0. The demo prints the same table
for every method against its ablations and the baselines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["compare_evaluations", "compare_results", "format_comparisons"]


def compare_results(candidate: Any, references: dict[str, Any], n_resamples: int = 1000, level: float = 0.95) -> dict:
    """Paired differences of image AUROC and AP between loaded evaluations.

    Args:
        candidate: an :class:`~medad_monai.io.report.EvaluationResults`.
        references: ``name -> EvaluationResults`` scored on the same datalist section.
        n_resamples, level: of the bootstrap.

    Returns:
        ``{name: {"image_auroc": {...}, "image_ap": {...}, "n_images": int}}`` with
        :func:`~medad_monai.io.report.paired_bootstrap_difference`'s fields (``a`` = the candidate).

    Raises:
        ValueError: the two evaluations share no image, or their labels disagree (other datalists).
    """
    from medad_monai.evaluation.metrics import image_ap, image_auroc
    from medad_monai.io.report import paired_bootstrap_difference

    def keyed(res: Any) -> dict[str, tuple[float, int]]:
        return {os.path.normpath(str(it["image"])): (float(s), int(y))
                for it, s, y in zip(res.items, res.scores, res.labels)}

    mine = keyed(candidate)
    out: dict[str, Any] = {}
    for name, ref in references.items():
        theirs = keyed(ref)
        common = [k for k in mine if k in theirs]
        if not common:
            raise ValueError(f"{candidate.eval_dir} and {ref.eval_dir} share no scored image: compare evaluations of "
                             "the same test section.")
        if any(mine[k][1] != theirs[k][1] for k in common):
            raise ValueError(f"{candidate.eval_dir} and {ref.eval_dir} give different labels to the same images.")
        a = np.array([mine[k][0] for k in common])
        b = np.array([theirs[k][0] for k in common])
        y = np.array([mine[k][1] for k in common])
        out[name] = {
            "image_auroc": paired_bootstrap_difference(a, b, y, image_auroc, n_resamples, level),
            "image_ap": paired_bootstrap_difference(a, b, y, image_ap, n_resamples, level),
            "n_images": len(common),
        }
    return out


def format_comparisons(candidate: str, comparisons: dict[str, Any], metric: str = "image_auroc") -> list[str]:
    """One Markdown table row per reference: ``| candidate − ref | difference [low, high] | verdict |``."""
    rows = []
    for name, c in comparisons.items():
        d = c[metric]
        verdict = {"a": f"{candidate} better", "b": f"{name} better"}.get(d["beyond"], "within the interval")
        rows.append(f"| {candidate} − {name} | {d['a']:.3f} − {d['b']:.3f} = {d['difference']:+.3f} "
                    f"[{d['low']:+.3f}, {d['high']:+.3f}] | {verdict} |")
    return rows


def compare_evaluations(
    *eval_dirs: str,
    names: str | Sequence[str] | None = None,
    datalist: str | None = None,
    dataset_dir: str | None = None,
    test_key: str = "test",
    n_resamples: int = 1000,
    level: float = 0.95,
    output: str | None = None,
) -> dict:
    """Compares the first evaluation folder with each of the others (paired bootstrap of image AUROC and AP); prints
    a table and optionally writes it (``output``: ``.json`` or ``.md``).

    Args:
        eval_dirs: two or more evaluation folders (``metrics.json`` + ``scores.csv``).
        names: display names (comma-separated or a list), one per folder; default: the folder names (the parent's
            name for an ``eval`` folder).
        datalist, dataset_dir, test_key: the datalist section the evaluations ran on (defaults as the bundles').
        n_resamples, level: of the bootstrap.
        output: optional file for the result.

    Returns:
        ``{"candidate": name, "comparisons": {name: ...}, "test_key": ..., "n_resamples": ...}``.
    """
    from medad_monai.io.report import load_evaluation

    if len(eval_dirs) < 2:
        raise ValueError("compare needs at least two evaluation folders: the candidate first, then the references.")
    if names is None:
        labels = []
        for d in eval_dirs:
            path = os.path.normpath(os.path.abspath(d))
            base = os.path.basename(path)
            labels.append(os.path.basename(os.path.dirname(path)) if base in ("eval", "test_results") else base)
    else:
        labels = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    if len(labels) != len(eval_dirs) or len(set(labels)) != len(labels):
        raise ValueError(f"names must give one distinct name per folder ({len(eval_dirs)}), got {labels}.")
    loaded = [load_evaluation(d, datalist=datalist, dataset_dir=dataset_dir, test_key=test_key) for d in eval_dirs]
    comparisons = compare_results(loaded[0], dict(zip(labels[1:], loaded[1:])), n_resamples, level)
    text = (
        f"Paired bootstrap of image AUROC on section '{test_key}' ({n_resamples} resamples, {level:.0%} interval)\n\n"
        "| comparison | image AUROC difference [interval] | verdict |\n|---|---|---|\n"
        + "\n".join(format_comparisons(labels[0], comparisons)) + "\n"
    )
    print(text, flush=True)
    result = {"candidate": labels[0], "comparisons": comparisons, "test_key": test_key, "n_resamples": n_resamples}
    if output:
        from medad_monai.io.outputs import write_atomic

        write_atomic(output, text if str(output).endswith(".md") else json.dumps(result, indent=2))
    return result
