"""Experiment 6: convolutions see shapes, wherever they are."""

from __future__ import annotations

import dataclasses
import functools

from experiments import _report
from experiments._config import ConfigError, TrainConfig
from experiments._experiment import Experiment, Run, settings_for
from experiments._models import models_for, reader
from experiments._tasks import digits

ORDER = 6


@dataclasses.dataclass(frozen=True)
class Config(TrainConfig):
    """scikit-learn's handwritten digits, centred on a larger canvas for training.

    Attributes:
      canvas: side of the square canvas the 8x8 digits are drawn on.
      max_shift: the largest move, in pixels along each axis, of a translated test image.
    """

    models: tuple[str, ...] = models_for("image")
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    eval_every: int = 250
    canvas: int = 16
    max_shift: int = 4

    def check(self) -> None:
        super().check()
        if self.max_shift < 0 or self.canvas < 8 + 2 * self.max_shift:
            raise ConfigError(
                f"canvas ({self.canvas}) must be at least 8 + 2 * max_shift ({self.max_shift})"
            )


def runs(config: Config, explicit: set[str]) -> list[Run]:
    out = []
    for name in config.models:
        entry = reader(name, "image", "images")
        out.append(
            Run(
                key=name,
                model=name,
                task=functools.partial(digits, config.canvas, config.max_shift),
                settings=settings_for(config, name, "image", explicit),
                build=entry.build,
            )
        )
    return out


def answer(config: Config, rows: list[dict]) -> str:
    parts, drops = [], {}
    for name in config.models:
        centred = _report.mean_of(rows, "test_accuracy", model=name)
        moved = _report.mean_of(rows, "translated_accuracy", model=name)
        drops[name] = centred - moved
        parts.append(
            f"{name} {100 * centred:.1f}% on centred digits and {100 * moved:.1f}% on "
            f"digits moved up to {config.max_shift} pixels"
        )
    text = "; ".join(parts) + ". All models saw only centred digits in training."
    if "cnn" in drops and "mlp" in drops and drops["cnn"] == drops["cnn"]:
        if drops["cnn"] < drops["mlp"]:
            text += (
                f" Moving the digits costs the CNN {100 * drops['cnn']:.1f} points and the "
                f"MLP {100 * drops['mlp']:.1f}: a convolution applies the same filter at "
                "every position and the global average forgets where a feature was, while "
                "a dense layer ties each weight to one pixel, so to an MLP a moved digit "
                "is a different input."
            )
        else:
            text += (
                f" Moving the digits costs the CNN {100 * drops['cnn']:.1f} points, no less "
                f"than the MLP's {100 * drops['mlp']:.1f}: at these settings the CNN has not "
                "learned position-free features."
            )
    return text


def plots(
    config: Config, rows: list[dict], curves: list[dict], directory, *, styles
) -> list[str | None]:
    return [
        _report.plot_curves(
            directory / "translated_curves.png",
            curves,
            "translated_accuracy",
            title="Accuracy on translated test digits during training",
            ylabel="translated test accuracy",
            styles=styles,
        )
    ]


EXPERIMENT = Experiment(
    name="shapes",
    title="Convolutions see shapes",
    question=(
        "Trained on centred handwritten digits, do a CNN and an MLP still recognise "
        "them when they are moved a few pixels?"
    ),
    config=Config(),
    runs=runs,
    answer=answer,
    plots=plots,
    quick={"steps": "40", "eval_every": "20", "seeds": "2", "models": "cnn"},
)
