"""Seconds JAX spends compiling, so timings and progress can leave them out."""

from __future__ import annotations

import contextlib

import jax


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while it is running.

    Clocks nest: every clock running when a compilation event arrives counts it.
    """

    _EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )
    _active: list[CompileClock] = []
    _installed = False

    def __init__(self):
        self.seconds = 0.0

    @classmethod
    def _listen(cls, event, seconds, **_):
        if event in cls._EVENTS:
            for clock in cls._active:
                clock.seconds += seconds

    @contextlib.contextmanager
    def running(self):
        if not CompileClock._installed:
            jax.monitoring.register_event_duration_secs_listener(CompileClock._listen)
            CompileClock._installed = True
        CompileClock._active.append(self)
        try:
            yield self
        finally:
            CompileClock._active.remove(self)
