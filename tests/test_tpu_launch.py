"""scripts/tpu_launch.sh, run against a fake ``gcloud`` that records its calls.

No TPU and no Google Cloud account are involved: the fake answers
``queued-resources describe`` from a script of states and records every call,
so the tests check which gcloud commands the launcher issues, in what order.
"""

from __future__ import annotations

import json
import os
import pathlib
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
            **{k: v for k, v in os.environ.items() if k != "GCLOUD"},
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
    assert "python3.11 -m venv .venv" in command and "'jax[tpu]'" in command
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
