"""Embedded demo data: a deterministic generator of chest-radiograph-like phantoms with localised lesions.

When no dataset is given, the bundles train and evaluate on these phantoms, so everything runs offline. They are
synthetic, not clinical data; they are meant to make a demo and the tests meaningful, not to validate a method.

Design (all our choices):

- **Anatomy** of a PA chest radiograph, drawn in a patient frame (x to the image right, y down, in units of about
  the image width; the lungs span about ``x in [-0.46, 0.46]``, ``y in [-0.44, 0.34]``): body with shoulders, chest wall
  and optional arms, two lungs (rounded apices, lateral costophrenic recesses, diaphragm domes, the right one higher),
  mediastinum with trachea and aortic knob, heart, posterior and anterior ribs, clavicles, spine, humeral heads,
  optional breast shadows and gastric bubble, a branching vascular tree fanning out from each hilum, fine parenchymal
  texture, and a lead side marker. Densities are summed along the ray and shown through ``1 - exp(-k * density)``, then
  window, gamma, unsharp masking (as radiograph processing does), detector blur and signal-dependent noise.
- **Between-patient variability** in every part (position, size, rotation, lung shape and inspiration depth, heart
  size and position, rib spacing/curvature/thickness, soft tissue and breasts, arms, exposure, gamma, contrast,
  sharpness, noise, vessel patterns), so that the mean healthy image is a poor model and a per-pixel
  ``|x - mean|`` score is a weak detector.
- **Lesions**, each with its pixel mask, drawn into the same patient: ``nodule`` (one to three round, slightly
  lobulated blobs), ``consolidation`` (patchy air-space opacity confined to a lung), ``effusion`` (fluid at a lung
  base with a meniscus, blunting the costophrenic angle), ``pneumothorax`` (lung collapsed towards the hilum, a
  dark rim without vessels behind a thin visceral pleural line) and ``cardiomegaly`` (enlarged heart; the mask is
  the lung area the heart took over). Contrasts are moderate, so detection is not trivial.
- **Determinism**: a sample is a function of its patient seed (anatomy and noise) and lesion seed only, via
  ``numpy.random.SeedSequence``; the lesion draws from its own stream, so an abnormal image and its lesion-free
  twin share anatomy and noise, and differ only around the lesion. Files are byte-identical for the same seed and
  software (numpy/Pillow) versions. The code is numpy-only and single-threaded (no BLAS): about 25 ms per 256x256
  image, 20 s for the default 800 images on one core.

Difficulty (measured on the default dataset at 128x128 with :func:`anomaly_transforms`): image AUROC of the
mean-image score ``mean |x - mean(train)|`` about 0.61, of a 20-component PCA reconstruction residual about 0.68,
and 1.0 for an oracle that knows each image's lesion-free twin; so there is room between a trivial baseline and a
perfect model.

:func:`generate_demo_dataset` writes ``images/``, ``masks/``, ``datalist.json`` (training and validation healthy;
test normals with label 0 and an all-zero mask, abnormals with label 1 and their mask, every test item with a
``lesion`` field), ``README.txt`` and ``manifest.json``; a later call with the same parameters reuses the files.

Modules: :mod:`~medad_monai.data.phantoms.render` (the numpy helpers, the patient model, anatomy, lesions and
:func:`synthesize_cxr`), :mod:`~medad_monai.data.phantoms.dataset` (:func:`generate_demo_dataset`, its cache
folder, manifest and datalist) and :mod:`~medad_monai.data.phantoms.figures` (:func:`make_demo_figure`). Every
public name is importable from ``medad_monai.data.phantoms``.

Example::

    >>> from medad_monai.data import default_demo_dir, generate_demo_dataset, load_datalist
    >>> path = generate_demo_dataset(default_demo_dir(), verbose=True)  # about 20 s once, then reused
    >>> test = load_datalist(path, "test")
"""

from .dataset import LESION_WEIGHTS, default_demo_dir, generate_demo_dataset
from .figures import make_demo_figure
from .render import (
    GENERATOR_VERSION,
    LESION_KINDS,
    PhantomSample,
    gaussian_blur_shifted,
    sigmoid,
    smoothstep,
    synthesize_cxr,
)

__all__ = [
    "GENERATOR_VERSION",
    "LESION_KINDS",
    "LESION_WEIGHTS",
    "PhantomSample",
    "synthesize_cxr",
    "generate_demo_dataset",
    "default_demo_dir",
    "make_demo_figure",
    "gaussian_blur_shifted",
    "smoothstep",
    "sigmoid",
]
