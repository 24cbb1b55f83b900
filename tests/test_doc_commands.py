"""Every ``python -m experiments ...`` command in README.md, docs/ and scripts/ parses
against the real command line and plans: its experiment names, fields and options exist.
The settings docs/gpu.md gives for JAX and XLA exist in the installed JAX."""

import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import pytest

from experiments import _cli, _suite

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *(ROOT / "scripts").glob("*")]
# The arguments after "-m experiments", up to a quote, backtick, parenthesis or comment.
COMMAND = re.compile(r"-m experiments ((?:list|run|report)\b[^`'\"()#\n]*)")


def _commands():
    found = []
    for path in FILES:
        for match in COMMAND.finditer(path.read_text()):
            args = shlex.split(match.group(1).replace("...", ""))
            found.append(pytest.param(args, id=f"{path.name}: {' '.join(args)}"))
    return found


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("args", COMMANDS)
def test_a_documented_command_parses_and_plans(args):
    parsed = _cli._parse(args)
    if parsed.command == "list":
        return
    names, overrides = _cli._split(parsed.items)
    plans = _suite.plan(names, overrides, seeds=parsed.seeds, quick=parsed.quick)
    assert plans


GPU_PAGE = ROOT / "docs" / "gpu.md"
# A check that runs JAX with the environment it is given and reports one setting.
_PROBE = "import jax; jax.numpy.zeros(1).block_until_ready(); print(jax.config.%s)"


def _run_jax(env: dict[str, str], setting: str = "jax_platforms"):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    return subprocess.run(
        [sys.executable, "-c", _PROBE % setting],
        env={**environment, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_gpu_page_names_variables_jax_reads():
    """A misspelt variable is ignored without a word, so each one the page names must be
    one that jaxlib's GPU client reads, a JAX configuration option, or XLA_FLAGS."""
    named = set(re.findall(r"`((?:XLA|JAX)_[A-Z_]+)", GPU_PAGE.read_text()))
    assert {"XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_CLIENT_MEM_FRACTION"} <= named
    # Read as text, not imported: jaxlib comes with jax, and fnnet never imports it.
    client = pathlib.Path(importlib.util.find_spec("jaxlib.xla_client").origin).read_text()
    unknown = [
        name
        for name in sorted(named - {"XLA_FLAGS"})
        if f"getenv('{name}'" not in client and name.lower() not in jax.config.values
    ]
    assert not unknown, f"docs/gpu.md names {unknown}, which this JAX never reads"


def test_the_gpu_pages_xla_flags_and_matmul_setting_are_accepted():
    """XLA stops a process at start-up on a flag it does not know, so the page's flags are
    run, all at once, through a JAX on the CPU (GPU flags are parsed there too)."""
    text = GPU_PAGE.read_text()
    flags = sorted(set(re.findall(r"--xla_[a-z0-9_]+=[a-z0-9]+", text)))
    assert len(flags) >= 2
    (precision,) = set(re.findall(r"JAX_DEFAULT_MATMUL_PRECISION=(\w+)", text))
    done = _run_jax(
        {"XLA_FLAGS": " ".join(flags), "JAX_DEFAULT_MATMUL_PRECISION": precision},
        "jax_default_matmul_precision",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [precision]
    typo = _run_jax({"XLA_FLAGS": flags[0].replace("xla_gpu_", "xla_gpu_x")})
    assert typo.returncode != 0 and "Unknown flag" in typo.stderr  # the check can fail
