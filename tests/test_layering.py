"""The house reads top-down: each floor imports only from itself and the floors below.

The floors, bottom up, are ``FLOORS``. Imports are read from the source with
``ast`` (lazy imports inside functions count too), so a forbidden import fails
here before it could ever run; a fresh interpreter then checks that importing
each public package really loads no floor above it.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Bottom up. A module belongs to the floor whose name is its longest prefix.
FLOORS = (
    ("fnnet._src", "the layer protocol, the layers, and private JAX helpers"),
    ("fnnet.models", "the four architectures, built from layers"),
    ("fnnet", "the public face: fnnet/__init__.py and the modules beside it"),
    ("fnnet.train", "training, on models"),
    ("fnnet.distributed", "meshes, sharding and several hosts, on training"),
    ("experiments", "the runner, on the library"),
    ("tests.handwritten", "the models' oracles, which the benchmarks time too"),
    ("bench", "the benchmarks"),
    ("tests", "the tests"),
)
OURS = {"fnnet", "experiments", "bench", "tests"}
# The scanned sources: all of the library, the runner and the benchmarks, and the
# one test module that something below the tests imports.
SOURCES = ("fnnet", "experiments", "bench", "tests/handwritten.py")


def _module_files() -> dict[str, pathlib.Path]:
    files = {}
    for source in SOURCES:
        path = ROOT / source
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            parts = file.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = file
    return files


MODULES = _module_files()


def _floor(name: str) -> int:
    """The index in FLOORS of the floor ``name`` belongs to."""
    matches = [
        (len(prefix), i)
        for i, (prefix, _) in enumerate(FLOORS)
        if name == prefix or name.startswith(prefix + ".")
    ]
    assert matches, f"{name} is on no floor: add its package to FLOORS"
    return max(matches)[1]


def _imports(name: str) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of one of our modules in ``name``."""
    file = MODULES[name]
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                # `from fnnet import models` imports a module; `from fnnet import dense`, a name.
                full = f"{base}.{alias.name}"
                found.append((full if full in MODULES else base, node.lineno))
    return [(target, line) for target, line in found if target.split(".")[0] in OURS]


def test_every_module_is_on_a_floor():
    for name, file in MODULES.items():
        if FLOORS[_floor(name)][0] == "fnnet":
            # The face is fnnet/__init__.py and single files beside it (fnnet/errors.py);
            # a new subpackage needs a floor of its own.
            beside = file.parent == ROOT / "fnnet"
            assert beside, f"{name} is on no floor: add its package to FLOORS"


def test_nothing_imports_from_a_floor_above_it():
    wrong = []
    for name in MODULES:
        for target, line in _imports(name):
            if _floor(target) > _floor(name):
                wrong.append(
                    f"{MODULES[name].relative_to(ROOT)}:{line}: {name} "
                    f"({FLOORS[_floor(name)][1]}) imports {target} "
                    f"({FLOORS[_floor(target)][1]})"
                )
    assert not wrong, "imports from a floor above:\n" + "\n".join(wrong)


def test_there_are_no_import_cycles():
    graph = {name: sorted({t for t, _ in _imports(name) if t in MODULES}) for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name) :] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for target in graph[name]:
            visit(target, [*path, name])
        done.add(name)

    for name in graph:
        visit(name, [])


# What importing each public package may load: never a floor above, and the face
# stays cheap (no optimizer or checkpoint library).
_LOADS = {
    "fnnet": ["fnnet.train", "fnnet.distributed", "optax", "orbax", "flax"],
    "fnnet.train": ["fnnet.distributed"],
    "fnnet.distributed": [],
}


@pytest.mark.parametrize("package", list(_LOADS))
def test_importing_a_package_loads_no_floor_above_it(package):
    never = ["experiments", "bench", "tests", *_LOADS[package]]
    loaded = _loaded_after(f"import {package}")
    above = [m for m in loaded if any(m == n or m.startswith(n + ".") for n in never)]
    assert not above, f"import {package} loads {above}"


def test_every_library_module_imports():
    """Each fnnet module imports in a fresh interpreter (a stale import of a moved
    module fails here even where no other test reaches the module)."""
    names = sorted(n for n in MODULES if n.split(".")[0] == "fnnet")
    loaded = _loaded_after(
        "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    )
    assert not [m for m in loaded if m.split(".")[0] in {"experiments", "bench", "tests"}]


def _loaded_after(code: str) -> list[str]:
    """The names in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    code += "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()
