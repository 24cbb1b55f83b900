"""Every ``python -m experiments ...`` command in README.md, docs/ and scripts/ parses
against the real command line and plans: its experiment names, fields and options exist."""

import pathlib
import re
import shlex

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
