"""The ``torch.compile`` backend: ``torch.compile(model, backend="gla", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so ``backend="gla"``
resolves without importing gla. This module registers nothing itself: a second registration
would collide with the entry point.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from .config import Config
from .pipeline import rewrite_graph
from .report import publish


def gla_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                mode: str | None = None) -> Callable:
    """Rewrite attention, GLU and gating subgraphs into gla ops, then hand the graph to ``inner``.

    ``mode`` is torch.compile's own mode (e.g. "max-autotune"), passed on to Inductor; gla's
    ``exact``/``linearize`` choice is ``options["mode"]``.
    """
    config = Config.from_options(options)
    if config.mode == "linearize":
        raise NotImplementedError("gla: mode='linearize' (softmax attention → gated linear attention) is "
                                  "planned but not implemented in this version; use mode='exact'")
    report = rewrite_graph(gm, config)
    publish(report)
    return _inner(config.inner, mode)(gm, example_inputs)


def _inner(name: str, mode: str | None) -> Callable:
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = torch._inductor.list_mode_options(mode) if mode else {}
        return lambda gm, ex: compile_fx(gm, ex, config_patches=patches or None)
    if name == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")
    return lambda gm, ex: gm.forward
