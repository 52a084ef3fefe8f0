"""The folder tree is the architecture: these imports must not exist."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("shared", "infra", "options_model", "consumer", "producer", "poslake")
APPLICATIONS = ("consumer", "producer", "poslake", "gateway_sim", "tests", "bench")
# What each production package must never import.
FORBIDDEN = {
    # The contract: nothing but itself and the plumbing (settings register secrets).
    "shared": (*APPLICATIONS, "options_model"),
    "infra": (*APPLICATIONS, "options_model"),
    "options_model": APPLICATIONS,
    "consumer": ("producer", "poslake", "gateway_sim", "tests", "bench"),
    "producer": ("consumer", "poslake", "gateway_sim", "tests", "bench"),
    "poslake": ("gateway_sim", "tests", "bench"),
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", PRODUCTION)
def test_production_packages_keep_their_imports(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & set(FORBIDDEN[package]))
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    offenders = {name: bad for name, bad in offenders.items() if bad}
    assert offenders == {}


def test_the_scan_sees_imports() -> None:
    # The check above must be able to fail: the simulator itself imports its own package.
    assert "gateway_sim" in imported_packages(ROOT / "gateway_sim" / "simulator.py")
