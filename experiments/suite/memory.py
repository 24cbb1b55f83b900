"""Experiment 4: do recurrent networks remember? Recall a marked token across a delay."""

from __future__ import annotations

import dataclasses
import functools

from experiments import _report
from experiments._config import ConfigError, TrainConfig
from experiments._experiment import Experiment, Run, settings_for
from experiments._models import models_for, reader
from experiments._tasks import recall

ORDER = 4


@dataclasses.dataclass(frozen=True)
class Config(TrainConfig):
    """Recall: one token of a random sequence is marked in the first half; name it at
    the end. Chance is 1/8.

    Attributes:
      lengths: sequence lengths (the answer must be carried at least half of it).
      num_train: training sequences per length.
    """

    models: tuple[str, ...] = models_for("sequence")
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 3e-3
    clip_norm: float = 1.0
    eval_every: int = 250
    seeds: int = 2
    lengths: tuple[int, ...] = (10, 20, 40)
    num_train: int = 8000

    def check(self) -> None:
        super().check()
        if not self.lengths or min(self.lengths) < 2:
            raise ConfigError(f"lengths must be at least 2, got {list(self.lengths)}")
        if self.num_train < self.batch_size:
            raise ConfigError(f"num_train {self.num_train} < batch_size {self.batch_size}")


def runs(config: Config, explicit: set[str]) -> list[Run]:
    out = []
    for name in config.models:
        entry = reader(name, "sequence", "sequences")
        for length in sorted(set(config.lengths)):
            out.append(
                Run(
                    key=f"{name}-len{length}",
                    model=name,
                    task=functools.partial(recall, length, config.num_train),
                    settings=settings_for(config, name, "sequence", explicit),
                    labels={"length": length},
                    build=entry.build,
                )
            )
    return out


def answer(config: Config, rows: list[dict]) -> str:
    lengths = sorted(set(config.lengths))
    parts = []
    for name in config.models:
        accs = [_report.mean_of(rows, "test_accuracy", model=name, length=n) for n in lengths]
        held = [n for n, a in zip(lengths, accs) if a == a and a >= 0.9]
        reach = f"recalls at 90%+ up to length {max(held)}" if held else "never reaches 90%"
        parts.append(
            f"{name} {reach} ({', '.join(f'{100 * a:.0f}%' for a in accs)} at lengths "
            f"{', '.join(map(str, lengths))})"
        )
    return (
        "; ".join(parts)
        + ". Chance is 12.5%. What to look for: a gated cell (LSTM, GRU) can keep the "
        "token in its state across the delay, where a plain tanh RNN's gradient fades; "
        "attention looks back at the marked step directly; an MLP must learn every "
        "(position, token) pair separately, so longer sequences cost it more."
    )


def plots(
    config: Config, rows: list[dict], curves: list[dict], directory, *, styles
) -> list[str | None]:
    return [
        _report.plot_lines(
            directory / "accuracy_vs_length.png",
            rows,
            "length",
            [("test_accuracy", "")],
            title="Recall accuracy against sequence length (mean ± std over seeds)",
            xlabel="sequence length (the delay is at least half of it)",
            ylabel="test accuracy",
            logx=True,
            hline=(1 / 8, "chance"),
            styles=styles,
        )
    ]


EXPERIMENT = Experiment(
    name="memory",
    title="Do recurrent networks remember?",
    question=(
        "Which networks can carry information across a growing delay: an MLP, a "
        "simple RNN, an LSTM, a GRU or a Transformer, asked to recall a marked token "
        "5 to 40 steps later?"
    ),
    config=Config(),
    runs=runs,
    answer=answer,
    plots=plots,
    quick={
        "steps": "40",
        "eval_every": "20",
        "seeds": "2",
        "lengths": "8",
        "models": "simple_rnn",
        "num_train": "512",
        "warmup_steps": "5",
    },
)
