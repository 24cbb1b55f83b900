"""Experiment 5: the architecture behind GPT, as a character-level language model."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _report
from experiments._config import ConfigError, TrainConfig
from experiments._experiment import Experiment, Run, settings_for
from experiments._models import models_for, reader
from experiments._tasks import pydoc_text

ORDER = 5
PROMPT_OFFSET = 1000  # where in the validation text the sampling prompt starts
# Measured before the embedding fix: `python -m experiments run char_lm models=transformer`
# at commit 712ac16 (the default 2 seeds and 1000 steps).
_BEFORE_BITS = 2.63


@dataclasses.dataclass(frozen=True)
class Config(TrainConfig):
    """Next-character prediction on CPython's pydoc reference text.

    Attributes:
      context: characters per training window (and the model's window when sampling).
      sample_chars: characters sampled after a validation prompt, for the summary.
      temperature: sampling temperature.
    """

    models: tuple[str, ...] = models_for("text")
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-3
    eval_every: int = 250
    seeds: int = 2
    context: int = 64
    sample_chars: int = 200
    temperature: float = 0.8

    def check(self) -> None:
        super().check()
        if self.context < 8:
            raise ConfigError(f"context must be at least 8, got {self.context}")
        if self.sample_chars < 0 or not self.temperature > 0:
            raise ConfigError("sample_chars must be >= 0 and temperature > 0")


def _sampler(config: Config):
    """``after`` hook: each seed continues the same validation prompt.

    The model sees a sliding window of the last ``context`` characters and the
    next character is drawn from its last position's distribution; the same
    procedure serves the LSTM and the Transformer.
    """

    def after(model, params, task):
        ids = task.tests["test"][0].reshape(-1)
        prompt = jnp.asarray(ids[PROMPT_OFFSET : PROMPT_OFFSET + config.context])
        vocab = task.info["vocab"]

        @jax.jit
        def sample(p, key):
            def step(window, key):
                logits = model.apply(p, window)[-1] / config.temperature
                nxt = jax.random.categorical(key, logits).astype(window.dtype)
                return jnp.concatenate([window[1:], nxt[None]]), nxt

            keys = jax.random.split(key, config.sample_chars)
            return jax.lax.scan(step, prompt, keys)[1]

        out = []
        replicas = jax.tree.leaves(params)[0].shape[0]
        for r in range(replicas):
            p = jax.tree.map(lambda a, r=r: a[r], params)
            chars = np.asarray(sample(p, jax.random.key(r)))
            out.append(
                {
                    "prompt": "".join(vocab[i] for i in np.asarray(prompt)),
                    "sample": "".join(vocab[i] for i in chars),
                }
            )
        return out

    return after


def runs(config: Config, explicit: set[str]) -> list[Run]:
    out = []
    for name in config.models:
        entry = reader(name, "text", "text (it is not a language model)")
        out.append(
            Run(
                key=name,
                model=name,
                task=functools.partial(pydoc_text, config.context),
                settings=settings_for(config, name, "text", explicit),
                build=entry.build,
                after=_sampler(config) if config.sample_chars else None,
            )
        )
    return out


def answer(config: Config, rows: list[dict]) -> str:
    scores = {m: _report.mean_of(rows, "test_bits_per_char", model=m) for m in config.models}
    ranked = sorted((m for m in scores if scores[m] == scores[m]), key=lambda m: scores[m])
    sizes = {r["model"]: r["params"] for r in rows}
    times = {r["model"]: r["train_seconds"] for r in rows}
    text = "Validation bits per character (lower is better; 8 would be raw bytes): " + ", ".join(
        f"{m} {scores[m]:.2f} ({sizes[m]:,} parameters, {times[m]:.0f} s)" for m in ranked
    )
    if ranked:
        text += f". After {config.steps} steps of {config.batch_size} windows, {ranked[0]} "
        text += "predicts the held-out reference text best"
    text += "."
    if "transformer" in scores:
        vocab = len(pydoc_text(config.context).info["vocab"])
        text += (
            "\n\nThe Transformer's token table, tied to its output layer, is drawn with "
            "standard deviation 0.02 as GPT-2's is, so it starts at a next-character loss of "
            f"about ln({vocab}) = {np.log(vocab):.1f} nats. Until fnnet drew that table with "
            "standard deviation 1, its tied logits started with a standard deviation of about "
            "sqrt(features) and a first loss of about 44 nats (measured on random windows at "
            "commit 712ac16)."
        )
        if dataclasses.replace(config, models=Config().models) == Config():
            text += (
                f" In this default setting it then reached {_BEFORE_BITS} bits per character "
                f"(commit 712ac16), against {scores['transformer']:.2f} now."
            )
    samples = [r for r in rows if r.get("seed") == 0 and r.get("sample")]
    if samples:
        text += "\n\n### Samples\n\nEach model continues the same validation prompt "
        text += f"(temperature {config.temperature}, seed 0):\n\n"
        text += "Prompt:\n\n```text\n" + samples[0]["prompt"] + "\n```\n"
        for r in samples:
            text += f"\n{r['model']}:\n\n```text\n{r['sample']}\n```\n"
    return text


EXPERIMENT = Experiment(
    name="char_lm",
    title="The architecture behind GPT: a character-level language model",
    question=(
        "Trained to predict the next character of Python's own reference text, does a "
        "small decoder-only Transformer beat an LSTM of similar size, and what does "
        "each write?"
    ),
    config=Config(),
    runs=runs,
    answer=answer,
    quick={
        "steps": "20",
        "eval_every": "10",
        "seeds": "1",
        "models": "transformer",
        "warmup_steps": "2",
        "context": "16",
        "sample_chars": "20",
    },
)
