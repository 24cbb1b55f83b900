"""What the runner writes when a run is not at the default settings, how ``report``
rebuilds from the records that exist, its plots, and the mistakes it stops first."""

from __future__ import annotations

import importlib.util
import json
import math

import matplotlib.colors
import matplotlib.image
import matplotlib.pyplot as plt
import pytest

from experiments import _cli, _report, _suite
from experiments._config import ConfigError, TrainConfig
from experiments._experiment import discover

# One quick run shared by the tests below: --quick, then steps=20 on top of it, so
# eval_every must follow (quick's 40 steps / 20 is two evaluations: 20 / 10 keeps two).
QUICK = ["run", "architectures", "--quick", "steps=20", "models=linear,cnn", "--no-progress"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runner")
    # The checkpoints apart from the results, as on several hosts with a shared disk.
    assert _cli.main([*QUICK, "--out", str(out), "--checkpoints", f"{out}-checkpoints"]) == 0
    return out


def _results_section(summary: str) -> str:
    return summary[summary.index("## Results") : summary.index("## Plots")]


# --- report rebuilds from the records there are --------------------------------------


def test_report_with_no_arguments_keeps_the_settings_the_records_were_made_with(quick_run):
    directory = quick_run / "architectures"
    table = (directory / "results.csv").read_text()
    summary = (directory / "summary.md").read_text()
    assert _cli.main(["report", "--out", str(quick_run)]) == 0
    assert (directory / "results.csv").read_text() == table
    rebuilt = (directory / "summary.md").read_text()
    assert _results_section(rebuilt) == _results_section(summary)
    assert "| linear |" in rebuilt and "| cnn |" in rebuilt
    assert "`python -m experiments run architectures steps=20 models=linear,cnn --quick`" in rebuilt
    for name in discover():  # nothing is made for experiments that never ran
        assert (quick_run / name).exists() == (name == "architectures"), name


def test_report_at_settings_nothing_ran_at_leaves_the_summary_alone(quick_run, capsys):
    directory = quick_run / "architectures"
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    args = ["report", "architectures", "models=linear,cnn", "steps=30", "--out", str(quick_run)]
    assert _cli.main(args) == 0
    assert "nothing written" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} == before


