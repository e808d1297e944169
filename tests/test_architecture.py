"""The package layering of CONTRIBUTING.md, checked on the source: which package may import which.

    train.py, merge.py  ->  lightning_modules  ->  callbacks  ->  datamodules, merging  ->  common

``common`` imports no package of the project; ``datamodules`` and ``merging`` import only
``common`` (and themselves), never each other; ``callbacks`` (the writers) import those three and
never a LightningModule; only the entry points and ``lightning_modules`` see everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGES = ("common", "datamodules", "merging", "callbacks", "lightning_modules")
#: package -> the project packages it may import besides itself.
ALLOWED = {
    "common": set(),
    "datamodules": {"common"},
    "merging": {"common"},
    "callbacks": {"common", "datamodules", "merging"},
    "lightning_modules": {"callbacks", "common", "datamodules", "merging", "train", "merge"},
}


def imported_packages(path: Path) -> set[str]:
    """The project packages (and entry points) ``path`` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & {*PACKAGES, "train", "merge"}


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files, package
    wrong = {str(path.relative_to(REPO_ROOT)): sorted(imported_packages(path) - ALLOWED[package] - {package}) for path in files}
    assert not {path: names for path, names in wrong.items() if names}


def test_the_checker_sees_an_import_that_breaks_the_rule(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("import torch\nfrom merging.pool import ModelPool\n\ndef f():\n    import lightning_modules.cli\n")
    assert imported_packages(module) == {"merging", "lightning_modules"}
