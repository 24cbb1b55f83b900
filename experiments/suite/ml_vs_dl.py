"""Experiment 3: deep learning against classical machine learning.

(a) MNIST-1D accuracy against the size of the training set, for the linear
model, the MLP and the CNN. (b) Tabular data bundled with scikit-learn: fnnet's
MLP and linear model against scikit-learn's logistic regression, random forest
and gradient boosting.
"""

from __future__ import annotations

import dataclasses
import functools

from experiments import _report
from experiments._config import ConfigError, TrainConfig
from experiments._experiment import Experiment, Run, settings_for
from experiments._models import models_for, reader
from experiments._tasks import TABULAR, mnist1d_subset, tabular

ORDER = 3


def _logistic_regression(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=5000)


def _random_forest(seed: int):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=200, random_state=seed)


def _gradient_boosting(seed: int):
    from sklearn.ensemble import GradientBoostingClassifier

    return GradientBoostingClassifier(random_state=seed)


CLASSICAL = {
    "logistic_regression": _logistic_regression,
    "random_forest": _random_forest,
    "gradient_boosting": _gradient_boosting,
}


@dataclasses.dataclass(frozen=True)
class Config(TrainConfig):
    """(a) uses the TrainConfig fields; (b) its own ``tabular_*`` fields.

    Attributes:
      train_sizes: MNIST-1D training-set sizes (subsets of one 16,000-signal draw).
      datasets: scikit-learn bundled tables (``breast_cancer``, ``wine``).
      tabular_models: fnnet models for the tables.
      classical_models: scikit-learn models for the tables.
      tabular_steps, tabular_batch_size, tabular_learning_rate: fnnet training on tables.
    """

    models: tuple[str, ...] = ("linear", "mlp", "cnn")
    steps: int = 2000
    learning_rate: float = 3e-3
    eval_every: int = 500
    train_sizes: tuple[int, ...] = (500, 1000, 4000, 16000)
    datasets: tuple[str, ...] = TABULAR
    tabular_models: tuple[str, ...] = models_for("tabular")
    classical_models: tuple[str, ...] = tuple(CLASSICAL)
    tabular_steps: int = 600
    tabular_batch_size: int = 32
    tabular_learning_rate: float = 1e-3

    def check(self) -> None:
        super().check()
        for size in self.train_sizes:
            if not 0 < size <= 16000:
                raise ConfigError(f"train_sizes must lie in [1, 16000], got {size}")
            if size < self.batch_size:
                raise ConfigError(f"train size {size} is smaller than batch_size {self.batch_size}")
        unknown = [d for d in self.datasets if d not in TABULAR]
        if unknown:
            raise ConfigError(f"datasets {unknown} unknown; choose from {list(TABULAR)}")
        unknown = [m for m in self.classical_models if m not in CLASSICAL]
        if unknown:
            raise ConfigError(f"classical_models {unknown} unknown; choose from {list(CLASSICAL)}")
        if self.tabular_steps <= 0 or self.tabular_batch_size <= 0:
            raise ConfigError("tabular_steps and tabular_batch_size must be positive")
        if not self.tabular_learning_rate > 0:
            raise ConfigError("tabular_learning_rate must be positive")


def runs(config: Config, explicit: set[str]) -> list[Run]:
    out = []
    for name in config.models:
        entry = reader(name, "signal", "MNIST-1D signals")
        for size in sorted(set(config.train_sizes)):
            out.append(
                Run(
                    key=f"{name}-n{size}",
                    model=name,
                    task=functools.partial(mnist1d_subset, size),
                    settings=settings_for(config, name, "signal", explicit),
                    labels={"data": "mnist1d", "train_size": size},
                    build=entry.build,
                )
            )
    tab = {
        "steps": config.tabular_steps,
        "batch_size": config.tabular_batch_size,
        "learning_rate": config.tabular_learning_rate,
        "eval_every": config.tabular_steps,
        "warmup_steps": 0,
    }
    for dataset in config.datasets:
        for name in config.tabular_models:
            entry = reader(name, "tabular", "tables")
            out.append(
                Run(
                    key=f"{name}-{dataset}",
                    model=name,
                    task=functools.partial(tabular, dataset),
                    settings=settings_for(config, name, "tabular", explicit, **tab),
                    labels={"data": dataset, "train_size": None},
                    build=entry.build,
                )
            )
        for name in config.classical_models:
            out.append(
                Run(
                    key=f"{name}-{dataset}",
                    model=name,
                    task=functools.partial(tabular, dataset),
                    settings=settings_for(config, "linear", "tabular", explicit, **tab),
                    labels={"data": dataset, "train_size": None},
                    classical=CLASSICAL[name],
                )
            )
    return out


def answer(config: Config, rows: list[dict]) -> str:
    sizes = sorted(set(config.train_sizes))
    small, large = sizes[0], sizes[-1]
    parts = []
    for name in config.models:
        a = _report.mean_of(rows, "test_accuracy", model=name, train_size=small)
        b = _report.mean_of(rows, "test_accuracy", model=name, train_size=large)
        parts.append(f"{name} {100 * a:.1f}% -> {100 * b:.1f}% ({100 * (b - a):+.1f} points)")
    text = f"(a) From {small:,} to {large:,} MNIST-1D training signals: {', '.join(parts)}. "
    tables = []
    for dataset in config.datasets:
        scores = {
            m: _report.mean_of(rows, "test_accuracy", model=m, data=dataset)
            for m in (*config.tabular_models, *config.classical_models)
        }
        ranked = sorted((m for m in scores if scores[m] == scores[m]), key=lambda m: -scores[m])
        tables.append(f"on {dataset}, " + ", ".join(f"{m} {100 * scores[m]:.1f}%" for m in ranked))
    text += "(b) Test accuracy on the tables, best first: " + "; ".join(tables) + "."
    return text


def plots(
    config: Config, rows: list[dict], curves: list[dict], directory, *, styles
) -> list[str | None]:
    return [
        _report.plot_lines(
            directory / "accuracy_vs_train_size.png",
            [r for r in rows if r.get("data") == "mnist1d"],
            "train_size",
            [("test_accuracy", "test")],
            title="MNIST-1D test accuracy against training-set size",
            xlabel="training signals",
            ylabel="test accuracy",
            logx=True,
            styles=styles,
        )
    ]


EXPERIMENT = Experiment(
    name="ml_vs_dl",
    title="Deep learning against machine learning",
    question=(
        "When does a neural network beat a classical model? (a) As the training set "
        "grows, on MNIST-1D; (b) on small structured (tabular) datasets, against "
        "scikit-learn's logistic regression, random forest and gradient boosting."
    ),
    config=Config(),
    runs=runs,
    answer=answer,
    plots=plots,
    quick={
        "steps": "40",
        "eval_every": "20",
        "seeds": "2",
        "train_sizes": "200",
        "models": "linear",
        "datasets": "wine",
        "tabular_steps": "20",
        "tabular_models": "mlp",
        "classical_models": "random_forest",
    },
)
