"""The MONAI model zoo's checks, run offline on both bundles (our own code, modelled on the zoo's CI).

What the zoo runs (``Project-MONAI/model-zoo``, ``ci/``) and where it is reproduced here:

- ``verify_bundle.py``: required ``configs/metadata.json`` and ``LICENSE``, preferred ``models/model.pt`` (or a
  ``large_files.yml`` link) and ``configs/inference.{json,yaml,yml}``; ``version`` listed in ``changelog``; metadata
  against the schema at ``eval/schema.json`` (``verify_metadata``); in "full" mode the inference workflow's
  properties, ``verify_net_in_out`` on ``network_def`` of the inference config and ``ckpt_export`` **by scripting**
  (no ``--use_trace``) of ``models/model.pt``, then ``torch.jit.load``. ``test_zoo_full_mode`` runs these steps, in
  this order, on a temporary copy of each bundle laid out as the zoo's ``models/<bundle>``, into which weights are
  written the way the zoo's CI makes them when none are shipped (``_produce_fake_weights``: the state dict of
  ``network_def`` built from the inference config and metadata, saved as ``models/model.pt``). Both bundles script,
  so neither needs ``bundle_custom_data.exclude_verify_torchscript_list``: MorphAEus warps with
  :class:`~medad_monai.networks.blocks.Warp2D` (MONAI ``Warp``'s math; MONAI's ``Warp`` itself does not script). The
  tiny architectures are used; MorphAEus is exported at its shipped size too (a full-size MemMC-MAE ``model.pt`` is
  about 530 MiB and has to be linked in ``large_files.yml``);
- ``get_bundle_requirements.py``: ``monai``/``torch``/``numpy`` and every ``required_packages_version`` entry are
  pinned from the metadata, so they must be the versions the bundle runs with;
- ``unit_tests/test_<bundle>.py`` (``check_workflow``): ``ConfigWorkflow(...).check_properties() == []`` for
  ``train.json``, ``[train.json, evaluate.json]`` (as a "train" workflow) and ``inference.json``;
- ``.pre-commit-config.yaml``: ``pretty-format-json --no-sort-keys --indent=4``, end-of-file and trailing-whitespace
  fixers, ``check-added-large-files --maxkb=1024``, ``detect-private-key``; ``CONTRIBUTING.md``: no file over 25 MB,
  no personal paths, ``docs/README.md`` after ``docs/readme_template.md``;
- MONAI 1.6's logging allowlist (GHSA-wvpx-5qmp-46g3) for ``configs/logging.conf``.

Nothing is downloaded: the schema is the offline copy and the data a tiny generated phantom set.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from _bundle_cli import tiny
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from monai.bundle.workflows import _reject_executable_logging_config
from monai.data import load_net_with_metadata

from medad_monai.data import generate_demo_dataset

# TorchScript and the TorchScript-based ONNX exporter are deprecated in torch 2.13 but are what MONAI's tools use.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = ["morphaeus", "memmc_mae"]
SIZE = tiny("morphaeus")["spatial_size"][0]  # the tiny networks' input size
TINY = {b: tiny(b) for b in ("morphaeus", "memmc_mae")}
MAX_FILE_BYTES = 25 * 1024 * 1024  # CONTRIBUTING.md
MAX_COMMITTED_BYTES = 1024 * 1024  # pre-commit check-added-large-files --maxkb=1024
TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".conf", ".py", ".cfg", ".toml", ".sh", ""}


def _root(bundle: str) -> str:
    return os.path.join(ROOT, "bundles", bundle)


def _configs(bundle: str, *names: str) -> str:
    return os.path.join(_root(bundle), "configs", *names)


def _metadata(bundle: str) -> dict:
    with open(_configs(bundle, "metadata.json")) as f:
        return json.load(f)


def _submitted_files(bundle: str) -> list[str]:
    """Bundle files a zoo pull request would contain (relative paths).

    Git's view when available (tracked plus untracked-but-not-ignored); otherwise a walk that leaves out what
    ``.gitignore`` leaves out for bundles (``models/``, ``eval/`` outputs, ``runs/``, caches). ``eval/schema.json``
    is left out too: the zoo's CI downloads it (``prepare_schema.py``) and no zoo bundle commits it.
    """
    root = _root(bundle)
    files = None
    if shutil.which("git"):
        proc = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "."],
            cwd=root,
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            files = [f for f in proc.stdout.splitlines() if os.path.isfile(os.path.join(root, f))]
    if files is None:
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            if rel.split(os.sep)[0] in ("models", "eval", "runs") or "__pycache__" in rel:
                continue
            files += [os.path.normpath(os.path.join(rel, n)) for n in filenames]
    return sorted(f for f in files if f != os.path.join("eval", "schema.json"))


def _text_files(bundle: str) -> list[str]:
    return [f for f in _submitted_files(bundle) if os.path.splitext(f)[1] in TEXT_SUFFIXES or f == "LICENSE"]


def _read(bundle: str, rel: str) -> str:
    with open(os.path.join(_root(bundle), rel), encoding="utf-8", newline="") as f:
        return f.read()


def _zoo_copy(bundle: str, models_path) -> str:
    """A copy of the bundle as the zoo's CI sees it, ``<models_path>/<bundle>``: the files a pull request would
    contain, plus ``eval/schema.json`` (which the CI downloads, ``prepare_schema.py``)."""
    dst = os.path.join(str(models_path), bundle)
    for rel in _submitted_files(bundle) + [os.path.join("eval", "schema.json")]:
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(os.path.join(_root(bundle), rel), os.path.join(dst, rel))
    return dst


def _zoo_fake_weights(bundle_path: str, **override) -> str:
    """``models/model.pt`` made as the zoo's CI makes it (``verify_bundle._produce_fake_weights``): the state dict of
    ``network_def`` parsed from the inference config and the metadata (``override`` sizes it)."""
    parser = ConfigParser()
    parser.read_config(f=os.path.join(bundle_path, "configs", "inference.json"))
    parser.read_meta(f=os.path.join(bundle_path, "configs", "metadata.json"))
    parser.update(override)
    torch.manual_seed(0)
    path = os.path.join(bundle_path, "models", "model.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _eager_network(bundle_path: str, ckpt_file: str, **override) -> torch.nn.Module:
    """``network_def`` with the weights loaded, in eval mode: what the exported module must reproduce."""
    parser = ConfigParser()
    parser.read_config(f=os.path.join(bundle_path, "configs", "inference.json"))
    parser.read_meta(f=os.path.join(bundle_path, "configs", "metadata.json"))
    parser.update(override)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt_file, map_location="cpu", weights_only=True))
    return net.eval()


def _export_as_the_zoo(bundle_path: str, **override) -> str:
    """``verify_bundle.verify_torchscript``: ``ckpt_export`` of ``network_def`` without ``use_trace`` (scripting) to
    ``models/verify_model.ts``."""
    ts = os.path.join(bundle_path, "models", "verify_model.ts")
    ckpt_export(
        net_id="network_def",
        filepath=ts,
        ckpt_file=os.path.join(bundle_path, "models", "model.pt"),
        meta_file=os.path.join(bundle_path, "configs", "metadata.json"),
        config_file=os.path.join(bundle_path, "configs", "inference.json"),
        bundle_root=bundle_path,
        **override,
    )
    return ts


@pytest.fixture(scope="module", params=BUNDLES)
def zoo_bundle(request, tmp_path_factory):
    """A zoo-layout copy of the bundle with ``models/model.pt`` made from ``network_def`` (tiny architecture)."""
    bundle = request.param
    path = _zoo_copy(bundle, tmp_path_factory.mktemp(f"zoo_{bundle}") / "models")
    _zoo_fake_weights(path, **TINY[bundle])
    return bundle, path


# --------------------------------------------------------------------------------------------- verify_bundle.py ---
@pytest.mark.parametrize("bundle", BUNDLES)
def test_required_and_preferred_files(bundle):
    root = _root(bundle)
    assert os.path.isfile(_configs(bundle, "metadata.json"))
    assert os.path.isfile(os.path.join(root, "LICENSE")) and os.path.getsize(os.path.join(root, "LICENSE")) > 0
    assert any(os.path.isfile(_configs(bundle, f"inference.{ext}")) for ext in ("json", "yaml", "yml"))
    assert os.path.isfile(os.path.join(root, "docs", "README.md"))
    assert os.path.isfile(os.path.join(root, "eval", "schema.json")), "offline schema copy for verify_metadata"


def test_weights_shipped_linked_or_made_as_the_zoo_ci_does(zoo_bundle):
    """The zoo wants ``models/model.pt`` or a ``large_files.{yml,yaml,json}`` entry with a public URL for it; without
    either, its CI writes ``models/model.pt`` from ``network_def`` (done in the copy), which must then be a plain state
    dict that loads back into ``network_def`` (``ckpt_export`` and ``monai.bundle.load`` load it that way)."""
    bundle, path = zoo_bundle
    root = _root(bundle)
    links = [f for f in ("large_files.yml", "large_files.yaml", "large_files.json") if os.path.isfile(f"{root}/{f}")]
    if links:
        entries = ConfigParser.load_config_file(os.path.join(root, links[0])).get("large_files", [])
        assert entries, f"{links[0]} has no 'large_files' entries"
        for e in entries:
            assert {"path", "url"} <= set(e), e
            assert e.get("hash_type", "md5") in ("md5", "sha1", "sha256", "sha512"), e
            assert not os.path.isabs(e["path"]), e
        assert any(os.path.normpath(e["path"]) == os.path.join("models", "model.pt") for e in entries)
    shipped = os.path.join(root, "models", "model.pt")
    model = shipped if os.path.isfile(shipped) else os.path.join(path, "models", "model.pt")
    assert os.path.getsize(model) <= MAX_FILE_BYTES, "model.pt over 25 MB: link it in large_files.yml instead"
    state = torch.load(model, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())
    if model != shipped:
        net = _eager_network(path, model, **TINY[bundle])
        assert set(net.state_dict()) == set(state)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_version_listed_in_changelog(bundle):
    meta = _metadata(bundle)
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]), meta["version"]
    assert isinstance(meta.get("changelog"), dict) and meta["version"] in meta["changelog"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_passes_the_offline_schema(bundle, tmp_path):
    schema = os.path.join(_root(bundle), "eval", "schema.json")
    verify_metadata(meta_file=_configs(bundle, "metadata.json"), filepath=schema)  # raises on any violation
    # the offline copy really enforces the schema: a metadata without a required key fails
    meta = _metadata(bundle)
    del meta["required_packages_version"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="required_packages_version"):
        verify_metadata(meta_file=str(broken), filepath=schema)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_pinned_versions_are_the_running_ones(bundle):
    """``get_bundle_requirements.py`` pins these versions for the zoo's CI environment; they must be what we run."""
    meta = _metadata(bundle)
    pins = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    pins.update(meta.get("optional_packages_version", {}))
    pins.update(meta.get("required_packages_version", {}))
    wrong = {}
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != str(version):
            wrong[name] = (version, installed)
    assert not wrong, f"metadata pins vs installed: {wrong}"


