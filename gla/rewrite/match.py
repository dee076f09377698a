"""Find a pattern's canonical graph inside a canonical target graph.

Matching walks from the pattern's output backwards. A pattern placeholder is a named capture: it
binds to a node or a literal, and binds the same thing wherever it appears. ``x * y`` and ``x + y``
match in either order. A float-to-float ``cast`` in the target is transparent: the kernels compute
in fp32 anyway and verification checks the figures, so an upcast softmax matches a plain one.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import ops
from .graph import is_float_dtype, tensor_meta
from .pattern import Pattern

COMMUTATIVE = {operator.mul, operator.add}


@dataclass(eq=False)
class Match:
    pattern: Pattern
    alternative: int
    root: fx.Node
    nodes: list[fx.Node]                 # every target node the match covers, root included
    captures: dict[str, Any]             # capture name -> fx.Node or literal
    extra_nodes: list[fx.Node] = field(default_factory=list)  # consumed by the lowering (e.g. a mask)

    @property
    def kind(self) -> str:
        return self.pattern.kind

    def value(self, name: str) -> Any:
        """The example value (FakeTensor, SymInt, literal) of a capture."""
        v = self.captures.get(name)
        if isinstance(v, fx.Node):
            return v.meta.get("example_value")
        return v


@dataclass
class Miss:
    """How far a pattern got before failing: a near miss when it got far enough."""

    pattern: Pattern
    root: fx.Node
    depth: int
    at: fx.Node | None
    _expected: Any
    _found: Any

    @property
    def expected(self) -> str:
        return self._expected() if callable(self._expected) else self._expected

    @property
    def found(self) -> str:
        return self._found() if callable(self._found) else self._found


def describe_target(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op in ("call_function", "call_method"):
        t = node.target
        return t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return node.op


def _transparent(t: fx.Node) -> bool:
    if (t.op == "call_method" and t.target in ("contiguous", "clone")) or (t.op == "call_function" and t.target is torch.clone):
        return True
    if not (t.op == "call_function" and t.target is ops.cast):
        return False
    src = tensor_meta(t.args[0])
    return is_float_dtype(t.args[1]) and src is not None and src.dtype.is_floating_point


class _State:
    __slots__ = ("env", "nodes", "depth", "miss")

    def __init__(self, env=None, nodes=None):
        self.env = dict(env or {})
        self.nodes = list(nodes or [])
        self.depth = 0
        self.miss: tuple[int, Any, str, str] | None = None

    def copy(self) -> "_State":
        s = _State(self.env, self.nodes)
        s.depth, s.miss = self.depth, self.miss
        return s

    def fail(self, at, expected, found) -> bool:
        """Record the deepest failure; messages are thunks, formatted only if a near miss is reported."""
        if self.miss is None or self.depth >= self.miss[0]:
            self.miss = (self.depth, at, expected, found)
        return False


def _same_literal(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_literal(x, y) for x, y in zip(a, b))
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return False
    try:
        return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                                 and not isinstance(a, bool) and not isinstance(b, bool) and a == b)
    except Exception:
        return False


def _match_arg(p: Any, t: Any, st: _State) -> bool:
    if isinstance(p, fx.Node):
        return _match_node(p, t, st)
    if isinstance(p, (list, tuple)):
        if not isinstance(t, (list, tuple)) or len(p) != len(t):
            return st.fail(None, lambda: repr(p), lambda: repr(t))
        return all(_match_arg(a, b, st) for a, b in zip(p, t))
    return _same_literal(p, t) or st.fail(None, lambda: repr(p), lambda: repr(t))


def _match_node(p: fx.Node, t: Any, st: _State) -> bool:
    if p.op == "placeholder":
        name = p.target
        if name in st.env:
            bound = st.env[name]
            return (bound is t) or _same_literal(bound, t) or st.fail(t, lambda: f"the same {name!r} as before", lambda: describe_target(t))
        st.env[name] = t
        return True
    if not isinstance(t, fx.Node):
        return st.fail(None, lambda: describe_target(p), lambda: repr(t))
    if p.op == "get_attr":
        return st.fail(t, lambda: "a constant", lambda: describe_target(t))
    if t.op != p.op or t.target != p.target:
        if _transparent(t) and not (p.op == t.op and p.target == t.target):
            st.nodes.append(t)
            return _match_node(p, t.args[0], st)
        return st.fail(t, lambda: describe_target(p), lambda: describe_target(t))
    st.nodes.append(t)
    st.depth += 1
    if set(p.kwargs) != set(t.kwargs):
        return st.fail(t, lambda: f"{describe_target(p)} with kwargs {sorted(p.kwargs)}", lambda: f"kwargs {sorted(t.kwargs)}")
    if len(p.args) != len(t.args):
        return st.fail(t, lambda: f"{describe_target(p)} with {len(p.args)} args", lambda: f"{len(t.args)} args")
    if p.op == "call_function" and p.target in COMMUTATIVE:
        first = st.copy()
        if all(_match_arg(a, b, first) for a, b in zip(p.args, t.args)):
            st.env, st.nodes, st.depth, st.miss = first.env, first.nodes, first.depth, first.miss
            return True
        second = st.copy()
        ok = all(_match_arg(a, b, second) for a, b in zip(p.args, reversed(t.args)))
        best = second if ok or (second.miss and (not first.miss or second.miss[0] >= first.miss[0])) else first
        st.env, st.nodes, st.depth, st.miss = best.env, best.nodes, best.depth, best.miss
        return ok
    pairs = list(zip(p.args, t.args)) + [(p.kwargs[k], t.kwargs[k]) for k in p.kwargs]
    for a, b in pairs:
        if not isinstance(a, (fx.Node, list, tuple)) and not _same_literal(a, b):
            return st.fail(t, lambda: f"{describe_target(p)} with argument {a!r}", lambda: f"{b!r}")
        if not _match_arg(a, b, st):
            return False
    return True


def match_at(pattern: Pattern, alternative: int, root: fx.Node) -> Match | Miss:
    graph = pattern.graphs()[alternative]
    out = next(n for n in graph.nodes if n.op == "output")
    proot = out.args[0]
    st = _State()
    if _match_node(proot, root, st):
        # dedupe while keeping order (a node reached twice through shared subexpressions)
        seen, nodes = set(), []
        for n in st.nodes:
            if n not in seen:
                seen.add(n)
                nodes.append(n)
        return Match(pattern, alternative, root, nodes, st.env)
    depth, at, expected, found = st.miss or (0, None, "?", "?")
    return Miss(pattern, root, depth, at, expected, found)


def root_key(pattern: Pattern, alternative: int) -> tuple[str, Any]:
    graph = pattern.graphs()[alternative]
    out = next(n for n in graph.nodes if n.op == "output")
    return (out.args[0].op, out.args[0].target)


def index_graph(graph: fx.Graph) -> dict[tuple[str, Any], list[fx.Node]]:
    """Target nodes grouped by (op, target): each pattern only visits nodes that can be its root."""
    index: dict[tuple[str, Any], list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op in ("call_function", "call_method"):
            index.setdefault((n.op, n.target), []).append(n)
    return index
