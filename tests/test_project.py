"""Project-level checks: packaging metadata stays consistent; functions stay short."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# conda-forge names that differ from the PyPI distribution names
CONDA_TO_PYPI = {"python-kaleido": "kaleido", "pytorch": "torch"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string."""
    name = re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0]
    name = CONDA_TO_PYPI.get(name.lower(), name.lower())
    return name.replace("_", "-")


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {_name(r) for r in reqs}


def _environment_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            names |= {_name(r) for r in dep["pip"] if not r.startswith("-")}
        elif _name(dep) not in {"python", "pip"}:
            names.add(_name(dep))
    return names


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_torch_is_pinned_to_the_cpu_build_in_constraints_and_environment():
    constraints = (ROOT / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in constraints
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "torch==2.13.0" in pip_section


def test_makefile_installs_with_the_constraints_file():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    assert "make demo" in head and "make test" in head


#: Longest function (``def`` line to last line, decorators excluded) a package may hold.
MAX_FUNCTION_LINES = 100


def long_functions(package: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (n lines)`` of every function in ``package`` longer than ``limit``."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    rel = path.relative_to(ROOT)
                    found.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return found


@pytest.mark.parametrize("package", ["singd", "diagnostics", "experiments"])
def test_no_function_is_longer_than_the_limit(package):
    assert long_functions(package) == []
