"""pyproject.toml declares exactly what the code imports.

fnnet's runtime dependencies are the third-party packages fnnet/ imports, no more (a
test oracle such as Flax belongs to the test extra) and no fewer. experiments/, bench/
and tests/ may add only what their extras declare.
"""

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement such as ``jax>=0.10.1``."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*extras: str) -> set[str]:
    names = {_name(r) for r in PROJECT["dependencies"]}
    for extra in extras:
        names |= {_name(r) for r in PROJECT["optional-dependencies"][extra]}
    return names - {"fnnet"}


def _extras(extra: str) -> list[str]:
    """``extra`` and the extras it pulls in (``fnnet[experiments,bench]``)."""
    names = [extra]
    for requirement in PROJECT["optional-dependencies"][extra]:
        if _name(requirement) == "fnnet":
            names += re.search(r"\[(.*)\]", requirement).group(1).replace(" ", "").split(",")
    return names


def _imported(folder: str) -> set[str]:
    """Top-level modules imported anywhere under ``folder``, function bodies included."""
    modules = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    local = {"fnnet", "experiments", "bench", "tests"} | {
        p.stem for p in (ROOT / folder).glob("*.py")
    }
    return modules - set(sys.stdlib_module_names) - local


def _distributions(modules: set[str], declared: set[str] = frozenset()) -> set[str]:
    """The installed distributions that provide ``modules`` (one each). A module that no
    installed distribution provides counts as the distribution of its own name if that
    is ``declared``: the test environment lacks bench's PyTorch on purpose."""
    providers = metadata.packages_distributions()
    absent = {m for m in modules if m not in providers and _name(m) in declared}
    missing = sorted(m for m in modules - absent if m not in providers)
    assert not missing, f"no installed distribution provides {missing}"
    return {_name(providers[m][0]) for m in modules - absent} | {_name(m) for m in absent}


# Extras that fnnet/ itself imports, only inside the function that needs them (so
# ``import fnnet`` works without them) and with an error that names the extra.
LIBRARY_EXTRAS = ("tensorboard",)


def _extra_only(extra: str) -> set[str]:
    return {_name(r) for r in PROJECT["optional-dependencies"][extra]} - {"fnnet"}


def _top_level_imports(folder: str) -> set[str]:
    """Modules imported at module level under ``folder`` (not inside a function)."""
    modules = set()
    for path in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        nested = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if id(node) in nested:
                continue
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules


def test_runtime_dependencies_are_what_fnnet_imports():
    optional = set().union(*(_extra_only(e) for e in LIBRARY_EXTRAS))
    imported = _distributions(_imported("fnnet"))
    assert imported - optional == _declared()
    assert optional <= imported, "a library extra fnnet/ no longer imports: drop it"


def test_library_extras_are_imported_lazily():
    optional = set().union(*(_extra_only(e) for e in LIBRARY_EXTRAS))
    providers = metadata.packages_distributions()
    eager = {
        m
        for m in _top_level_imports("fnnet")
        if m in providers and _name(providers[m][0]) in optional
    }
    assert not eager, f"fnnet/ imports {sorted(eager)} at module level; import it where used"


@pytest.mark.parametrize(
    ("folder", "extra"), [("experiments", "experiments"), ("bench", "bench"), ("tests", "test")]
)
def test_extras_cover_what_their_folder_imports(folder, extra):
    declared = _declared(*_extras(extra))
    undeclared = _distributions(_imported(folder), declared) - declared
    assert not undeclared, f"{folder}/ imports {sorted(undeclared)}; add them to its extra"


def test_the_test_extra_does_not_install_pytorch():
    """``make test`` installs ``.[test]``; PyTorch (GBs with CUDA) is bench's alone."""
    assert "torch" in _declared(*_extras("bench"))
    assert "torch" not in _declared(*_extras("test"))
    for extra in _extras("test")[1:]:  # _extras reads one level of fnnet[...] deep
        assert "fnnet" not in {_name(r) for r in PROJECT["optional-dependencies"][extra]}
    assert "torch" not in _imported("tests")


# fnnet's accelerator extras, each the jax extra of the same name: pip install ".[cuda12]".
ACCELERATORS = ("tpu", "cuda12", "cuda13")


@pytest.mark.parametrize("extra", ACCELERATORS)
def test_accelerator_extras_are_jaxs_own(extra):
    """``fnnet[tpu]`` is ``jax[tpu]`` from the jax that fnnet needs anyway, and so on. The
    installed jax must provide that extra: pip only warns about one it does not know and
    installs plain CPU jax, which a user finds out about when the run is on the CPU."""
    (jax_bound,) = [r[len("jax") :] for r in PROJECT["dependencies"] if _name(r) == "jax"]
    assert PROJECT["optional-dependencies"][extra] == [f"jax[{extra}]{jax_bound}"]
    provided = metadata.metadata("jax").get_all("Provides-Extra")
    assert extra in provided, f"jax {metadata.version('jax')} provides {sorted(provided)}"
