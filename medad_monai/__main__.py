"""Command line: ``python -m medad_monai <command> [--flags]`` (or ``medad-monai <command>``).

Commands:
    demo                         train, calibrate, evaluate and infer every bundle on the embedded demo data
    export                       TorchScript or ONNX export of a trained bundle, calibration included
    make_demo_data               generate the chest-radiograph phantoms (default dataset) into a folder
    datalist_from_folders        datalist JSON from a folder of normals (+ abnormal and mask folders)
    datalist_from_morphaeus_csv  datalist JSON from the original MorphAEus split CSVs
    datalist_from_medianomaly    datalist JSON from MedIAnomaly's data.json
    evaluate_tasks               the MorphAEus paper protocol: one evaluation per task, bootstrap AUROC, average
    prepare_kermany              real chest radiographs (Kermany, CC BY 4.0) from the source's layout into data/real
    prepare_hyperkvasir          colonoscopy frames in colour (Hyper-Kvasir, CC BY 4.0), polyp masks, into a folder
    real_benchmark_datalist      datalist of the committed real-image benchmark (data/real)
    benchmark                    speed and memory of both bundles and the metrics against references (--small True: CI)
    prepare_lesion_task          synthetic lesions on held-out real healthy radiographs (data/real/kermany_lesions)
    report                       HTML/Markdown report of an evaluation folder: curves, CIs, per-kind AUROC, examples
    map_recipe_study             which map and image score find anomalies on real radiographs (development sets)
    compare                      is one method better than others on the same test images: paired bootstrap of AUROC
"""

from __future__ import annotations

import fire


def _quiet(fn):
    """Runs ``fn`` for its printed report and files; fire would otherwise print the returned dict again."""

    def run(*args, **kwargs) -> None:
        fn(*args, **kwargs)

    run.__doc__ = fn.__doc__
    run.__signature__ = __import__("inspect").signature(fn)
    return run


def _commands() -> dict:
    from medad_monai.benchmarks import run_benchmark
    from medad_monai.data import datalist as dl
    from medad_monai.data import phantoms, sources
    from medad_monai.data.sources.hyperkvasir import prepare_hyperkvasir
    from medad_monai.apps.demo import run_demo
    from medad_monai.apps.compare import compare_evaluations
    from medad_monai.apps.export import export_bundle
    from medad_monai.apps.map_recipe_study import map_recipe_study
    from medad_monai.apps.paper_tasks import evaluate_tasks
    from medad_monai.io.report import evaluation_report

    return {
        "demo": _quiet(run_demo),
        "export": export_bundle,
        "make_demo_data": phantoms.generate_demo_dataset,
        "datalist_from_folders": dl.datalist_from_folders,
        "datalist_from_morphaeus_csv": dl.datalist_from_morphaeus_csv,
        "datalist_from_medianomaly": dl.datalist_from_medianomaly,
        "evaluate_tasks": _quiet(evaluate_tasks),
        # real chest radiographs (data/real, docs/data_sources.md)
        "prepare_kermany": _quiet(sources.prepare_kermany),
        "prepare_hyperkvasir": _quiet(prepare_hyperkvasir),
        "real_benchmark_datalist": _quiet(sources.real_benchmark_datalist),
        "prepare_lesion_task": _quiet(sources.prepare_lesion_task),
        "report": _quiet(evaluation_report),
        "map_recipe_study": _quiet(map_recipe_study),
        "compare": _quiet(compare_evaluations),
        # performance against the original MorphAEus computation, a plain MAE and scikit-learn (docs/performance.md)
        "benchmark": _quiet(run_benchmark),
    }


def main() -> None:
    fire.Fire(_commands())


if __name__ == "__main__":
    main()