def test_report_makes_no_folder_or_file_for_what_never_ran(tmp_path):
    assert _cli.main(["report", "--out", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none").exists()
    assert _cli.main(["report", "depth", "--out", str(tmp_path)]) == 0
    assert not any(tmp_path.iterdir())


# --- a summary says when it is not at the paper's setting ------------------------------


def test_a_quick_summary_says_it_is_not_the_papers_setting_and_does_not_compare(quick_run):
    summary = (quick_run / "architectures" / "summary.md").read_text()
    assert "**Not the paper's setting.**" in summary
    assert "steps=20 (default 6000)" in summary and "eval_every=10 (default 250)" in summary
    assert "## Reference" not in summary and "| paper |" not in summary
    assert "published accuracies" not in summary


def test_every_summary_and_row_states_the_precision_its_runs_used(quick_run):
    summary = (quick_run / "architectures" / "summary.md").read_text()
    assert "Precision of the fnnet models: float32 (compute_dtype=auto on cpu)." in summary
    rows = (quick_run / "architectures" / "results.csv").read_text().splitlines()
    column = rows[0].split(",").index("precision")
    assert {row.split(",")[column] for row in rows[1:]} == {"float32"}


def test_each_row_states_its_throughput_and_the_mfu_where_a_peak_is_known(quick_run):
    import csv
    import types

    import numpy as np

    from experiments._train import _rates

    with open(quick_run / "architectures" / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == "cnn"]
    for row in rows:  # steps=20, batch 100, seeds trained together in train_seconds
        want = 20 * 100 * int(row["seeds_in_program"]) / float(row["train_seconds"])
        assert float(row["examples_per_second"]) == pytest.approx(want, rel=0.01)
        assert row.get("mfu", "") == ""  # the CPU has no known peak
    # Where fit knew a peak: MFU over the seeds' whole training time.
    result = types.SimpleNamespace(
        seconds={"train": 2.0},
        cost={"flops_per_step": 1e9, "peak_flops": 1e12, "devices": 4},
    )
    settings = types.SimpleNamespace(steps=100, batch_size=8, seeds=2)
    tokens = types.SimpleNamespace(train=(np.zeros((10, 32), np.int32), None))
    rates = _rates(result, settings, tokens)
    assert rates == {"examples_per_second": 800.0, "tokens_per_second": 25600.0,
                     "mfu": round(1e9 * 100 / 2.0 / 4e12, 6)}  # fmt: skip


def test_compute_dtype_is_a_setting_with_three_choices_and_enters_the_fingerprint():
    with pytest.raises(ConfigError, match=r"compute_dtype='fp16' is not valid; choose one of"):
        _suite.plan(["architectures"], {"compute_dtype": "fp16"})
    (auto,) = _suite.plan(["architectures"], {"models": "mlp"})
    (low,) = _suite.plan(["architectures"], {"models": "mlp", "compute_dtype": "bfloat16"})
    assert low.runs[0].settings.compute_dtype == "bfloat16"
    assert low.runs[0].fingerprint() != auto.runs[0].fingerprint()


def _fake_records(p: _suite.Plan, out) -> None:
    """Finished records for every run of ``p``, as ``execute`` would leave them."""
    for run in p.runs:
        rows = [
            {"model": run.model, **run.labels, "seed": seed, "status": "ok",
             "test_accuracy": 0.5 + 0.01 * seed, "train_accuracy": 0.6, "params": 410,
             "steps": run.settings.steps, "train_seconds": 1.0, "compile_seconds": 1.0}
            for seed in range(2)
        ]  # fmt: skip
        curves = [
            {"step": step, "seed": seed, "test_accuracy": 0.4, "test_loss": 1.0}
            for step in range(run.settings.eval_every, run.settings.steps + 1, 1500)
            for seed in range(2)
        ]
        record = {"key": run.key, "model": run.model, "labels": run.labels,
                  "settings": {}, "task": "mnist1d", "rows": rows, "curves": curves,
                  "finished": "2026-01-01T00:00:00+00:00"}  # fmt: skip
        path = out / p.experiment.name / "runs" / f"{run.key}-{run.fingerprint()}.json"
        _report.write_atomic(path, json.dumps(record))


def test_a_run_at_the_papers_setting_still_compares_with_it(tmp_path):
    (p,) = _suite.plan(["architectures"], {"models": "linear,cnn"})  # models: not a setting
    _fake_records(p, tmp_path)
    summary = _suite.write_reports(p, tmp_path).read_text()
    assert "Not the paper's setting" not in summary
    assert "## Reference" in summary and "| paper |" in summary
    assert "Against the published accuracies, in points: linear +18.5, cnn -43.5." in summary


def test_an_overridden_experiment_without_a_paper_says_it_is_not_the_default(tmp_path):
    (p,) = _suite.plan(["depth"], {"depths": "1", "models": "mlp", "steps": "100"})
    _fake_records(p, tmp_path)
    summary = _suite.write_reports(p, tmp_path).read_text()
    assert "**Not the default setting.** Changed on the command line: steps=100 (default " in (
        summary
    )
    assert "depths=1 (default 1,2,4,8)" in summary


# --- eval_every follows steps -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "steps", "eval_every"),
    [
        ("architectures", 100, 4),  # 6000 / 250: 24 evaluations; 25 is the nearest
        ("architectures", 1000, 40),
        ("depth", 1000, 250),  # 2000 / 500: four evaluations, kept
        ("depth", 7, 7),  # a prime: the last step only
        ("shapes", 30, 5),  # 1500 / 250: six
    ],
)
def test_eval_every_follows_steps_when_only_steps_is_given(name, steps, eval_every):
    overrides = {"steps": str(steps), "models": "mlp" if name != "shapes" else "cnn"}
    (p,) = _suite.plan([name], overrides)
    assert p.config.eval_every == eval_every
    assert {(r.settings.steps, r.settings.eval_every) for r in p.runs} == {(steps, eval_every)}


def test_a_models_own_warm_up_follows_steps_too():
    # The transformer's MNIST-1D recipe warms up for 300 of its 3000 steps; a
    # 100-step run of every model warms it up for the same tenth.
    (p,) = _suite.plan(["architectures"], {"steps": "100"})
    warmup = {r.model: r.settings.warmup_steps for r in p.runs if r.classical is None}
    assert warmup["transformer"] == 10
    assert {r.settings.steps for r in p.runs if r.classical is None} == {100}
    (p,) = _suite.plan(["architectures"], {"steps": "100", "warmup_steps": "5"})
    assert {r.settings.warmup_steps for r in p.runs if r.classical is None} == {5}


def test_eval_every_of_a_quick_run_follows_its_steps(quick_run):
    config = json.loads((quick_run / "architectures" / "config.json").read_text())["config"]
    assert (config["steps"], config["eval_every"]) == (20, 10)


def test_an_explicit_eval_every_is_kept_and_must_divide_steps():
    (p,) = _suite.plan(["depth"], {"steps": "100", "eval_every": "50"})
    assert p.config.eval_every == 50
    with pytest.raises(ConfigError, match=r"eval_every \(30\) must divide steps \(100\)"):
        _suite.plan(["depth"], {"steps": "100", "eval_every": "30"})


# --- plots: one colour and marker per model in every plot, error bars named ----------


def test_the_style_map_gives_each_name_a_colour_and_marker_of_its_own():
    names = [f"model{i}" for i in range(40)]
    styles = _report.style_map(names + names[:3])
    assert list(styles) == names
    pairs = [(s.color, s.marker) for s in styles.values()]
    assert len(set(pairs)) == len(names)
    assert len({s.color for s in styles.values()}) == 10
    assert _report.style_map(["cnn", "mlp"])["mlp"] == _report.style_map(["x", "mlp"])["mlp"]


def test_every_plot_draws_a_model_alike_and_says_what_its_spread_is(quick_run, monkeypatch):
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep each figure to read back
    try:
        _suite.report(quick_run, ["architectures"], {})
    finally:
        monkeypatch.undo()
    assert len(figures) == 3
    drawn: dict[str, set] = {}
    for fig in figures:
        (ax,) = fig.axes
        legend = ax.get_legend()
        assert "over 2 seeds" in legend.get_title().get_text()
        assert any(s in legend.get_title().get_text() for s in ("±1 std", "min to max"))
        for handle, label in zip(*ax.get_legend_handles_labels()):
            line = handle[0] if isinstance(handle, tuple) else handle  # an errorbar's data line
            drawn.setdefault(label, set()).add(
                (matplotlib.colors.to_hex(line.get_color()), line.get_marker())
            )
        close(fig)
    assert set(drawn) == {"linear", "cnn"}
    assert all(len(styles) == 1 for styles in drawn.values()), drawn
    assert drawn["linear"] != drawn["cnn"]

    for name in ("learning_curves.png", "metric_vs_params.png", "metric_vs_time.png"):
        path = quick_run / "architectures" / name
        assert path.stat().st_size > 0
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels[..., :3].std() > 0.05, f"{name} looks blank"


# --- the command line: no abbreviations, no bare fields, suggestions -------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "depth", "--quick", "--seed", "2"], "option --seed; did you mean --seeds?"),
        (["report", "--qui"], "did you mean --quick?"),
        (["run", "depth", "--quick", "--ou", "x"], "did you mean --out?"),
    ],
)  # fmt: skip
def test_an_abbreviated_option_is_an_error_that_names_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        _cli.main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["depth", "steps", "100"], "'steps' is a field, not an experiment; write steps=100"),
        (["steps", "100", "depth"], "write steps=100"),
        (["depth", "steps"], "write steps=VALUE"),
        (["deph"], "unknown experiment 'deph'; valid: architectures"),
        (["deph"], "did you mean depth?"),
        (["architecture", "depth"], "did you mean architectures?"),
    ],
)
def test_a_field_without_equals_or_a_misspelt_name_fails_before_training(
    items, message, capsys, tmp_path
):
    assert _cli.main(["run", *items, "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not any(tmp_path.iterdir())


# --- TrainConfig refuses values no run could use ----------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learning_rate", math.inf, "learning_rate must be positive and finite"),
        ("learning_rate", math.nan, "learning_rate must be positive and finite"),
        ("learning_rate", 0.0, "learning_rate must be positive and finite"),
        ("weight_decay", math.inf, "weight_decay must be finite and at least 0"),
        ("weight_decay", -1e-4, "weight_decay must be finite and at least 0"),
        ("clip_norm", math.nan, "clip_norm must be finite and at least 0"),
        ("clip_norm", -1.0, "clip_norm must be finite and at least 0"),
        ("steps", 2.5, "steps must be a positive integer"),
        ("warmup_steps", -1, "warmup_steps must be an integer of at least 0"),
    ],
)
def test_train_config_refuses_non_finite_and_out_of_range_values(field, value, message):
    config = TrainConfig(models=("mlp",), **{field: value})
    with pytest.raises(ConfigError) as info:
        config.check()
    text = str(info.value)
    assert message in text and f"got {value!r}" in text and f"e.g. {field}=" in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": "inf"}, "learning_rate='inf' is not valid; expected a finite number"),
        ({"weight_decay": "nan"}, "weight_decay='nan' is not valid; expected a finite number"),
        ({"clip_norm": "-1"}, "clip_norm must be finite and at least 0 (0: no clipping"),
        ({"learning_rate": "0"}, "learning_rate must be positive and finite"),
    ],
)
def test_a_non_finite_or_out_of_range_override_fails_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        _suite.plan(["depth"], overrides)
    assert message in str(info.value)


