"""The experiment runner: configurations, the quick suite end to end, divergence, resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import _cli, _suite
from experiments._config import ConfigError
from experiments._experiment import discover

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUITE = ["architectures", "depth", "ml_vs_dl", "memory", "char_lm", "shapes"]


def _run_cli(*args: str, timeout: float = 300, devices: int | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if devices is not None:  # simulated CPU devices, as a host with that many chips
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return subprocess.run(
        [sys.executable, "-m", "experiments", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _csv(path: pathlib.Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- Configuration: every mistake fails before training, naming what is valid ----------


def test_the_suite_has_the_six_experiments_in_order():
    assert list(discover()) == SUITE


def test_overrides_are_parsed_by_the_fields_types():
    (p,) = _suite.plan(["depth"], {"steps": "1000", "depths": "1,5", "shuffle": "false"})
    assert p.config.steps == 1000 and p.config.depths == (1, 5) and p.config.shuffle is False
    assert [r.key for r in p.runs] == ["mlp-depth1", "mlp-depth5", "cnn-depth1", "cnn-depth5"]
    assert all(r.settings.steps == 1000 for r in p.runs)


def test_an_override_applies_to_every_experiment_that_has_the_field():
    plans = _suite.plan(["depth", "shapes"], {"seeds": "5", "canvas": "20"})
    assert [p.config.seeds for p in plans] == [5, 5]
    assert plans[1].config.canvas == 20


def test_model_settings_apply_unless_the_user_sets_the_field():
    (p,) = _suite.plan(["architectures"], {})
    by_key = {r.key: r.settings for r in p.runs}
    assert by_key["transformer"].schedule == "cosine" and by_key["mlp"].schedule == "constant"
    (p,) = _suite.plan(["architectures"], {"schedule": "constant", "warmup_steps": "0"})
    assert {r.settings.schedule for r in p.runs} == {"constant"}


@pytest.mark.parametrize(
    ("names", "overrides", "message"),
    [
        (["architecturez"], {}, "unknown experiment 'architecturez'; valid: architectures"),
        (["depth"], {"stepz": "3"}, "no chosen experiment has a field 'stepz'; valid fields:"),
        (["depth"], {"steps": "many"}, "steps='many' is not valid; expected an integer"),
        (["depth"], {"optimizer": "rmsprop"}, "choose one of ['adam', 'adamw', 'sgd']"),
        (["depth"], {"shuffle": "maybe"}, "expected true or false"),
        (["depth"], {"eval_every": "700"}, "eval_every (700) must divide steps (2000)"),
        (["depth"], {"learning_rate": "-1"}, "learning_rate must be positive"),
        (["architectures"], {"models": "mlp,resnet"}, "unknown model 'resnet'; registered"),
        (["architectures"], {"models": "lstm"}, "cannot read MNIST-1D signals; models that can"),
        (["memory"], {"models": "cnn"}, "cannot read sequences; models that can: mlp"),
        (["ml_vs_dl"], {"datasets": "iris"}, "choose from ['breast_cancer', 'wine']"),
        (["shapes"], {"canvas": "10"}, "canvas (10) must be at least 8 + 2 * max_shift (4)"),
    ],
)
def test_bad_configurations_fail_before_training_and_say_what_is_valid(names, overrides, message):
    with pytest.raises(ConfigError) as info:
        _suite.plan(names, overrides)
    assert message in str(info.value)


def test_the_command_line_reports_a_bad_configuration_and_exits_2(capsys, tmp_path):
    code = _cli.main(["run", "depth", "depths=0", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "experiment depth: depths must be positive integers" in err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_the_architectures_answer_cites_the_grus_16_seeds_only_at_the_default_settings():
    from experiments.suite import architectures

    accuracies = (0.900, 0.918, 0.861)
    rows = [{"model": "gru", "seed": s, "test_accuracy": a} for s, a in enumerate(accuracies)]
    config = dataclasses.replace(architectures.Config(), models=("gru",))
    text = architectures.answer(config, rows)
    assert "seeds range from 86.1% to 91.8%" in text and "Over 16 seeds" in text
    # Other settings than the ones measured: the run's own spread, not the 16 seeds'.
    text = architectures.answer(dataclasses.replace(config, steps=1000), rows)
    assert "seeds range from 86.1% to 91.8%" in text and "Over 16 seeds" not in text


def test_list_shows_experiments_fields_and_the_model_registry(capsys):
    assert _cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in SUITE:
        assert name in out
    assert "steps=6000" in out and "depths=1,2,4,8" in out
    assert "transformer  [signal, sequence, text]" in out


# --- The quick suite, end to end, in a fresh process ------------------------------------


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    # The first command a user types on an 8-chip host, with the default mesh.
    out = tmp_path_factory.mktemp("quick")
    done = _run_cli("run", "--quick", "--no-progress", "--out", str(out), devices=8)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


REQUIRED = ["model", "seed", "status", "params", "train_seconds", "compile_seconds"]


@pytest.mark.parametrize("name", SUITE)
def test_quick_suite_writes_every_output(quick_suite, name):
    directory = quick_suite / name
    rows = _csv(directory / "results.csv")
    assert rows, f"{name}: results.csv is empty"
    metric = "test_bits_per_char" if name == "char_lm" else "test_accuracy"
    for row in rows:
        for column in [*REQUIRED, metric]:
            assert row.get(column) not in (None, ""), f"{name}: {column} missing in {row}"
        assert row["status"] == "ok"
        value = float(row[metric])
        assert (0 <= value <= 1) if metric == "test_accuracy" else (0 < value < 8)
    identity = list(rows[0])[: list(rows[0]).index("seed") + 1]  # model, labels, seed
    assert len({tuple(r[k] for k in identity) for r in rows}) == len(rows)

    summary = (directory / "summary.md").read_text()
    assert "**Question.**" in summary and "**Answer.**" in summary
    assert f"python -m experiments run {name}" in summary and "--quick" in summary
    config = json.loads((directory / "config.json").read_text())
    assert config["experiment"] == name and config["runs"]
    env = json.loads((directory / "env.json").read_text())
    assert env["versions"]["jax"] and env["backend"] == "cpu" and "git_commit" in env

    import matplotlib.image

    pngs = sorted(directory.glob("*.png"))
    assert {"learning_curves.png", "metric_vs_params.png", "metric_vs_time.png"} <= {
        p.name for p in pngs
    }
    for png in pngs:
        assert f"]({png.name})" in summary
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels[..., :3].std() > 0.05, f"{png} looks blank"


def test_quick_suite_index_lists_every_experiment(quick_suite):
    index = (quick_suite / "README.md").read_text()
    for name in SUITE:
        assert f"({name}/summary.md)" in index


def test_char_lm_summary_shows_sampled_text(quick_suite):
    rows = _csv(quick_suite / "char_lm" / "results.csv")
    assert len(rows[0]["sample"]) == 20
    assert rows[0]["sample"] in (quick_suite / "char_lm" / "summary.md").read_text()


def test_a_second_run_skips_finished_runs(quick_suite):
    before = {p: p.stat().st_mtime_ns for p in quick_suite.glob("*/runs/*.json")}
    done = _run_cli("run", "memory", "shapes", "--quick", "--out", str(quick_suite))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished runs found" in done.stderr
    after = {p: p.stat().st_mtime_ns for p in quick_suite.glob("*/runs/*.json")}
    assert after == before


# --- Faults: divergence, and a kill in the middle of a run ------------------------------


def test_a_diverged_run_is_reported_and_the_suite_goes_on(tmp_path):
    overrides = {"optimizer": "sgd", "learning_rate": "1e38", "models": "linear"}
    plans = _suite.plan(["architectures", "shapes"], overrides, quick=True)
    _suite.execute(plans, tmp_path, progress=False)
    for name in ("architectures", "shapes"):
        rows = _csv(tmp_path / name / "results.csv")
        assert len(rows) == 2
        for row in rows:
            assert row["status"].startswith("diverged at step "), row["status"]
            assert row["test_accuracy"] == "nan"
        summary = (tmp_path / name / "summary.md").read_text()
        assert "| linear | - | - |" in summary and "| 2 of 2 |" in summary


def test_a_killed_run_resumes_from_its_checkpoint_and_matches_an_unbroken_one(tmp_path):
    args = ["run", "architectures", "models=mlp", "steps=200", "eval_every=20", "seeds=2"]
    broken, unbroken = tmp_path / "broken", tmp_path / "unbroken"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "experiments", *args, "--no-progress"]
    process = subprocess.Popen(
        [*command, "--out", str(broken), "--checkpoint-seconds", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = broken / "architectures" / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        steps = [p for p in checkpoints.glob("*/*") if p.name.isdigit()]
        if steps and max(int(p.name) for p in steps) >= 40:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list((broken / "architectures" / "runs").glob("*.json"))

    resumed = _run_cli(*args, "--no-progress", "--out", str(broken))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The same command, never interrupted, in a fresh process of its own.
    done = _run_cli(*args, "--no-progress", "--out", str(unbroken))
    assert done.returncode == 0, done.stderr[-3000:]

    a = _csv(broken / "architectures" / "results.csv")
    b = _csv(unbroken / "architectures" / "results.csv")
    assert all(int(row["resumed_from"]) >= 40 for row in a)
    assert all(row["resumed_from"] == "" for row in b)
    for column in ("test_accuracy", "test_loss", "train_loss"):
        np.testing.assert_array_equal(
            [float(r[column]) for r in a], [float(r[column]) for r in b], err_msg=column
        )
    curve_a = _csv(broken / "architectures" / "curves.csv")
    curve_b = _csv(unbroken / "architectures" / "curves.csv")
    assert [(r["step"], r["seed"]) for r in curve_a] == [(r["step"], r["seed"]) for r in curve_b]


# --- Many devices (the suite runs with 8 simulated CPU devices) ---------------------------


@pytest.mark.parametrize("spec", ["data=2", "data=4"])
def test_runs_over_a_mesh_match_one_device(tmp_path, spec):
    """data=2: one seed per device; data=4: each seed's batch split over 4 devices."""
    from fnnet import distributed

    overrides = {"models": "mlp", "seeds": "2"}
    (plan,) = _suite.plan(["architectures"], overrides, quick=True)
    _suite.execute([plan], tmp_path / "one", progress=False, mesh=None)
    mesh = distributed.mesh_from_spec(spec)
    (plan,) = _suite.plan(["architectures"], overrides, quick=True)
    _suite.execute([plan], tmp_path / "mesh", progress=False, mesh=mesh)
    one = _csv(tmp_path / "one" / "architectures" / "results.csv")
    many = _csv(tmp_path / "mesh" / "architectures" / "results.csv")
    for column in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(
            [float(r[column]) for r in many], [float(r[column]) for r in one], rtol=2e-4
        )
    (record,) = (tmp_path / "mesh" / "architectures" / "runs").glob("*.json")
    assert json.loads(record.read_text())["mesh"] == {"data": int(spec.split("=")[1])}


