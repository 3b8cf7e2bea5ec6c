"""Real chest-radiograph sources: one ``prepare_<source>`` command per public collection that may be redistributed,
turning the collection's own layout into downsampled 8-bit PNGs, a sha256 manifest and a seeded, patient-disjoint
datalist (committed under ``data/real/<source>``), and :func:`real_benchmark_datalist` for all of them.

Sources, licences, counts and rebuild commands: ``docs/data_sources.md``.
"""

from ._common import MAX_SIZE, encode_png_gray8, sha256_file
from .benchmark import SOURCES, real_benchmark_datalist, real_data_dir, verify_real_data
from .kermany import KERMANY, prepare_kermany, scan_kermany

__all__ = [
    "MAX_SIZE",
    "SOURCES",
    "KERMANY",
    "encode_png_gray8",
    "sha256_file",
    "prepare_kermany",
    "scan_kermany",
    "real_benchmark_datalist",
    "real_data_dir",
    "verify_real_data",
]
