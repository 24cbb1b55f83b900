"""The training benchmark's PyTorch contender: the MNIST-1D models in PyTorch eager.

Each model is written as PyTorch's own tutorials write it (``nn.Linear``,
``nn.Conv1d``, ``nn.GRU``, ``nn.MultiheadAttention``, ``nn.LayerNorm``) with the
layer sizes of ``tests/handwritten.py``'s fnnet models, trained in float32 with
``torch.optim.Adam(lr=1e-2)`` on ``F.cross_entropy``, on as many threads as the
machine has cores. Only ``bench.train`` imports this module, and only when the
``torch`` contender runs: PyTorch is in the ``bench`` extra, not the ``test`` one.

The parameter counts are fnnet's except the GRU's: ``nn.GRU`` keeps a recurrent
bias for every gate beside the input one (``b_hr`` and ``b_hz`` next to ``b_ir``
and ``b_iz``), where fnnet's cell keeps a recurrent bias for the candidate only;
the two extra biases only add to the input ones, so the model computes the same
family of functions with 2 x 6 more numbers per direction (:data:`EXTRA_PARAMS`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

try:
    import torch
except ImportError as error:  # the message bench.train's users see
    raise ImportError(
        'the torch contender needs PyTorch 2.13 (the CPU build): pip install -e ".[bench]"'
    ) from error
import torch.nn.functional as F
from torch import nn

CLASSES = 10
# Parameters nn.GRU has beyond fnnet's GRU: b_hr and b_hz (6 each) in both directions.
EXTRA_PARAMS = {"gru": 2 * 2 * 6}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden_0 = nn.Linear(40, 100)
        self.hidden_1 = nn.Linear(100, 100)
        self.out = nn.Linear(100, CLASSES)

    def forward(self, x):  # (batch, 40)
        h = F.relu(self.hidden_0(x))
        h = h + F.relu(self.hidden_1(h))
        return self.out(h)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(1, 25, 5, stride=2, padding=1),  # (batch, 25, 19)
            nn.ReLU(),
            nn.Conv1d(25, 25, 3, stride=2, padding=1),  # (batch, 25, 10)
            nn.ReLU(),
            nn.Conv1d(25, 25, 3, stride=2, padding=1),  # (batch, 25, 5)
            nn.ReLU(),
        )
        self.out = nn.Linear(5 * 25, CLASSES)

    def forward(self, x):  # (batch, 1, 40): PyTorch's channels-first layout
        return self.out(self.convs(x).flatten(1))


class GRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(1, 6, batch_first=True, bidirectional=True)
        self.out = nn.Linear(40 * 12, CLASSES)

    def forward(self, x):  # (batch, 40)
        h, _ = self.rnn(x.unsqueeze(-1))  # (batch, 40, 2 * 6)
        return self.out(h.flatten(1))


class Block(nn.Module):
    """A pre-LayerNorm block, as fnnet's: ``h + attn(ln1(h))``, then ``h + mlp(ln2(h))``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        # eps and the tanh GELU are fnnet's (and Flax's) defaults, so the math is the same.
        self.ln1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)
        )

    def forward(self, h):  # (batch, tokens, width)
        z = self.ln1(h)
        h = h + self.attn(z, z, z, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class Transformer(nn.Module):
    """Patches of ``patch`` samples as tokens, a learned position table of ``max_len``
    rows, ``depth`` blocks, mean-pooled, then a linear classifier."""

    def __init__(self, patch: int, max_len: int, width: int = 64, heads: int = 4, depth: int = 2):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, width)
        self.position = nn.Parameter(0.02 * torch.randn(max_len, width))
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width, eps=1e-6)
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x):  # (batch, 40)
        h = self.embed(x.view(x.shape[0], -1, self.patch))  # (batch, tokens, width)
        h = h + self.position[: h.shape[1]]
        h = self.blocks(h)
        return self.out(self.ln_f(h).mean(dim=1))


# Rows of the position tables: fnnet.models.transformer_classifier's default for the
# patched transformer, the signal's length for one token per sample (bench._train_baselines).
MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "gru": GRU,
    "transformer": lambda: Transformer(patch=4, max_len=512),
    "transformer_tokens": lambda: Transformer(patch=1, max_len=40),
}


def torch_input(model: str, x: np.ndarray) -> np.ndarray:
    """``bench.train.model_input``'s layout in PyTorch's: the CNN's channel axis first,
    ``(n, 40, 1) -> (n, 1, 40)``; the other models' ``(n, 40)`` as it is."""
    return np.ascontiguousarray(np.swapaxes(x, 1, 2)) if model == "cnn" else x


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TorchContender(NamedTuple):
    """``step(batch) -> loss`` (a 0-d tensor, not fetched), ``sync()`` to wait for it,
    and the model's parameter count."""

    step: Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    sync: Callable[[], None]
    params: int
    threads: int


def torch_contender(
    model: str, learning_rate: float, seed: int, *, threads: int | None = None
) -> TorchContender:
    """The model in eager mode with Adam, as PyTorch's training loop tutorial writes it,
    on ``threads`` threads (default: one per core, ``os.cpu_count()``)."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    module = MODELS[model]()
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    module.train()

    def step(batch):
        x, y = batch
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    # On the CPU eager kernels have finished when the call that launched them returns;
    # the call states the intent and stays right if the device ever changes.
    return TorchContender(
        step, torch.cpu.synchronize, count_params(module), torch.get_num_threads()
    )


def torch_batches(model: str, x: np.ndarray, y: np.ndarray, batch: int) -> list[tuple]:
    """The epoch's batches as tensors, in stored order: x float32 in PyTorch's layout,
    y int64 (what ``F.cross_entropy`` takes)."""
    x = torch_input(model, x)
    return [
        (
            torch.from_numpy(np.array(x[i * batch : (i + 1) * batch], np.float32)),
            torch.from_numpy(y[i * batch : (i + 1) * batch].astype(np.int64)),
        )
        for i in range(len(x) // batch)
    ]
