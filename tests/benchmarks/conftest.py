"""Load a benchmark script as a module, as ``python benchmarks/<name>.py`` would run it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(script: str, module_name: str) -> ModuleType:
    """``benchmarks/<script>.py`` as module ``module_name`` (registered in ``sys.modules``, as
    dataclasses look their module up; the scripts import their sibling ``results_md``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(script, module_name=script)`` -> the loaded benchmark module."""
    return lambda script, module_name=None: _load(script, module_name or script)
