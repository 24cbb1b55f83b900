"""scripts/tpu_launch.sh, run against a fake ``gcloud`` that records its calls.

No TPU and no Google Cloud account are involved: the fake answers
``queued-resources describe`` from a script of states and records every call,
so the tests check which gcloud commands the launcher issues, in what order.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import string
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "tpu_launch.sh"

FAKE_GCLOUD = """#!{python}
import json, os, pathlib, sys
log = pathlib.Path(os.environ["FAKE_GCLOUD_LOG"])
with log.open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "scp" in sys.argv and pathlib.Path(sys.argv[5]).is_file():  # keep what was uploaded
    pathlib.Path(os.environ["FAKE_GCLOUD_LOG"] + ".upload").write_bytes(
        pathlib.Path(sys.argv[5]).read_bytes()
    )
if "describe" in sys.argv:
    states = pathlib.Path(os.environ["FAKE_GCLOUD_STATES"])
    lines = states.read_text().split()
    print(lines[0])
    states.write_text("\\n".join(lines[1:] or lines))
"""


@pytest.fixture
def launch(tmp_path):
    """``launch(*args, states=[...]) -> (returncode, stderr, calls)`` with the fake on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def run(*args, states=("ACTIVE",), env=None):
        (tmp_path / "states").write_text("\n".join(states))
        log.write_text("")
        environment = {
            **{k: v for k, v in os.environ.items() if k not in ("GCLOUD", "PYTHON")},
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_GCLOUD_LOG": str(log),
            "FAKE_GCLOUD_STATES": str(tmp_path / "states"),
            "POLL_S": "0",
            **(env or {}),
        }
        done = subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=environment,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return done.returncode, done.stderr, calls

    return run


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_up_queues_waits_copies_and_installs(launch, tmp_path):
    code, err, calls = launch(
        "up", "my-project", "us-west4-a", "my-tpu", "v5litepod-16", states=["WAITING", "ACTIVE"]
    )
    assert code == 0, err
    where = ["--project=my-project", "--zone=us-west4-a"]
    create, describe1, describe2, scp, ssh = calls
    assert create == [
        "compute", "tpus", "queued-resources", "create", "my-tpu", *where,
        "--node-id=my-tpu", "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
    ]  # fmt: skip
    assert describe1 == describe2
    assert describe1[:5] == ["compute", "tpus", "queued-resources", "describe", "my-tpu"]
    assert "waiting for my-tpu (WAITING)" in err
    archive, destination = pathlib.Path(scp[4]), scp[5]
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and archive.name == "fnnet.tar.gz"
    assert destination == "my-tpu:" and scp[6:] == [*where, "--worker=all"]
    assert not archive.exists()  # the launcher cleans up after itself
    with tarfile.open(tmp_path / "calls.jsonl.upload") as tar:  # the committed tree
        assert "fnnet/train/_sharding.py" in tar.getnames()
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert ssh[5:8] == [*where, "--worker=all"]
    command = ssh[8]
    assert command.startswith("--command=")
    assert "install -y python3.12 python3.12-venv" in command  # the default interpreter
    assert "python3.12 -m venv .venv" in command and "-e '.[experiments,tpu]'" in command
    assert 'distributed.require_backend("tpu")' in command


def test_up_with_spot_and_runtime_override(launch):
    code, err, calls = launch("up", "p", "z", env={"SPOT": "1", "RUNTIME": "custom-rt"})
    assert code == 0, err
    assert calls[0][4] == "fnnet-tpu"
    assert "--accelerator-type=v5litepod-8" in calls[0]
    assert calls[0][-2:] == ["--runtime-version=custom-rt", "--spot"]


def test_run_sends_the_command_to_every_worker(launch):
    code, err, calls = launch(
        "run", "p", "z", "--", ".venv/bin/python", "-m", "experiments", "run", "mnist 1d"
    )
    assert code == 0, err
    (ssh,) = calls
    assert "--worker=all" in ssh and ssh[4] == "fnnet-tpu"
    assert ssh[-1] == r"--command=cd ~/fnnet && .venv/bin/python -m experiments run mnist\ 1d "
    code, _, (default,) = launch("run", "p", "z")
    assert default[-1].endswith("experiments run all --out results")


def test_fetch_and_down(launch, tmp_path):
    code, err, (scp,) = launch("fetch", "p", "z", "t", "v4-8", "--", "results/quick", "out")
    assert code == 0, err
    assert scp[4:7] == ["--recurse", "t:fnnet/results/quick", "out"] and "--worker=0" in scp
    assert (tmp_path / "out").is_dir()
    code, err, (delete,) = launch("down", "p", "z", "t")
    assert code == 0, err
    assert delete == [
        "compute", "tpus", "queued-resources", "delete", "t",
        "--project=p", "--zone=z", "--force", "--quiet",
    ]  # fmt: skip


def test_failures_stop_with_a_message(launch):
    code, err, calls = launch("up", "p", "z", states=["FAILED"])
    assert code == 1 and "queued resource fnnet-tpu is FAILED" in err
    assert [c[3] for c in calls] == ["create", "describe"]  # nothing copied
    code, err, _ = launch("up", "p", "z", states=["WAITING"], env={"WAIT_S": "0"})
    assert code == 1 and "still WAITING" in err
    code, err, calls = launch("up", "p", "z", "n", "x9-8")
    assert code == 2 and "no known runtime for TPU type 'x9-8'" in err and not calls
    code, err, calls = launch("up", "p")
    assert code == 2 and "scripts/tpu_launch.sh up" in err and not calls
    code, err, calls = launch("sideways", "p", "z")
    assert code == 2 and not calls


