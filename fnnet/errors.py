"""Errors for layer authors: fail with a message that names the layer and its path.

Inside a model, every child runs under its name, so a :class:`LayerError` raised
with :func:`fail` reads ``dense at 'encoder/hidden': expected ... got ...``.
Validate hyperparameters when the layer is built (:func:`positive_int`,
:func:`rate`) and inputs when it is called (:func:`check`, :func:`fail`).
"""

from fnnet._src.errors import LayerError, check, current_path, fail, positive_int, rate

__all__ = ["LayerError", "check", "current_path", "fail", "positive_int", "rate"]
