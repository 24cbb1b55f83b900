"""Writing results: CSV tables, the markdown summary, plots, and the environment.

Everything here reads the per-run records a suite wrote, so ``python -m
experiments report`` can rebuild every summary and plot without training.
"""

from __future__ import annotations

import csv
import dataclasses
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

# Matplotlib's ten default colours (C0 to C9) and nine markers: as 10 and 9 share no
# factor, each of the first 90 names gets a pair of its own.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


@dataclasses.dataclass(frozen=True)
class Style:
    """How one model, or one model at one setting, is drawn."""

    color: str
    marker: str


def style_map(names: Iterable[str]) -> dict[str, Style]:
    """A colour and a marker of its own for each name, in order of first appearance.

    An experiment's plots all draw from one such map (``write_reports`` makes it from
    the planned runs), so a model looks the same in every plot of its experiment.
    """
    unique = list(dict.fromkeys(names))
    return {name: Style(f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, name in enumerate(unique)}


def _seeds(counts: Iterable[int]) -> str:
    """``3 seeds``, or ``2 to 3 seeds`` when runs finished different numbers."""
    counts = list(counts)
    low, high = min(counts), max(counts)
    return f"{low if low == high else f'{low} to {high}'} seed{'s' if high != 1 else ''}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax, title: str) -> None:
    """The legend beside the axes; its title says what the spread drawn is."""
    ax.legend(
        title=title,
        title_fontsize=7,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )


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
    styles: dict[str, Style] | None = None,
) -> str | None:
    """Mean over seeds of ``column`` against the step, one line per run, min-max band.

    Args:
      styles: the experiment's :func:`style_map` (default: one for these runs alone).
    """
    chosen = [c for c in curves if column in c]
    if not chosen:
        return None
    runs = [
        (run_label(members[0], labels), members)
        for _, members in groups(chosen, ["model", *labels])
    ]
    styles = styles or style_map(name for name, _ in runs)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    seeds = []
    for name, members in runs:
        style = styles[name]
        steps = sorted({m["step"] for m in members})
        values = np.array(
            [[m[column] for m in members if m["step"] == s] for s in steps], dtype=float
        )  # (steps, seeds)
        seeds.append(len({m.get("seed") for m in members}))
        ax.plot(
            steps,
            np.nanmean(values, axis=1),
            color=style.color,
            marker=style.marker,
            markevery=max(1, len(steps) // 12),  # a marker to tell runs apart, not every point
            markersize=4,
            label=name,
        )
        ax.fill_between(
            steps, np.nanmin(values, 1), np.nanmax(values, 1), alpha=0.15, color=style.color
        )
    _legend(ax, f"line: mean; band: min to max\nover {_seeds(seeds)}")
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
    styles: dict[str, Style] | None = None,
) -> str | None:
    """Mean ``y`` against mean ``x`` per run, error bars ±1 std over seeds.

    Args:
      styles: the experiment's :func:`style_map` (default: one for these runs alone).
    """
    ok = _ok(rows)
    points = []
    for _, members in groups(ok, ["model", *labels]):
        xs = mean_std([m.get(x) for m in members])
        ys = mean_std([m.get(y) for m in members])
        if not (math.isnan(xs[0]) or math.isnan(ys[0])):
            points.append((xs, ys, run_label(members[0], labels), len(members)))
    if not points:
        return None
    styles = styles or style_map(name for *_, name, _ in points)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (mx, sx), (my, sy), name, _ in points:
        style = styles[name]
        ax.errorbar(
            mx, my, xerr=sx, yerr=sy, fmt=style.marker, color=style.color, capsize=3, label=name
        )
    _legend(ax, f"error bars: ±1 std\nover {_seeds(n for *_, n in points)}")
    if logx and all(mx > 0 for (mx, _), *_ in points):
        ax.set_xscale("log")
        lo = min(mx - sx if mx > sx else mx for (mx, sx), *_ in points)
        hi = max(mx + sx for (mx, sx), *_ in points)
        if hi < 10 * lo:  # span a decade, so a labelled tick shows (and matplotlib's
            # labelling of a narrower log range can divide by a zero-width box)
            middle = math.sqrt(lo * hi)
            ax.set_xlim(middle / 10**0.5, middle * 10**0.5)
    elif logx:  # a log axis cannot show 0 (a run too short to time, say)
        xlabel += " (linear: a value is 0)"
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
    styles: dict[str, Style] | None = None,
) -> str | None:
    """Mean ± std of each ``(column, style-label)`` in ``ys`` against ``x``, a line per
    value of ``by`` (``x`` is a label column such as depth or sequence length).

    A value of ``by`` keeps its colour and marker on every line; the columns differ
    in line style (solid, dashed, dotted) and in hollow markers after the first.

    Args:
      styles: the experiment's :func:`style_map` (default: one for these values alone).
    """
    ok = _ok(rows)
    if not ok:
        return None
    lines = groups(ok, [by])
    styles = styles or style_map(str(name) for (name,), _ in lines)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    seeds = []
    for (name,), members in lines:
        style = styles[str(name)]
        xs = sorted({m[x] for m in members})
        seeds += [sum(m[x] == v for m in members) for v in xs]
        for i, ((column, what), linestyle) in enumerate(zip(ys, ("-", "--", ":"))):
            stats = [mean_std([m.get(column) for m in members if m[x] == v]) for v in xs]
            means = np.array([s[0] for s in stats])
            stds = np.array([s[1] for s in stats])
            ax.plot(
                xs,
                means,
                linestyle=linestyle,
                marker=style.marker,
                color=style.color,
                markerfacecolor=style.color if i == 0 else "white",
                label=f"{name} {what}".strip(),
            )
            ax.fill_between(xs, means - stds, means + stds, alpha=0.15, color=style.color)
    if hline is not None:
        ax.axhline(hline[0], color="gray", linestyle=":", label=hline[1])
    if logx:
        ax.set_xscale("log")
    ticks = sorted({m[x] for m in ok})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])  # the values run, not 10^k
    ax.minorticks_off()
    _legend(ax, f"line: mean; band: ±1 std\nover {_seeds(seeds)}")
    return _finish(plt, fig, ax, path, xlabel, ylabel, title)
