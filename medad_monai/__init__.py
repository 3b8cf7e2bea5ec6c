"""medad-monai: unsupervised anomaly detection for medical images as MONAI bundles."""

__version__ = "0.1.0"
