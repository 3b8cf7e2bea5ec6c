"""Real chest-radiograph sources: one ``prepare_<source>`` command per public collection that may be redistributed,
turning the collection's own layout into downsampled 8-bit PNGs, a sha256 manifest and a seeded, patient-disjoint
datalist (committed under ``data/real/<source>``); ``prepare_lesion_task``, a test set of synthetic lesions on
held-out real healthy images (``data/real/kermany_lesions``); and :func:`real_benchmark_datalist` for all of them.

Sources, licences, counts and rebuild commands: ``docs/data_sources.md``.
"""

from ._common import MAX_SIZE, encode_png_gray8, read_manifest, sha256_file, write_png_gray8
from .benchmark import DERIVED_TEST_SETS, SOURCES, real_benchmark_datalist, real_data_dir, verify_real_data
from .hyperkvasir import prepare_hyperkvasir
from .kermany import KERMANY, prepare_kermany, scan_kermany
from .lesions import (
    INSERTED_LESION_KINDS,
    LESION_SIZES,
    acquisition_jitter,
    insert_lesion,
    lung_field,
    prepare_lesion_task,
)

__all__ = [
    "MAX_SIZE",
    "SOURCES",
    "DERIVED_TEST_SETS",
    "KERMANY",
    "encode_png_gray8",
    "read_manifest",
    "sha256_file",
    "write_png_gray8",
    "prepare_hyperkvasir",
    "prepare_kermany",
    "scan_kermany",
    "INSERTED_LESION_KINDS",
    "LESION_SIZES",
    "prepare_lesion_task",
    "insert_lesion",
    "acquisition_jitter",
    "lung_field",
    "real_benchmark_datalist",
    "real_data_dir",
    "verify_real_data",
]