def test_network_data_format_matches_inference_config():
    """``verify_net_in_out`` feeds ``num_channels x spatial_shape`` of the metadata to ``network_def``."""
    for bundle in BUNDLES:
        meta = _metadata(bundle)["network_data_format"]
        parser = ConfigParser()
        parser.read_config(_configs(bundle, "inference.json"))
        image, pred = meta["inputs"]["image"], meta["outputs"]["pred"]
        assert image["num_channels"] == parser.get_parsed_content("channels"), bundle
        assert image["spatial_shape"] == list(parser.get_parsed_content("spatial_size")), bundle
        assert image["dtype"] == pred["dtype"] == "float32" and pred["num_channels"] == 1, bundle


@pytest.fixture(scope="module")
def net_in_out_runs(tmp_path_factory):
    """``python -m monai.bundle verify_net_in_out`` for every bundle, started together (each is mostly import time)."""
    procs = {}
    for bundle in BUNDLES:
        cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def"]
        cmd += ["--meta_file", _configs(bundle, "metadata.json"), "--config_file", _configs(bundle, "inference.json")]
        cmd += ["--bundle_root", _root(bundle)]
        cmd += ["--_meta_#network_data_format#inputs#image#spatial_shape", f"[{SIZE},{SIZE}]"]
        for k, v in TINY[bundle].items():
            cmd += [f"--{k}", json.dumps(v)]
        cwd = str(tmp_path_factory.mktemp(f"net_in_out_{bundle}"))
        procs[bundle] = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for bundle, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        results[bundle] = (proc.returncode, out)
    return results


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_net_in_out_cli(bundle, net_in_out_runs):
    returncode, out = net_in_out_runs[bundle]
    assert returncode == 0, out[-4000:]
    assert "data shape of network is verified with no error" in out