def test_a_time_of_zero_is_drawn_on_a_linear_axis(tmp_path):
    rows = [{"model": "mlp", "seed": s, "status": "ok", "train_seconds": 0.0,
             "test_accuracy": 0.5 + 0.1 * s} for s in range(2)]  # fmt: skip
    name = _report.plot_scatter(
        tmp_path / "t.png", rows, "train_seconds", "test_accuracy", title="t",
        xlabel="training seconds", ylabel="accuracy",
    )  # fmt: skip
    assert name == "t.png" and (tmp_path / "t.png").stat().st_size > 0


@pytest.mark.parametrize("seconds", [0.022, 0.172, 0.487, 1.81])
def test_one_time_on_a_log_axis_draws_without_a_warning(tmp_path, seconds):
    # Seeds trained in one program share one time. Left to itself, matplotlib's log axis
    # around such a lone value divides by zero for these (CI met 0.172 s); the plot now
    # spans a decade around it. The suite's filterwarnings = error turns that into a failure.
    import matplotlib.image

    rows = [{"model": "mlp", "seed": s, "status": "ok", "train_seconds": seconds,
             "test_accuracy": 0.35 + 0.01 * s} for s in range(3)]  # fmt: skip
    name = _report.plot_scatter(
        tmp_path / "t.png", rows, "train_seconds", "test_accuracy", title="t",
        xlabel="training seconds", ylabel="accuracy",
    )  # fmt: skip
    image = matplotlib.image.imread(tmp_path / name)
    assert image.shape[0] > 100 and image.std() > 0  # drawn, not blank


def test_an_out_url_is_refused_before_anything_is_written(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        _cli.main(["run", "depth", "--quick", "--out", "gs://bucket/results"])
    assert exit_.value.code == 2
    assert "is a URL; --out takes a folder on disk" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_checkpoints_can_live_apart_from_the_results(quick_run):
    assert not (quick_run / "architectures" / "checkpoints").exists()
    runs = sorted((quick_run.parent / f"{quick_run.name}-checkpoints" / "architectures").iterdir())
    assert len(runs) == 2  # linear and cnn, each with its committed steps
    assert all(any(p.name.isdigit() for p in run.iterdir()) for run in runs)


def test_a_bucket_for_checkpoints_without_its_package_is_named_before_any_work(
    capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a)
    )
    code = _cli.main(["run", "depth", "--quick", "--checkpoints", "gs://bucket/ckpt"])
    assert code == 2
    assert "needs the package gcsfs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