@pytest.mark.parametrize("python", ["python3.11", "python3.9"])
def test_up_refuses_a_python_older_than_3_12_before_asking_for_a_tpu(launch, python):
    """Under 3.11 pip would install JAX 0.10 and its older libtpu on the workers."""
    code, err, calls = launch("up", "p", "z", env={"PYTHON": python})
    assert code == 2 and not calls
    assert f"PYTHON={python} is older than Python 3.12" in err and "python3.12" in err


def test_up_refuses_a_python_apt_cannot_install_by_name(launch):
    code, err, calls = launch("up", "p", "z", env={"PYTHON": "/usr/bin/python3"})
    assert code == 2 and not calls
    assert "PYTHON=/usr/bin/python3 is not a name like python3.12" in err


def test_up_accepts_a_newer_python(launch):
    code, err, calls = launch("up", "p", "z", env={"PYTHON": "python3.13"})
    assert code == 0, err
    command = calls[-1][-1]
    assert "install -y python3.13 python3.13-venv" in command
    assert "python3.13 -m venv .venv" in command and "python3.12" not in command


# Stand-ins for what a TPU worker runs the install with; each records its call.
WORKER_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "$WORKER_LOG"
case "$(basename "$0") $1 $2" in
  "apt-cache show "*) exit "$APT_CACHE_STATUS" ;;
  "python3."*" -m venv")
    mkdir -p "$3/bin" && cp "$0" "$3/bin/pip" && cp "$0" "$3/bin/python" ;;
esac
"""


@pytest.mark.parametrize(("in_ubuntu", "adds_ppa"), [(True, False), (False, True)])
def test_the_install_command_runs_on_a_worker(launch, tmp_path, in_ubuntu, adds_ppa):
    """The command ``up`` sends, run by a shell whose apt, sudo and Python are stand-ins:
    it unpacks the upload, adds the deadsnakes PPA only when Ubuntu's archive lacks the
    interpreter, and installs fnnet with its tpu extra into ~/fnnet/.venv."""
    code, err, calls = launch("up", "p", "z")
    assert code == 0, err
    command = calls[-1][-1].removeprefix("--command=")
    home, tools = tmp_path / "worker", tmp_path / "worker-bin"
    home.mkdir()
    tools.mkdir()
    (home / "fnnet.tar.gz").write_bytes((tmp_path / "calls.jsonl.upload").read_bytes())
    for tool in ("apt-get", "apt-cache", "add-apt-repository", "python3.12"):
        (tools / tool).write_text(WORKER_TOOL)
        (tools / tool).chmod(0o755)
    (tools / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    (tools / "sudo").chmod(0o755)
    log = tmp_path / "worker.log"
    subprocess.run(
        ["bash", "-c", command],
        env={
            "HOME": str(home),
            "PATH": f"{tools}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "WORKER_LOG": str(log),
            "APT_CACHE_STATUS": "0" if in_ubuntu else "100",
        },
        check=True,
        timeout=60,
    )
    ran = log.read_text().splitlines()
    assert ran[:2] == ["apt-get -qq update", "apt-cache show python3.12"]
    assert ("add-apt-repository -y ppa:deadsnakes/ppa" in ran) == adds_ppa
    assert "apt-get -qq install -y python3.12 python3.12-venv" in ran
    assert ran[-4:] == [
        "python3.12 -m venv .venv",
        "pip install -q --upgrade pip",
        "pip install -q -e .[experiments,tpu]",
        ran[-1],
    ]
    assert ran[-1].startswith("python -c from fnnet import distributed")
    assert (home / "fnnet" / "fnnet" / "train" / "_sharding.py").is_file()


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What the pages' shell variables stand for (docs/tpu.md sets them in "Before you start").
SHELL_VARIABLES = {"PROJECT": "my-project", "ZONE": "us-west4-a", "NAME": "n", "TYPE": "v5e-4"}


def _documented_launches():
    """Each ``scripts/tpu_launch.sh ...`` line of a shell block in the docs, its
    continuation lines joined and its trailing comment dropped."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```sh\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.partition(" #")[0].strip()
                if line.startswith("scripts/tpu_launch.sh"):
                    found.append(pytest.param(line, id=f"{page.name}: {line}"))
    return found


LAUNCHES = _documented_launches()


def test_the_docs_show_every_action():
    actions = {shlex.split(p.values[0])[1] for p in LAUNCHES}
    assert actions == {"up", "run", "fetch", "down"}


@pytest.mark.parametrize("line", LAUNCHES)
def test_a_documented_launch_runs(launch, line):
    """The command as a reader pastes it, against the script and the fake gcloud."""
    args = shlex.split(string.Template(line).substitute(SHELL_VARIABLES))
    code, err, calls = launch(*args[1:])
    assert code == 0, err
    assert calls and all(c[:2] == ["compute", "tpus"] for c in calls)
    if args[1] == "run" and "--" in args:
        remote = args[args.index("--") + 1 :]
        prefix, _, sent = calls[-1][-1].partition(" && ")
        assert prefix == "--command=cd ~/fnnet" and shlex.split(sent) == remote


def test_the_settings_the_docs_name_are_the_scripts():
    """``SPOT=1``, ``RUNTIME=...`` and the like in docs/tpu.md are variables the script reads."""
    text = (ROOT / "docs" / "tpu.md").read_text()
    section = text.partition("## With the launch script")[2].partition("\n## ")[0]
    named = set(re.findall(r"`([A-Z_]+)=[^`]*`", section))
    assert {"SPOT", "RUNTIME", "PYTHON"} <= named
    script = SCRIPT.read_text()
    unread = sorted(v for v in named if "${" + v + ":-" not in script)
    assert not unread, f"docs/tpu.md names {unread}, which scripts/tpu_launch.sh never reads"