def test_zoo_full_mode(zoo_bundle):
    """``verify_bundle.py -m full`` on the zoo-layout copy, step by step: directory, version, metadata, inference
    properties, ``verify_net_in_out``, ``ckpt_export`` by scripting, ``torch.jit.load``. The exported module must
    then give the eager network's maps (max abs difference <= 1e-6) for another batch size than the check's."""
    bundle, path = zoo_bundle
    meta_file = os.path.join(path, "configs", "metadata.json")
    config_file = os.path.join(path, "configs", "inference.json")
    # verify_bundle_directory: necessary and preferred files
    for rel in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert os.path.isfile(os.path.join(path, rel)), rel
    # verify_version_changes (model_info.json of a fresh zoo checkout has no entry for this bundle)
    meta = _metadata(bundle)
    assert meta["version"] in meta["changelog"]
    # verify_metadata_format
    verify_metadata(meta_file=meta_file, filepath=os.path.join(path, "eval", "schema.json"))
    # verify_bundle_properties (the zoo checks the inference workflow; MONAI's own infer properties here)
    workflow = ConfigWorkflow(
        workflow_type="inference",
        config_file=config_file,
        meta_file=meta_file,
        logging_file=os.path.join(path, "configs", "logging.conf"),
        bundle_root=path,
        **TINY[bundle],
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    # verify_data_shape
    shape_override = {"_meta_#network_data_format#inputs#image#spatial_shape": [SIZE, SIZE]}
    verify_net_in_out(
        net_id="network_def",
        meta_file=meta_file,
        config_file=config_file,
        bundle_root=path,
        **shape_override,
        **TINY[bundle],
    )
    # verify_torchscript: scripting, as the zoo (no --use_trace, no exclude list)
    ts = _export_as_the_zoo(path, **TINY[bundle])
    torch.jit.load(ts)
    net, ts_meta, extra = load_net_with_metadata(ts, more_extra_files=("inference.json",))
    assert ts_meta["version"] == meta["version"] and extra["inference.json"]
    eager = _eager_network(path, os.path.join(path, "models", "model.pt"), **TINY[bundle])
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = eager(x), net(x)
    assert got.shape == (3, 1, SIZE, SIZE) and bool((got >= 0).all())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("deformation", [True, False], ids=["deformation", "ablation"])
def test_morphaeus_scripts_at_the_shipped_size(deformation, tmp_path):
    """The zoo's ``ckpt_export`` (scripting) of MorphAEus as shipped (128x128, paper channels), with weights made from
    ``network_def``, for the deformable model and the plain-autoencoder ablation; scripted maps equal eager ones."""
    path = _zoo_copy("morphaeus", tmp_path / "models")
    override = {"deformation": deformation}
    _zoo_fake_weights(path, **override)
    ts = _export_as_the_zoo(path, **override)
    net, _, _ = load_net_with_metadata(ts)
    eager = _eager_network(path, os.path.join(path, "models", "model.pt"), **override)
    assert (eager.model.deformer is not None) == deformation
    x = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = eager(x), net(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_morphaeus_scripts():
    """MorphAEus' inference network scripts directly (MONAI's ``Warp`` did not: "cannot statically infer the
    expected size of a list"), so it stays off the zoo's ``exclude_verify_torchscript_list``."""
    parser = ConfigParser()
    parser.read_config(_configs("morphaeus", "inference.json"))
    parser.update(TINY["morphaeus"])
    net = parser.get_parsed_content("network_def").eval()
    scripted = torch.jit.script(net)
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=0, atol=1e-6)


def test_morphaeus_readme_does_not_ask_for_tracing():
    """CONTRIBUTING.md: only a bundle that does not support TorchScript (scripting) says so in its README; MorphAEus
    scripts, so its README must not tell users to trace."""
    readme = _read("morphaeus", os.path.join("docs", "README.md"))
    assert "use_trace" not in readme and "must trace" not in readme


# ------------------------------------------------------------------------------- unit_tests: check_properties ---
@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo_phantoms")
    generate_demo_dataset(str(d), n_train=8, n_val=4, n_test_normal=2, n_test_abnormal=2, size=64)
    return str(d)


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize(
    "workflow_type,configs",
    [("train", ["train.json"]), ("train", ["train.json", "evaluate.json"]), ("infer", ["inference.json"])],
    ids=["train", "train+evaluate", "inference"],
)
def test_check_properties(bundle, workflow_type, configs, dataset_dir, tmp_path):
    override = {
        "bundle_root": _root(bundle),
        "dataset_dir": dataset_dir,
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
        "num_workers": 0,
        "progress_bar": False,
        **TINY[bundle],
    }
    if bundle == "morphaeus" and workflow_type == "train":
        override["allow_random_vgg"] = True  # the ImageNet VGG19 weights cannot be downloaded in tests
    workflow = ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[_configs(bundle, c) for c in configs],
        meta_file=_configs(bundle, "metadata.json"),
        logging_file=_configs(bundle, "logging.conf"),
        **override,
    )
    workflow.initialize()
    assert workflow.check_properties() == []