def test_the_default_mesh_runs_three_seeds_of_batch_100_on_eight_devices(tmp_path, capsys):
    # The first command a user types on an 8-chip host: neither 3 seeds nor a batch
    # of 100 divide over 8 devices, so fit trains on 5 of them and says so.
    (plan,) = _suite.plan(["architectures"], {"models": "mlp", "seeds": "3"}, quick=True)
    assert plan.runs[0].settings.batch_size % 8 and 3 % 8
    _suite.execute([plan], tmp_path / "auto", progress=False)
    assert "training on" in capsys.readouterr().err
    rows = _csv(tmp_path / "auto" / "architectures" / "results.csv")
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize("devices", [1, 2, 3, 8])
def test_default_settings_place_on_any_number_of_devices(devices):
    """Every experiment's default seeds and batch find a placement on 1, 2, 3 or 8
    devices: a split, or fewer devices with a notice, never an exception."""
    import jax
    from jax.sharding import Mesh

    from fnnet import train

    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    for plan in _suite.plan(["all"], {}):
        for run in plan.runs:
            s = run.settings
            where = train.place_run(mesh, s.seeds, s.batch_size)
            if where.mesh is None:
                assert devices == 1 or where.notice, (plan.experiment.name, devices)
            elif where.notice is None:
                assert where.mesh.shape["data"] == devices


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--device", "tpu"], "tpu"), (["--mesh", "data=64"], "64"), (["--mesh", "x=2"], "data")],
)
def test_asking_for_absent_devices_is_an_error_not_a_cpu_run(capsys, tmp_path, flags, message):
    code = _cli.main(["run", "depth", "--quick", "--out", str(tmp_path), *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not any(tmp_path.iterdir())


def test_the_compile_cache_is_filled_once_and_reused(tmp_path):
    # Opt-in: the first run writes its compiled programs to the cache; a second,
    # fresh run of the same work finds every program there and adds none.
    cache = tmp_path / "cache"
    args = ("run", "architectures", "--quick", "models=linear", "seeds=1", "--no-progress",
            "--compile-cache", str(cache))  # fmt: skip
    first = _run_cli(*args, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-3000:]
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing was cached"
    second = _run_cli(*args, "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == entries
    blocker = tmp_path / "file"
    blocker.write_text("")
    refused = _run_cli("run", "architectures", "--quick", "--compile-cache", str(blocker))
    assert refused.returncode == 2
    assert "--compile-cache: compilation cache" in refused.stderr and "is a file" in refused.stderr
