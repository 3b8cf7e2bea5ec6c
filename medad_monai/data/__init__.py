"""Data: 2D medical image readers, MONAI transforms, datalists and converters, and the embedded demo phantoms."""

from .datalist import (
    datalist_from_folders,
    datalist_from_medianomaly,
    datalist_from_morphaeus_csv,
    load_datalist,
    write_datalist,
)
from .phantoms import (
    GENERATOR_VERSION,
    LESION_KINDS,
    PhantomSample,
    default_demo_dir,
    generate_demo_dataset,
    make_demo_figure,
    synthesize_cxr,
)
from .readers import SUPPORTED_EXTENSIONS, ImageReadError, load_image, load_mask, read_raw
from .transforms import LoadAnomalyImaged, anomaly_transforms

__all__ = [
    "ImageReadError",
    "SUPPORTED_EXTENSIONS",
    "load_image",
    "load_mask",
    "read_raw",
    "LoadAnomalyImaged",
    "anomaly_transforms",
    "load_datalist",
    "write_datalist",
    "datalist_from_folders",
    "datalist_from_morphaeus_csv",
    "datalist_from_medianomaly",
    "GENERATOR_VERSION",
    "LESION_KINDS",
    "PhantomSample",
    "synthesize_cxr",
    "generate_demo_dataset",
    "default_demo_dir",
    "make_demo_figure",
]
