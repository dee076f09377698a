"""gla: a torch.compile backend that finds softmax attention, GLU and gating subgraphs, proves each
rewrite numerically, and lowers them to fused kernels.

    model = torch.compile(model, backend="gla")           # no import needed
    report = gla.explain(model, x)                          # what was rewritten, and why not

Public API: ``explain``, ``Report``, ``Config``, ``Pattern``, ``register_pattern``,
``unregister_pattern``, ``pattern_scope``, and ``gla.testing`` for tests.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from .config import Config, ConfigError
from .patterns.registry import pattern_scope, register_pattern, registered_patterns, unregister_pattern
from .report import Report
from .rewrite import Pattern, PatternError

__all__ = ["explain", "Report", "Config", "ConfigError", "Pattern", "PatternError", "register_pattern",
           "unregister_pattern", "registered_patterns", "pattern_scope"]
__version__ = "0.1.0"


def explain(model_or_fn: Callable, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Report:
    """Compile ``model_or_fn`` with ``backend="gla"``, run it once on the inputs, return the report.

    The report lists each rewrite (kind, source location, shapes, dtypes, kernel, verification
    figures) and each near miss with the reason it was declined. ``str(report)`` is a table.
    It resets Dynamo first (``torch._dynamo.reset()``) so the graph is compiled afresh: other
    compiled functions in the process recompile on their next call.
    """
    import torch

    from .backend import gla_backend
    from .report import collect

    backend = functools.partial(gla_backend, options=options)
    with collect() as report:
        torch._dynamo.reset()
        torch.compile(model_or_fn, backend=backend)(*args, **kwargs)
    return report
