"""Writing results: CSV tables, the markdown summary, plots, and the environment.

Everything here reads the per-run records a suite wrote, so ``python -m
experiments report`` can rebuild every summary and plot without training.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import pathlib
import platform
import subprocess
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any

import numpy as np

PACKAGES = ("fnnet", "jax", "jaxlib", "optax", "flax", "orbax-checkpoint", "numpy",
            "scikit-learn", "mnist1d", "matplotlib")  # fmt: skip


# --- Files ---------------------------------------------------------------------------


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename, so a crash
    leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(path: pathlib.Path, rows: Sequence[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
    os.replace(tmp, path)


def count_rows(path: pathlib.Path) -> int:
    """The number of rows (not counting the header) of a CSV file."""
    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def environment() -> dict[str, Any]:
    """Package versions, the device, the machine and the git commit."""
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    root = pathlib.Path(__file__).resolve().parent.parent
    commit = dirty = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    devices = jax.devices()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


# --- Tables --------------------------------------------------------------------------


def _ok(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("status", "ok") == "ok"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite values."""
    xs = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if xs.size == 0:
        return math.nan, math.nan
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0


def format_mean_std(values: Sequence[float], *, percent: bool = False, digits: int = 2) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    if percent:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def groups(rows: Sequence[dict], by: Sequence[str]) -> list[tuple[tuple, list[dict]]]:
    """Rows grouped by the values of ``by``, in order of first appearance."""
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(tuple(row.get(k) for k in by), []).append(row)
    return list(out.items())


def markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in body]
    return "\n".join(lines)


def summary_table(
    rows: Sequence[dict],
    by: Sequence[str],
    metrics: Sequence[tuple[str, str]],
    *,
    percent: Iterable[str] = (),
) -> str:
    """One line per group: ``by`` values, each metric as mean ± std over the seeds that
    finished, the parameters, training and compile seconds, and seeds diverged.

    Args:
      metrics: ``(column, heading)`` pairs.
      percent: columns shown as percentages.
    """
    percent = set(percent)
    header = [*by, *(h for _, h in metrics), "params", "train s", "compile s", "diverged"]
    body = []
    for key, members in groups(rows, by):
        ok = _ok(members)
        line = ["-" if k is None else k for k in key]
        for column, _ in metrics:
            line.append(format_mean_std([r.get(column) for r in ok], percent=column in percent))
        params = members[0].get("params")
        line.append(f"{params:,}" if isinstance(params, int) else "-")
        line.append(f"{mean_std([r['train_seconds'] for r in members])[0]:.1f}")
        line.append(f"{mean_std([r['compile_seconds'] for r in members])[0]:.1f}")
        line.append(f"{len(members) - len(ok)} of {len(members)}")
        body.append(line)
    return markdown_table(header, body)


def mean_of(rows: Sequence[dict], column: str, **where: Any) -> float:
    """The mean of ``column`` over the finished rows matching ``where``."""
    chosen = [r for r in _ok(rows) if all(r.get(k) == v for k, v in where.items())]
    return mean_std([r.get(column) for r in chosen])[0]


# --- Plots ---------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: pathlib.Path, xlabel: str, ylabel: str, title: str) -> str:
    """Labels, grid and layout; writes the PNG and closes the figure. Returns its name."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def run_label(row: dict, labels: Sequence[str]) -> str:
    extra = ", ".join(f"{k}={row[k]}" for k in labels if row.get(k) is not None)
    return f"{row['model']} ({extra})" if extra else str(row["model"])


def plot_curves(
    path: pathlib.Path,
    curves: Sequence[dict],
    column: str,
    *,
    labels: Sequence[str] = (),
    title: str,
    ylabel: str,
) -> str | None:
    """Mean over seeds of ``column`` against the step, one line per run, min-max band."""
    chosen = [c for c in curves if column in c]
    if not chosen:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    # One colour per model; runs of the same model differ in line style and marker.
    models = list(dict.fromkeys(c["model"] for c in chosen))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "D", "x"]
    seen: dict[str, int] = {}
    for _, members in groups(chosen, ["model", *labels]):
        model = members[0]["model"]
        k = seen[model] = seen.get(model, -1) + 1
        color = plt.cm.tab10(models.index(model) % 10)
        steps = sorted({m["step"] for m in members})
        values = np.array(
            [[m[column] for m in members if m["step"] == s] for s in steps], dtype=float
        )
        ax.plot(
            steps,
            np.nanmean(values, axis=1),
            linestyle=styles[k % len(styles)],
            marker=markers[(k // len(styles)) % len(markers)] if len(steps) < 30 else None,
            markersize=3,
            color=color,
            label=run_label(members[0], labels),
        )
        ax.fill_between(steps, np.nanmin(values, 1), np.nanmax(values, 1), alpha=0.15, color=color)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _finish(plt, fig, ax, path, "training step", ylabel, title)


def plot_scatter(
    path: pathlib.Path,
    rows: Sequence[dict],
    x: str,
    y: str,
    *,
    labels: Sequence[str] = (),
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = True,
) -> str | None:
    """Mean ``y`` against mean ``x`` per run (error bars: std over seeds), annotated."""
    ok = _ok(rows)
    points = []
    for _, members in groups(ok, ["model", *labels]):
        xs = mean_std([m.get(x) for m in members])
        ys = mean_std([m.get(y) for m in members])
        if not (math.isnan(xs[0]) or math.isnan(ys[0])):
            points.append((xs, ys, run_label(members[0], labels)))
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (mx, sx), (my, sy), name in points:
        ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", capsize=3)
        ax.annotate(name, (mx, my), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if logx:
        ax.set_xscale("log")
    return _finish(plt, fig, ax, path, xlabel, ylabel, title)


def plot_lines(
    path: pathlib.Path,
    rows: Sequence[dict],
    x: str,
    ys: Sequence[tuple[str, str]],
    *,
    by: str = "model",
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    hline: tuple[float, str] | None = None,
) -> str | None:
    """Mean ± std of each ``(column, style-label)`` in ``ys`` against ``x``, a line per
    value of ``by`` (``x`` is a label column such as depth or sequence length)."""
    ok = _ok(rows)
    if not ok:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-o", "--s", ":^"]
    for (name,), members in groups(ok, [by]):
        xs = sorted({m[x] for m in members})
        color = None
        for (column, what), style in zip(ys, styles):
            stats = [mean_std([m.get(column) for m in members if m[x] == v]) for v in xs]
            means = np.array([s[0] for s in stats])
            stds = np.array([s[1] for s in stats])
            label = f"{name} {what}".strip()
            (line,) = ax.plot(xs, means, style, label=label, color=color)
            color = line.get_color()
            ax.fill_between(xs, means - stds, means + stds, alpha=0.15, color=color)
    if hline is not None:
        ax.axhline(hline[0], color="gray", linestyle=":", label=hline[1])
    if logx:
        ax.set_xscale("log")
    ticks = sorted({m[x] for m in ok})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])  # the values run, not 10^k
    ax.minorticks_off()
    ax.legend(fontsize=8)
    return _finish(plt, fig, ax, path, xlabel, ylabel, title)
