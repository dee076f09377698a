"""From a match to what replaces it: a ``Selected`` call, or a ``Decline`` with a reason."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

from ..config import Config
from ..rewrite import Match


@dataclass
class Selected:
    fn: Callable                      # traced (or inserted as a leaf) with ``kwargs``
    kwargs: dict[str, Any]            # fx.Nodes and literals
    kernel: str                       # what runs, for the report: "gla::attention[triton]"
    extra_nodes: list[fx.Node] = field(default_factory=list)  # nodes the lowering consumed (a mask)
    absorbs: list[fx.Node] = field(default_factory=list)  # earlier gla rewrites this one re-emits (counted once)


@dataclass
class Decline:
    reason: str


def select(match: Match, config: Config) -> Selected | Decline:
    """Ask the pattern's lowering; a plain replacement function is used as it is."""
    replacement = match.pattern.replacement
    if hasattr(replacement, "select"):
        return replacement.select(match, config)
    params = inspect.signature(replacement).parameters
    kwargs = {k: v for k, v in match.captures.items() if k in params}
    name = f"{getattr(replacement, '__module__', '')}.{getattr(replacement, '__qualname__', replacement)}"
    return Selected(replacement, kwargs, name.lstrip("."))
