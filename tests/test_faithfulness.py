"""Config-level faithfulness to the original MorphAEus code and to what the MemMC-MAE abstract leaves open.

- ``ablation_ae.json`` is the original's no-deformation baseline ("MorphAEus-woPLM", ``configs/cxr/baseline.yaml``:
  the MorphAEus encoder/decoder as a plain autoencoder, perceptual weight 0, L2).
- The test-time resize: the original trains on bilinear resizes without anti-aliasing and tests through PIL's
  anti-aliased bilinear resize; ``--test_antialias True`` (evaluate and inference) follows its test loader, the
  default keeps the training preprocessing.
- ``--test_key`` evaluates any datalist section (the paper's ``test_pneumonia`` / ``test_covid``).
- MemMC-MAE's ``metadata.json`` lists the assumptions the abstract does not fix.
"""

from __future__ import annotations

import json
import os

import pytest
from monai.bundle import ConfigParser
from monai.transforms import Resized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser(bundle: str, *configs: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "bundles", bundle, "configs", c) for c in configs])
    parser["bundle_root"] = os.path.join(ROOT, "bundles", bundle)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _antialias(compose) -> bool:
    (resize,) = [t for t in compose.transforms if isinstance(t, Resized) and "image" in t.keys]
    return bool(resize.anti_aliasing[0])  # Resized passes it per key at call time


def test_ablation_ae_is_the_originals_baseline():
    parser = _parser("morphaeus", "train.json", "ablation_ae.json")
    assert parser.get_parsed_content("deformation") is False
    assert parser.get_parsed_content("perceptual_weight") == 0.0
    full = _parser("morphaeus", "train.json")
    assert full.get_parsed_content("perceptual_weight") == 0.05 and full.get_parsed_content("deformation") is True


@pytest.mark.parametrize("bundle", ["morphaeus", "memmc_mae"])
def test_test_time_antialiasing_is_an_option(bundle):
    train = _parser(bundle, "train.json")
    assert _antialias(train.get_parsed_content("train#preprocessing")) is False
    for configs in (("train.json", "evaluate.json"), ("inference.json",)):
        key = "validate#preprocessing" if "evaluate.json" in configs else "preprocessing"
        assert _antialias(_parser(bundle, *configs).get_parsed_content(key)) is False
        assert _antialias(_parser(bundle, *configs, test_antialias=True).get_parsed_content(key)) is True


@pytest.mark.parametrize("bundle", ["morphaeus", "memmc_mae"])
def test_any_datalist_section_can_be_evaluated(bundle, tmp_path):
    datalist = {"test": [{"image": "a.png", "label": 0}], "test_covid": [{"image": "b.png", "label": 1}]}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    for name in ("a.png", "b.png"):  # the datalist reader checks that the files exist; nothing reads them here
        (tmp_path / name).write_bytes(b"")
    parser = _parser(bundle, "train.json", "evaluate.json", datalist=str(path), dataset_dir=str(tmp_path))
    assert [os.path.basename(i["image"]) for i in parser.get_parsed_content("validate#dataset#data")] == ["a.png"]
    parser = _parser(
        bundle, "train.json", "evaluate.json", datalist=str(path), dataset_dir=str(tmp_path), test_key="test_covid"
    )
    assert [os.path.basename(i["image"]) for i in parser.get_parsed_content("validate#dataset#data")] == ["b.png"]


def test_memmc_mae_metadata_marks_its_assumptions():
    with open(os.path.join(ROOT, "bundles", "memmc_mae", "configs", "metadata.json")) as f:
        meta = json.load(f)
    text = " ".join(meta["assumptions"])
    for choice in ("num_memory_slots", "gradient only", "sigmoid gates", "num_inference_masks", "abstract"):
        assert choice in text
