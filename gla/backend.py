"""The ``torch.compile`` backend: ``torch.compile(model, backend="gla", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so ``backend="gla"``
resolves without importing gla. This module registers nothing itself: a second registration
would collide with the entry point.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from .config import Config, ConfigError
from .pipeline import rewrite_graph
from .report import publish


def gla_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                mode: str | None = None) -> Callable:
    """Rewrite attention, GLU and gating subgraphs into gla ops, then hand the graph to ``inner``.

    ``mode`` is torch.compile's own mode (e.g. "reduce-overhead"), passed on to Inductor; with
    gla's options it is ``options["inductor_mode"]`` (torch.compile takes one or the other). gla's
    ``exact``/``linearize`` choice is ``options["mode"]``.
    """
    config = Config.from_options(options)
    if config.inductor_mode is not None:
        if mode is not None and mode != config.inductor_mode:
            raise ConfigError(f"gla: torch.compile mode={mode!r} and option "
                              f"inductor_mode={config.inductor_mode!r} disagree; give one")
        mode = config.inductor_mode
    if mode not in (None, "default") and config.inner != "inductor":
        raise ConfigError(f"gla: mode {mode!r} is Inductor's; it has no meaning with inner={config.inner!r}")
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
