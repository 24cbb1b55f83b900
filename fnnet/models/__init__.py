"""The four families of network the explainer names, each a function returning a Layer.

- feedforward: :func:`mlp`
- convolutional: :func:`cnn` (1D signals and 2D images)
- recurrent: :func:`rnn` (simple, LSTM or GRU cells; classifier or sequence to sequence)
- transformer: :func:`transformer_classifier` and the language model
  :func:`transformer_lm`, with :func:`init_cache` and :func:`generate` for decoding

Each model remembers the arguments it was built with (:func:`config_of`), and
:func:`build` rebuilds it from them, so a checkpoint can restore a model alone.
"""

from fnnet.models._cnn import cnn
from fnnet.models._config import build, config_of
from fnnet.models._mlp import mlp
from fnnet.models._rnn import rnn
from fnnet.models._transformer import generate, init_cache, transformer_classifier, transformer_lm

__all__ = [
    "build",
    "cnn",
    "config_of",
    "generate",
    "init_cache",
    "mlp",
    "rnn",
    "transformer_classifier",
    "transformer_lm",
]