# ------------------------------------------------------------------------------------ pre-commit / CONTRIBUTING ---
def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ValueError(f"duplicate keys {sorted(dup)}")
    return dict(pairs)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_json_is_pretty_formatted(bundle):
    """pre-commit's ``pretty-format-json --autofix --no-sort-keys --indent=4`` would leave every JSON file as is."""
    bad = []
    for rel in (f for f in _submitted_files(bundle) if f.endswith(".json")):
        text = _read(bundle, rel)
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        if json.dumps(data, indent=4, ensure_ascii=True, separators=(",", ": ")) + "\n" != text:
            bad.append(rel)
    assert not bad, f"not in 4-space pretty JSON (fix: json.dump(obj, f, indent=4) + trailing newline): {bad}"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_text_files_pass_the_whitespace_hooks(bundle):
    problems = []
    for rel in _text_files(bundle):
        text = _read(bundle, rel)
        if text and (not text.endswith("\n") or text.endswith("\n\n")):
            problems.append(f"{rel}: must end with exactly one newline")
        if "\r" in text:
            problems.append(f"{rel}: CR line endings")
        lines = [i + 1 for i, line in enumerate(text.split("\n")) if line != line.rstrip()]
        if lines:
            problems.append(f"{rel}: trailing whitespace on lines {lines[:5]}")
        if re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
            problems.append(f"{rel}: private key")
    assert not problems, problems


