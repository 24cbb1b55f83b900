"""Training: the learning loop of the explainer, pure and fast, and never losing work.

One step is forward pass, error, backpropagation and update (:func:`make_train_step`);
:func:`make_fused_steps` runs many of them in one compiled program with the data on
the device, or on batches streamed from the host (:class:`NpyBatches` reads ``.npy``
files); :func:`init_replicas` trains independent seeds side by side with
``jax.vmap``; :func:`fit` repeats the steps with logging, evaluation, early
stopping and checkpoints (:class:`CheckpointStore`) that resume exactly;
:func:`peak_flops`, :func:`matmul_flops` and :func:`mfu` say what a step costs.

Training sits on ``fnnet.models`` and the layers. ``fit`` trains on every local
device by default (``_sharding``, whose public face is ``fnnet.distributed``,
the floor above, which this package never imports).
"""

from fnnet.train._state import TrainState, init_replicas, init_state, set_hyperparams
from fnnet.train._data import batch_indices, steps_per_epoch, take_batch
from fnnet.train._step import (
    NonFiniteError,
    check_finite,
    decay_mask,
    make_fused_steps,
    make_train_step,
    run_steps_python,
)
from fnnet.train._losses import (
    LabelError,
    binary_cross_entropy,
    mean_squared_error,
    softmax_cross_entropy,
)
from fnnet.train._metrics import accuracy, top_k_accuracy
from fnnet.train._precision import Policy, apply_with_policy, policy_for_backend
from fnnet.train._evaluate import EvaluationError, evaluate, predict
from fnnet.train._inputs import ParamsError, check_labels, check_params, split_inputs
from fnnet.train._checkpoint_errors import (
    CheckpointDirectoryError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointMismatchError,
    CheckpointWarning,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
)
from fnnet.train._checkpoint import CheckpointStore, load_metadata
from fnnet.train._lock import DirectoryLock, check_checkpoint_dir
from fnnet.train._fingerprint import data_fingerprint, differences, fingerprint
from fnnet.train._clock import CompileClock
from fnnet.train._stream import NpyBatches, SourceError
from fnnet.train._cost import (
    Peak,
    compiled_flops,
    matmul_flops,
    mfu,
    peak_flops,
    transformer_lm_flops,
    xla_flops,
)
from fnnet.train._callbacks import Event, JsonLog, Progress, RestoreBest, TensorBoard
from fnnet.train._loop import (
    Checkpoints,
    EarlyStopping,
    FitResult,
    ResumeError,
    evaluate_replicas,
    fit,
    load_model,
    place_run,
)

__all__ = [
    "CheckpointError", "CheckpointExistsError", "CheckpointMismatchError", "CheckpointStore",
    "CheckpointWarning", "Checkpoints", "CompileClock", "CorruptCheckpointError", "EarlyStopping",
    "EvaluationError", "Event", "FitResult", "JsonLog", "LabelError", "NonFiniteCheckpointError",
    "NonFiniteError", "Policy", "Progress", "RestoreBest", "ResumeError", "TensorBoard",
    "TrainState",
    "accuracy", "apply_with_policy", "batch_indices", "binary_cross_entropy", "check_finite",
    "decay_mask", "evaluate", "evaluate_replicas", "fit", "init_replicas", "init_state",
    "load_metadata", "load_model",
    "make_fused_steps", "make_train_step", "mean_squared_error", "place_run", "policy_for_backend",
    "run_steps_python", "set_hyperparams", "softmax_cross_entropy", "steps_per_epoch",
    "take_batch", "top_k_accuracy",
    # What fit, evaluate and predict check of their inputs; predictions in batches.
    "ParamsError", "check_labels", "check_params", "predict", "split_inputs",
    # The run's identity: fingerprints of what determines it, and its checkpoint directory.
    "data_fingerprint", "differences", "fingerprint",
    "CheckpointDirectoryError", "CheckpointLockedError", "DirectoryLock", "check_checkpoint_dir",
    # What a step costs: its FLOPs, the device's peak, and the fraction used.
    "Peak", "compiled_flops", "matmul_flops", "mfu", "peak_flops", "transformer_lm_flops",
    "xla_flops",
    # Data streamed from the host: a reader of .npy files, and what a bad source raises.
    "NpyBatches", "SourceError",
]  # fmt: skip
