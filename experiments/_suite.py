"""Plans, runs and reports a suite of experiments.

``plan`` resolves every configuration and enumerates every run before anything
trains, so a bad field, value or model name fails in a second, not after ten
minutes. ``execute`` trains what is not finished (a finished run has a record
under ``OUT/NAME/runs/``; an unfinished one resumes from its checkpoint under
``OUT/NAME/checkpoints/``) with one progress bar for the whole suite, then
``write_reports`` turns the records into tables, plots and summaries.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from experiments import _report
from experiments._config import ConfigError, apply_overrides, changes, field_names, to_json
from experiments._experiment import Experiment, Run, discover, resolve_names
from experiments._models import MODELS
from experiments._train import train_classical, train_fnnet


@dataclasses.dataclass
class Plan:
    """One experiment's resolved configuration and runs.

    Attributes:
      overrides: the command line's ``{field: text}`` for this experiment (with
        ``--seeds`` as ``seeds``), kept in every record so ``report`` can plan again
        at the settings the records were made with.
      quick: whether ``--quick`` applied.
    """

    experiment: Experiment
    config: Any
    runs: list[Run]
    command: str
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    quick: bool = False


def plan(
    names: list[str],
    overrides: dict[str, str],
    *,
    seeds: int | None = None,
    quick: bool = False,
) -> list[Plan]:
    """Resolves configurations and runs; raises :class:`ConfigError` on anything invalid.

    An override applies to every chosen experiment whose configuration has that
    field; a field no chosen experiment has is an error.
    """
    known = discover()
    chosen = resolve_names(names, known)
    unused = set(overrides)
    if seeds is not None:
        if seeds <= 0:
            raise ConfigError(f"--seeds must be a positive integer, got {seeds}")
        overrides = {**overrides, "seeds": str(seeds)}
    plans = []
    for name in chosen:
        experiment = known[name]
        config = experiment.config
        if quick:
            config = apply_overrides(config, experiment.quick)
        mine = {k: v for k, v in overrides.items() if k in field_names(config)}
        unused -= set(mine)
        try:
            evaluations = config.steps // config.eval_every
            config = apply_overrides(config, mine)
            if "steps" in mine and "eval_every" not in mine:
                config = dataclasses.replace(
                    config, eval_every=_eval_every(config.steps, evaluations)
                )
            if hasattr(config, "check"):
                config.check()
            explicit = set(mine) | (set(experiment.quick) if quick else set())
            runs = experiment.runs(config, explicit)
            for run in runs:
                run.settings.check()
        except ConfigError as e:
            raise ConfigError(f"experiment {name}: {e}") from None
        except KeyError as e:
            raise ConfigError(f"experiment {name}: {e.args[0]}") from None
        keys = [r.key for r in runs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"experiment {name} defines two runs with the same key: {keys}")
        words = ["python -m experiments run", name, *(f"{k}={v}" for k, v in mine.items())]
        if quick:
            words.append("--quick")
        plans.append(Plan(experiment, config, runs, " ".join(words), mine, quick))
    if unused:
        valid = sorted({f for p in plans for f in field_names(p.config)})
        raise ConfigError(
            f"no chosen experiment has a field {', '.join(map(repr, sorted(unused)))}; "
            f"valid fields: {', '.join(valid)}"
        )
    return plans


def _eval_every(steps: int, evaluations: int) -> int:
    """The interval that divides ``steps`` into the number of evaluations nearest
    ``evaluations`` (the fewer on a tie), so a run with fewer or more steps keeps
    the learning curve's resolution and still evaluates on its last step."""
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: (abs(steps // d - evaluations), -d))


def _record_path(out: pathlib.Path, name: str, run: Run) -> pathlib.Path:
    return out / name / "runs" / f"{run.key}-{run.fingerprint()}.json"


def _checkpoint_dir(out: pathlib.Path, name: str, run: Run, root: str | None = None) -> Any:
    """``OUT/NAME/checkpoints/RUN``, or ``ROOT/NAME/RUN`` (a path or a URL) when given."""
    if root is not None:
        return f"{os.fspath(root).rstrip('/')}/{name}/{run.key}-{run.fingerprint()}"
    return out / name / "checkpoints" / f"{run.key}-{run.fingerprint()}"


def load_record(out: pathlib.Path, name: str, run: Run) -> dict | None:
    path = _record_path(out, name, run)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a damaged record is retrained, not trusted


def execute(
    plans: list[Plan],
    out: pathlib.Path,
    *,
    progress: bool = True,
    checkpoint_seconds: float = 30.0,
    mesh="auto",
    checkpoints: str | None = None,
) -> None:
    """Trains every unfinished run of every plan, then writes each experiment's reports.

    ``mesh`` is ``fnnet.train.fit``'s (``"auto"``: every device). ``checkpoints``
    puts the runs' checkpoints elsewhere than under ``out`` (a bucket, or a disk
    every host of a multi-host run sees). With several
    processes (``jax.distributed``) every process trains every run and saves
    checkpoints together; only process 0 shows progress and writes records, tables
    and plots, so what is left to run is what process 0 finds, told to the others.
    """
    import jax
    from jax.experimental import multihost_utils

    primary = jax.process_index() == 0
    progress = progress and primary
    every = [(p, run) for p in plans for run in p.runs]
    finished = np.array([load_record(out, p.experiment.name, run) is not None for p, run in every])
    if jax.process_count() > 1:
        finished = np.asarray(multihost_utils.broadcast_one_to_all(finished))
    todo = [pair for pair, done in zip(every, finished) if not done]
    pending = {id(run) for _, run in todo}
    total = sum(run.work for _, run in todo)
    done = sum(len(p.runs) for p in plans) - len(todo)
    bar = tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True)
    if done:
        bar.write(f"{done} finished runs found under {out}; skipping them", file=sys.stderr)
    try:
        for p in plans:
            name = p.experiment.name
            for run in p.runs:
                if id(run) not in pending:
                    continue
                bar.set_description(f"{name}/{run.key}")
                start = time.perf_counter()
                target = bar.n + run.work

                def advance(n, bar=bar, target=target):
                    bar.update(min(n, target - bar.n))

                task = run.task()
                if run.classical is not None:
                    rows, curves = train_classical(run, task, advance=advance)
                else:
                    rows, curves = train_fnnet(
                        run,
                        task,
                        _checkpoint_dir(out, name, run, checkpoints),
                        checkpoint_seconds=checkpoint_seconds,
                        advance=advance,
                        mesh=mesh,
                    )
                advance(target - bar.n)
                record = {
                    "key": run.key,
                    "model": run.model,
                    "fingerprint": run.fingerprint(),
                    "labels": run.labels,
                    "settings": to_json(run.settings),
                    "task": task.name,
                    "plan": {"overrides": p.overrides, "quick": p.quick},
                    "rows": rows,
                    "curves": curves,
                    "wall_seconds": round(time.perf_counter() - start, 3),
                    "mesh": mesh if mesh is None or isinstance(mesh, str) else dict(mesh.shape),
                    "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                }
                if primary:
                    _report.write_atomic(
                        _record_path(out, name, run), json.dumps(record, indent=1, default=float)
                    )
            if primary:
                write_reports(p, out)
    finally:
        bar.close()
    if primary:
        write_index(out)


def _recorded(out: pathlib.Path, name: str) -> tuple[dict[str, str], bool] | None:
    """The overrides and ``--quick`` of the newest finished record under
    ``OUT/NAME/runs/`` (records from before they kept them: the defaults), or None
    when there is none."""
    newest = None
    for path in sorted((out / name / "runs").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if newest is None or record.get("finished", "") > newest.get("finished", ""):
            newest = record
    if newest is None:
        return None
    recorded = newest.get("plan", {})
    return dict(recorded.get("overrides", {})), bool(recorded.get("quick", False))


def report(
    out: pathlib.Path,
    names: list[str],
    overrides: dict[str, str],
    *,
    seeds: int | None = None,
    quick: bool = False,
) -> list[str]:
    """Rebuilds summaries, tables and plots from the records under ``out``.

    With no overrides, ``--seeds`` or ``--quick``, each experiment is planned again at
    the settings its newest record was made with; with them, at those settings. An
    experiment with no finished run gets nothing written, and a ``results.csv`` (and
    its summary) is never replaced by one with fewer rows.

    Returns:
      a line per experiment saying what was written, or why nothing was.

    Raises:
      ConfigError: as :func:`plan`, before anything is written.
    """
    chosen = resolve_names(names, discover())
    if overrides or seeds is not None or quick:
        plans = plan(chosen, overrides, seeds=seeds, quick=quick)
    else:
        plans = []
        for name in chosen:
            recorded = _recorded(out, name)
            if recorded is not None:
                plans += plan([name], recorded[0], quick=recorded[1])
    lines = [f"{out / name}: no finished runs; nothing written" for name in chosen]
    for p in plans:
        directory = out / p.experiment.name
        found = sum(len(r["rows"]) for r in records(p, out))
        table = directory / "results.csv"
        kept = _report.count_rows(table) if table.exists() else 0
        if found == 0:
            line = f"{directory}: nothing written; no finished run matches `{p.command}`"
        elif found < kept:
            line = (
                f"{directory}: kept as it is; its results.csv has {kept} rows, "
                f"`{p.command}` finds {found}"
            )
        else:
            line = str(write_reports(p, out))
        lines[chosen.index(p.experiment.name)] = line
    write_index(out)
    return lines


def records(p: Plan, out: pathlib.Path) -> list[dict]:
    """The finished records of a plan's runs (missing ones are left out)."""
    found = [load_record(out, p.experiment.name, run) for run in p.runs]
    return [r for r in found if r is not None]


def write_reports(p: Plan, out: pathlib.Path) -> pathlib.Path:
    """``results.csv``, ``curves.csv``, ``config.json``, ``env.json``, plots and
    ``summary.md`` for one experiment, from its run records."""
    e = p.experiment
    directory = out / e.name
    recs = records(p, out)
    rows = [row for r in recs for row in r["rows"]]
    curves = [{"model": r["model"], **r["labels"], **c} for r in recs for c in r["curves"]]
    _report.write_csv(directory / "results.csv", rows)
    _report.write_csv(directory / "curves.csv", curves)
    config = {
        "experiment": e.name,
        "config": to_json(p.config),
        "runs": {r["key"]: {"settings": r["settings"], "task": r["task"]} for r in recs},
        "command": p.command,
        "overrides": p.overrides,
        "quick": p.quick,
    }
    _report.write_atomic(directory / "config.json", json.dumps(config, indent=1))
    env = _report.environment()
    _report.write_atomic(directory / "env.json", json.dumps(env, indent=1))

    labels = list(p.runs[0].labels) if p.runs else []
    # One colour and marker per model, then per model at a setting, from the planned
    # runs, so every plot (and every later report) draws a run the same way.
    styles = _report.style_map(
        [run.model for run in p.runs]
        + [_report.run_label({"model": run.model, **run.labels}, labels) for run in p.runs]
    )
    headline = (
        "test_bits_per_char" if any("test_bits_per_char" in r for r in rows) else ("test_accuracy")
    )
    what = "validation bits per character" if "bits" in headline else "test accuracy"
    plots = [
        _report.plot_curves(
            directory / "learning_curves.png",
            curves,
            headline,
            labels=labels,
            title=f"{e.title}: learning curves (mean over seeds; band: min to max)",
            ylabel=what,
            styles=styles,
        ),
        _report.plot_scatter(
            directory / "metric_vs_params.png",
            rows,
            "params",
            headline,
            labels=labels,
            title=f"{e.title}: {what} against size",
            xlabel="parameters (fitted numbers for scikit-learn models)",
            ylabel=what,
            styles=styles,
        ),
        _report.plot_scatter(
            directory / "metric_vs_time.png",
            rows,
            "train_seconds",
            headline,
            labels=labels,
            title=f"{e.title}: {what} against training time",
            xlabel="training seconds (all seeds in one program, compile excluded)",
            ylabel=what,
            styles=styles,
        ),
    ]
    if e.plots is not None and rows:
        plots += e.plots(p.config, rows, curves, directory, styles=styles)
    plots = [name for name in plots if name]

    missing = len(p.runs) - len(recs)
    metric_columns = [
        (c, h)
        for c, h in (
            ("test_accuracy", "test accuracy %"),
            ("translated_accuracy", "translated accuracy %"),
            ("train_accuracy", "train accuracy %"),
            ("test_bits_per_char", "validation bits/char"),
            ("train_bits_per_char", "train bits/char"),
        )
        if any(c in r for r in rows)
    ]
    percent = {c for c, _ in metric_columns if c.endswith("accuracy")}
    departures = changes(p.config, e.config)
    parts = [f"# {e.title}", "", f"**Question.** {e.question}", ""]
    if departures:
        parts += [_departure_note(p, departures), ""]
    if rows:
        parts += ["**Answer.** " + e.answer(p.config, rows), ""]
    if missing:
        parts += [f"*{missing} of {len(p.runs)} runs have not finished; rerun to complete.*", ""]
    parts += [
        "## Results",
        "",
        "Mean ± standard deviation over seeds (each seed a different initialization and "
        "data order), trained as replicas in one compiled program. *train s* is the "
        "wall time of that program for all seeds together, compilation excluded; "
        "*compile s* is the time JAX spent tracing and compiling for the run.",
        "",
        _report.summary_table(rows, ["model", *labels], metric_columns, percent=percent),
        "",
    ]
    precisions = sorted({r["precision"] for r in rows if r.get("precision")})
    if precisions:
        asked = getattr(p.config, "compute_dtype", None)
        how = f" (compute_dtype={asked} on {env['backend']})" if asked == "auto" else ""
        parts += [f"Precision of the fnnet models: {'; '.join(precisions)}{how}.", ""]
    if e.reference and not departures:  # published numbers only beside the same setting
        parts += ["## Reference", "", e.reference, ""]
    parts += ["## Plots", ""] + [f"![{n}]({n})" for n in plots] + [""]
    parts += [
        "## Rerun",
        "",
        f"`{p.command}` (the resolved configuration is in `config.json`; every row is in "
        "`results.csv`, every evaluation in `curves.csv`).",
        "",
        f"Environment: jax {env['versions'].get('jax')} on {env['backend']} "
        f"({env['device_count']} device(s), {env['cpu_count']} CPU cores), git commit "
        f"{(env['git_commit'] or 'unknown')[:10]}{' (dirty)' if env['git_dirty'] else ''}, "
        f"{env['date']}.",
        "",
    ]
    _report.write_atomic(directory / "summary.md", "\n".join(parts))
    return directory / "summary.md"


def _departure_note(p: Plan, departures: dict[str, tuple[Any, Any]]) -> str:
    """The summary's warning that these runs are not at the experiment's own setting."""
    e = p.experiment
    setting = "the paper's setting" if e.reference else "the default setting"
    changed = ", ".join(
        f"{name}={_as_text(value)} (default {_as_text(default)})"
        for name, (value, default) in departures.items()
    )
    if p.quick:
        how = "by --quick and the command line" if p.overrides else "by --quick"
    else:
        how = "on the command line"
    text = f"**Not {setting}.** Changed {how}: {changed}."
    if e.reference:
        text += " The numbers are therefore not compared with the published ones."
    return text + f" `python -m experiments run {e.name}` trains at {setting}."


def write_index(out: pathlib.Path) -> None:
    """``OUT/README.md``: every experiment with a summary, its question and files
    (none written while no experiment has a summary)."""
    known = discover()
    written = [name for name in known if (out / name / "summary.md").exists()]
    if not written:
        return
    lines = ["# Results", "", "Written by `python -m experiments`; one folder per experiment.", ""]
    for name in written:
        e, summary = known[name], out / name / "summary.md"
        when = datetime.datetime.fromtimestamp(summary.stat().st_mtime, datetime.UTC)
        files = sorted(p.name for p in (out / name).iterdir() if p.is_file())
        lines += [
            f"## [{e.title}]({name}/summary.md)",
            "",
            e.question,
            "",
            f"Updated {when.isoformat(timespec='seconds')}. Files: "
            + ", ".join(f"[{f}]({name}/{f})" for f in files),
            "",
        ]
    _report.write_atomic(out / "README.md", "\n".join(lines))


def _as_text(value: Any) -> str:
    """A field's value as it would be written on the command line."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe() -> str:
    """The text of ``python -m experiments list``."""
    known = discover()
    lines = ["Experiments (python -m experiments run NAME... | all):", ""]
    for name, e in known.items():
        lines.append(f"  {name:14s} {e.title}")
        lines.append(f"  {'':14s} {e.question}")
        fields = " ".join(f"{f}={_as_text(getattr(e.config, f))}" for f in field_names(e.config))
        lines.append(f"  {'':14s} fields: {fields}")
        lines.append("")
    lines.append("Models (the registry; a comparison on a kind of data uses every model for it):")
    lines.append("")
    for name, entry in MODELS.items():
        lines.append(f"  {name:12s} [{', '.join(entry.builders)}] {entry.description}")
    return "\n".join(lines)