@pytest.mark.parametrize("bundle", BUNDLES)
def test_file_sizes(bundle):
    root = _root(bundle)
    sizes = {rel: os.path.getsize(os.path.join(root, rel)) for rel in _submitted_files(bundle)}
    # pre-commit's 1 MB limit implies the zoo's 25 MB one; weights are checked in test_weights_shipped_or_linked
    assert not {r: s for r, s in sizes.items() if s > MAX_COMMITTED_BYTES}, "over 1 MB: pre-commit rejects"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_no_personal_or_absolute_paths(bundle):
    pattern = re.compile(r"(/home/|/Users/|/root/|/work/|/tmp/|/mnt/|[A-Za-z]:\\\\Users|~/)")
    hits = [
        f"{rel}:{i + 1}: {line.strip()[:80]}"
        for rel in _text_files(bundle)
        for i, line in enumerate(_read(bundle, rel).split("\n"))
        if pattern.search(line)
    ]
    assert not hits, hits
    for name in ("train.json", "inference.json"):
        with open(_configs(bundle, name)) as f:
            config = json.load(f)
        for key in ("bundle_root", "ckpt_dir", "output_dir", "dataset_dir", "datalist"):
            value = config.get(key)
            assert value is None or not os.path.isabs(str(value)) or str(value).startswith("/workspace/"), (name, key)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_logging_conf_passes_the_monai_allowlist(bundle, tmp_path):
    path = _configs(bundle, "logging.conf")
    _reject_executable_logging_config(path)  # raises ValueError("refusing to apply logging config ...")
    # the allowlist is live in this MONAI: a handler argument that calls code is refused
    unsafe = tmp_path / "logging.conf"
    unsafe.write_text(open(path).read().replace("args=(sys.stdout,)", "args=(__import__('os').getcwd(),)"))
    with pytest.raises(ValueError, match="refusing to apply logging config"):
        _reject_executable_logging_config(str(unsafe))


