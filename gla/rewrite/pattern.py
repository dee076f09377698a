"""``Pattern``: what a subgraph looks like (an eager function, also its reference) and what replaces it."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch.fx as fx

from .canonicalize import canonicalize

KINDS = ("attention", "gated_attention", "glu", "gate", "linear_attention", "custom")


class PatternError(ValueError):
    """A pattern that cannot be registered, with the reason."""


@dataclass(eq=False)
class Pattern:
    """A rewrite rule as data.

    ``search`` is one eager PyTorch function, or several alternative spellings; their parameters
    are the named captures (tensors, or literals such as a scale). The first alternative doubles as
    the numerical reference. ``replacement`` takes the same parameters (an alternative may omit
    some, which then take the replacement's defaults) and is either a plain function or a lowering
    object with ``select(match, config)`` that picks a kernel or declines with a reason.
    ``guards`` are ``guard(match) -> str | None``: a string declines the match with that reason.
    ``decline`` makes a look-alike pattern: it never rewrites, it records why (a near miss).
    """

    name: str
    search: Callable | Sequence[Callable]
    replacement: Any = None
    kind: str = "custom"
    guards: Sequence[Callable[[Any], str | None]] = ()
    priority: int = 0
    decline: str | None = None
    description: str = ""
    _graphs: list[fx.Graph] | None = field(default=None, repr=False)

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise PatternError("a pattern needs a non-empty string name")
        if self.kind not in KINDS:
            raise PatternError(f"pattern {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        self.search = tuple(self.search) if isinstance(self.search, (list, tuple)) else (self.search,)
        if not self.search or not all(callable(s) for s in self.search):
            raise PatternError(f"pattern {self.name!r}: search must be a function or a list of functions")
        if self.decline is None and self.replacement is None:
            raise PatternError(f"pattern {self.name!r}: give a replacement, or decline=<reason> for a look-alike")
        if self.replacement is not None:
            self._check_signatures()
        self.guards = tuple(self.guards)

    @property
    def reference(self) -> Callable:
        return self.search[0]

    def params(self, alternative: int) -> list[str]:
        return list(inspect.signature(self.search[alternative]).parameters)

    def _check_signatures(self) -> None:
        target = self.replacement
        fn = target if not hasattr(target, "select") else getattr(target, "signature", None)
        if fn is None:
            return
        rsig = inspect.signature(fn).parameters
        for alt in self.search:
            sig = inspect.signature(alt).parameters
            extra = [p for p in sig if p not in rsig]
            missing = [p for p, v in rsig.items() if p not in sig and v.default is inspect.Parameter.empty
                       and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
            if extra or missing:
                raise PatternError(
                    f"pattern {self.name!r}: replacement signature {tuple(rsig)} does not fit search "
                    f"{alt.__name__}{tuple(sig)}: "
                    + (f"the replacement lacks {extra}" if extra else f"the search lacks {missing} (give them defaults)"))

    def graphs(self) -> list[fx.Graph]:
        """The search functions traced and canonicalized (once)."""
        if self._graphs is None:
            graphs = []
            for alt in self.search:
                try:
                    gm = fx.symbolic_trace(alt)
                except Exception as e:
                    raise PatternError(f"pattern {self.name!r}: cannot trace {alt.__name__}: {e}") from e
                canonicalize(gm)
                out = next(n for n in gm.graph.nodes if n.op == "output")
                root = out.args[0]
                if not isinstance(root, fx.Node) or root.op == "placeholder":
                    raise PatternError(f"pattern {self.name!r}: {alt.__name__} must compute something from its inputs")
                graphs.append(gm.graph)
            self._graphs = graphs
        return self._graphs
