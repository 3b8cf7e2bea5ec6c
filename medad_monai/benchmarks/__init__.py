"""Performance benchmark of both bundles and of the metrics against references (``python -m medad_monai benchmark``).

- :mod:`~medad_monai.benchmarks.run`: the command; one table, interleaved repetitions, targets of issue 12;
- :mod:`~medad_monai.benchmarks.morphaeus` / :mod:`~medad_monai.benchmarks.morphaeus_reference`: MorphAEus against
  the original code's computation;
- :mod:`~medad_monai.benchmarks.memmc_mae`: MemMC-MAE against a plain MAE of the same width;
- :mod:`~medad_monai.benchmarks.pixel_metrics`: pixel metrics against scikit-learn;
- :mod:`~medad_monai.benchmarks.timing`, :mod:`~medad_monai.benchmarks.report`,
  :mod:`~medad_monai.benchmarks.bundle_config`: timing/memory/FLOPs, the table, the bundles' configs.
"""

from medad_monai.benchmarks.run import run_benchmark

__all__ = ["run_benchmark"]