def _headings(markdown: str) -> list[str]:
    """Markdown headings outside fenced code, normalised: no ``#``/``*``, no "(Optional)", lower case."""
    out, fenced = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6}\s", line):
            title = re.sub(r"\(optional\)", "", line.lstrip("#").replace("*", "").strip(), flags=re.IGNORECASE)
            out.append(title.strip(" :").lower())
    return out


# heading groups of a zoo README: docs/readme_template.md and the released bundles (spleen_ct_segmentation, ...)
README_SECTIONS = {
    "Model Overview / Model Description": lambda h: h in ("model overview", "model description"),
    "Data": lambda h: h == "data",
    "Training (e.g. 'Training configuration')": lambda h: h.startswith("training"),
    "Inference": lambda h: "inference" in h,
    "Performance": lambda h: h == "performance",
    "Limitations": lambda h: h == "limitations",
    "References": lambda h: h == "references",
    "License": lambda h: h == "license",
}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_readme_has_the_zoo_sections(bundle):
    headings = _headings(_read(bundle, os.path.join("docs", "README.md")))
    missing = [name for name, match in README_SECTIONS.items() if not any(match(h) for h in headings)]
    assert not missing, f"docs/README.md lacks headings {missing}; has {headings}"


# ---------------------------------------------------------------------------------------------------------------------
# the model zoo's own script, unchanged, where a checkout of Project-MONAI/model-zoo is at hand

ZOO_CHECKOUT = os.environ.get("MEDAD_MODEL_ZOO", "")


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_model_zoo_verify_bundle_script_full_mode(bundle, tmp_path):
    """``ci/verify_bundle.py --b <bundle>`` (mode ``full``) of a model-zoo checkout, run as the zoo's GPU premerge
    does, on the bundle as shipped with weights made by the script's own ``_produce_fake_weights``.

    The project may not copy the zoo's code and its tests download nothing, so this runs where ``MEDAD_MODEL_ZOO``
    names a checkout (``git clone https://github.com/Project-MONAI/model-zoo``); the steps themselves are also
    reproduced above (``test_zoo_full_mode``), which always runs."""
    from _component import skip_unless_present

    script = os.path.join(ZOO_CHECKOUT, "ci", "verify_bundle.py")
    if not os.path.isfile(script):
        skip_unless_present("model_zoo", f"no model-zoo checkout (MEDAD_MODEL_ZOO={ZOO_CHECKOUT!r})")
    models = tmp_path / "models"
    shutil.copytree(_root(bundle), models / bundle, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    os.makedirs(models / bundle / "eval")
    shutil.copy(os.path.join(_root(bundle), "eval", "schema.json"), models / bundle / "eval" / "schema.json")
    os.makedirs(models / bundle / "models")
    info = os.path.join(ZOO_CHECKOUT, "models", "model_info.json")
    if os.path.isfile(info):  # the version check refuses versions the zoo already published
        shutil.copy(info, models / "model_info.json")
    else:
        (models / "model_info.json").write_text("{}")
    env = {**os.environ, "PYTHONPATH": os.path.join(ZOO_CHECKOUT, "ci")}
    make_weights = (
        "from verify_bundle import _produce_fake_weights; "
        f"_produce_fake_weights('../configs/inference.json', '../configs/metadata.json', '{bundle}', 'cpu')"
    )
    subprocess.run([sys.executable, "-c", make_weights], cwd=models / bundle / "models", env=env, check=True,
                   capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, script, "--b", bundle, "-p", str(models)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    for step in ("directory is verified correctly", "version and changelog are verified correctly",
                 "metadata format is verified correctly", "data shape is verified correctly",
                 "export weights into TorchScript module successfully"):
        assert step in out, (step, out[-3000:])
