"""Experiment 2: is deeper always better? MLPs and CNNs of 1 to 8 hidden layers."""

from __future__ import annotations

import dataclasses
import functools

from experiments import _report
from experiments._config import ConfigError, TrainConfig
from experiments._experiment import Experiment, Run, settings_for
from experiments._tasks import mnist1d
from fnnet import models

ORDER = 2
FAMILIES = ("mlp", "cnn")


@dataclasses.dataclass(frozen=True)
class Config(TrainConfig):
    """Plain stacks (no skip connections, no normalization) at fixed width.

    Attributes:
      depths: numbers of hidden layers (MLP) or convolutions (CNN).
      width: units per hidden layer (MLP).
      channels: channels per convolution (CNN; the first has stride 2, the rest 1).
    """

    models: tuple[str, ...] = FAMILIES
    steps: int = 2000
    learning_rate: float = 3e-3
    eval_every: int = 500
    depths: tuple[int, ...] = (1, 2, 4, 8)
    width: int = 100
    channels: int = 25

    def check(self) -> None:
        super().check()
        bad = [m for m in self.models if m not in FAMILIES]
        if bad:
            raise ConfigError(f"models {bad} have no depth variant here; choose from {FAMILIES}")
        if not self.depths or min(self.depths) < 1:
            raise ConfigError(f"depths must be positive integers, got {list(self.depths)}")
        if self.width < 1 or self.channels < 1:
            raise ConfigError("width and channels must be positive")


def _build(family: str, depth: int, config: Config):
    def build(task):
        if family == "mlp":
            return models.mlp(task.num_classes, (config.width,) * depth)
        return models.cnn(
            task.num_classes,
            (config.channels,) * depth,
            kernel_size=3,
            strides=(2,) + (1,) * (depth - 1),
            padding="SAME",
            pool=None,
        )

    return build


def runs(config: Config, explicit: set[str]) -> list[Run]:
    return [
        Run(
            key=f"{family}-depth{depth}",
            model=family,
            task=functools.partial(mnist1d, 4000),
            settings=settings_for(config, "mlp" if family == "mlp" else "cnn", "signal", explicit),
            labels={"depth": depth},
            build=_build(family, depth, config),
        )
        for family in config.models
        for depth in sorted(set(config.depths))
    ]


def answer(config: Config, rows: list[dict]) -> str:
    parts = []
    for family in config.models:
        test = {
            d: _report.mean_of(rows, "test_accuracy", model=family, depth=d) for d in config.depths
        }
        fit = {
            d: _report.mean_of(rows, "train_accuracy", model=family, depth=d) for d in config.depths
        }
        finite = [d for d in test if test[d] == test[d]]
        if not finite:
            parts.append(f"every {family} diverged.")
            continue
        best = max(finite, key=lambda d: test[d])
        deepest = max(finite)
        parts.append(
            f"the {family} is best at depth {best} ({100 * test[best]:.1f}% test, "
            f"{100 * fit[best]:.1f}% train); at depth {deepest} it reaches "
            f"{100 * test[deepest]:.1f}% test and {100 * fit[deepest]:.1f}% train "
            f"(train-test gap {100 * (fit[deepest] - test[deepest]):.1f} points)"
        )
    return (
        "; ".join(parts)[0].upper()
        + "; ".join(parts)[1:]
        + ". A growing train-test gap is memorization of the 4,000 training signals; "
        "falling train accuracy is a plain stack (no skip connections, no "
        "normalization) getting harder to optimize."
    )


def plots(
    config: Config, rows: list[dict], curves: list[dict], directory, *, styles
) -> list[str | None]:
    return [
        _report.plot_lines(
            directory / "accuracy_vs_depth.png",
            rows,
            "depth",
            [("train_accuracy", "train"), ("test_accuracy", "test")],
            title="Accuracy against depth on MNIST-1D (mean ± std over seeds)",
            xlabel="hidden layers (MLP) / convolutions (CNN)",
            ylabel="accuracy",
            styles=styles,
        )
    ]


EXPERIMENT = Experiment(
    name="depth",
    title="Is deeper always better?",
    question=(
        "Do more hidden layers keep improving an MLP and a CNN on MNIST-1D at fixed "
        "width, and where does depth stop helping or start to overfit?"
    ),
    config=Config(),
    runs=runs,
    answer=answer,
    plots=plots,
    quick={"steps": "40", "eval_every": "20", "seeds": "2", "depths": "1", "models": "mlp"},
)
