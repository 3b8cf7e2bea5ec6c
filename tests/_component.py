"""Skip where an optional component is absent, fail where CI says it must be there.

The integration tests of the dedicated environments (MONAI Deploy, MONAI Label, Orthanc) skip in the core
environment. In CI a missing component means a broken install, so ``.ci/run`` sets ``MEDAD_REQUIRE`` (a
comma-separated list: ``deploy``, ``label``, ``orthanc``) and the same tests then fail instead of skipping.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def required(component: str) -> bool:
    return component in {c.strip() for c in os.environ.get("MEDAD_REQUIRE", "").split(",")}


def skip_unless_present(component: str, reason: str) -> None:
    """``pytest.skip(reason)``, or ``pytest.fail`` when ``MEDAD_REQUIRE`` names ``component``."""
    if required(component):
        pytest.fail(f"{reason} [MEDAD_REQUIRE={component}: it must be present here]", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_skip(module: str, component: str, reason: str) -> ModuleType:
    """The imported module, else :func:`skip_unless_present` with the import error."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        skip_unless_present(component, f"{reason} ({type(e).__name__}: {e})")
