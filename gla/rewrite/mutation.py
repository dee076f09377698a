"""In-place writes in a Dynamo graph: which nodes write into a tensor, and what that forbids.

Dynamo records ``x.copy_(y)``, ``x.add_(1)``, ``x += y`` and ``x[i] = y`` as graph nodes whose
result usually has no users (DeepSeek-V3 builds its keys with ``new_empty`` and two ``copy_``
calls; a static KV cache updates with ``index_copy_``). torch.fx counts every ``call_method`` as
pure, so a plain ``eliminate_dead_code`` drops such a write and the model silently reads
uninitialized memory. Every dead-code pass in gla asks :func:`is_impure` instead.

A write also limits what may be rewritten. A rewrite replaces a matched subgraph by one call at
the position of its root; if a tensor the subgraph reads is written after the subgraph first
reads it and before its root, the call would read the new value where the original read the old
(:meth:`GraphWrites.reason`). And a tensor that is written anywhere is not what its producer
computed, so a prover (a causal mask built from ``arange``) must treat it as runtime data
(:meth:`GraphWrites.written`). Tensors are told apart by storage (their example values are
FakeTensors, and views share their base's storage), so a write through any view counts.
"""
from __future__ import annotations

import operator
import weakref
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import ops
from .graph import propagate, tensor_meta

# ``x += y`` / ``x[i] = y`` on a tensor write into x (Dynamo keeps the operator as the target)
_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem})
_OPERATORS = frozenset(v for v in vars(operator).values() if callable(v))
_INPLACE_DUNDERS = frozenset({f"__{op.__name__}__" for op in _INPLACE_OPERATORS})  # __iadd__, __setitem__ ...


def _inplace_name(name: str) -> bool:
    """``add_``, ``copy_``, ``index_copy_``, ``relu_``, ``_foreach_add_``: PyTorch's in-place suffix."""
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


def written_args(node: fx.Node) -> tuple[Any, ...]:
    """The arguments ``node`` writes into (nodes, usually one), or ``()`` for a node that writes nothing."""
    args, kwargs = node.args, node.kwargs
    out = tuple(a for a in tree_leaves(kwargs.get("out")) if isinstance(a, fx.Node)) if "out" in kwargs else ()
    if node.op == "call_method":
        return (args[:1] if _inplace_name(node.target) else ()) + out
    if node.op == "call_module":
        mod = node.graph.owning_module.get_submodule(node.target) if node.graph.owning_module else None
        return args[:1] if getattr(mod, "inplace", False) else ()
    if node.op != "call_function":
        return ()
    target = node.target
    if target in _INPLACE_OPERATORS:
        return args[:1]
    if target in _OPERATORS:  # operator.and_, operator.or_, operator.not_: not in-place, whatever the name
        return out
    if isinstance(target, torch._ops.OpOverload):
        return _schema_writes(target._schema, args, kwargs) + out
    name = getattr(target, "__name__", "")
    if isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name.rsplit("::", 1)[-1]
    if isinstance(name, str) and _inplace_name(name):
        return args[:1] + out
    if kwargs.get("inplace") is True:  # F.relu(x, inplace=True), F.dropout(..., inplace=True)
        return args[:1] + out
    return out


def _schema_writes(schema, args, kwargs) -> tuple[Any, ...]:
    written = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(a.name)
            written.extend(v for v in tree_leaves(value) if isinstance(v, fx.Node))
    return tuple(written)


def is_impure(node: fx.Node) -> bool:
    """torch.fx's own test, plus every in-place write: what no dead-code pass may remove."""
    return node.is_impure() or bool(written_args(node))


def eliminate_dead_code(graph: fx.Graph) -> None:
    """``graph.eliminate_dead_code`` that keeps in-place writes (see the module docstring)."""
    graph.eliminate_dead_code(is_impure_node=is_impure)


def storage_key(arg: Any) -> int | None:
    """The storage behind a node's example value (shared by all its views), or None if unknown.

    The storage's address: the example values keep every storage alive while a graph is rewritten."""
    t = tensor_meta(arg)
    if t is None:
        return None
    try:
        return t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - sparse, nested, some subclasses: no storage to name
        return None


class GraphWrites:
    """The writes of one graph, found once (rewrites never add or remove writes)."""

    _cache: "weakref.WeakKeyDictionary[fx.Graph, GraphWrites]" = weakref.WeakKeyDictionary()

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.writes: list[tuple[fx.Node, frozenset | None]] = []  # None: a write to an unknown storage
        for n in graph.nodes:
            targets = written_args(n)
            if targets:
                keys = [storage_key(t) for t in targets]
                self.writes.append((n, None if None in keys else frozenset(keys)))
        self.storages = set().union(*(k for _, k in self.writes if k is not None))
        self.unknown = any(k is None for _, k in self.writes)
        self._order: dict[fx.Node, int] = {}

    @classmethod
    def of(cls, graph: fx.Graph, fresh: bool = False) -> "GraphWrites":
        """The writes of ``graph``; ``fresh`` reads them again (after the graph was edited)."""
        found = None if fresh else cls._cache.get(graph)
        if found is None:
            found = cls._cache[graph] = cls(graph)
        return found

    def written(self, node: fx.Node, besides: fx.Node | None = None) -> bool:
        """Is the tensor ``node`` computes (or a view of it) written in place anywhere in the graph
        (by a node other than ``besides``)?"""
        if not self.writes or tensor_meta(node) is None:  # (sizes and other non-tensors are never written)
            return False
        key = storage_key(node)
        if besides is None:
            return self.unknown or key is None or key in self.storages
        return key is None or any(w is not besides and (keys is None or key in keys) for w, keys in self.writes)

    def _position(self, node: fx.Node) -> int:
        if node not in self._order:  # a node inserted since (a replacement): number the graph again
            self._order = {n: i for i, n in enumerate(self.graph.nodes)}
        return self._order[node]

    def reason(self, nodes: list[fx.Node], root: fx.Node, reads: list[fx.Node]) -> str | None:
        """Why one call at ``root``, reading ``reads``, may not replace ``nodes``; None if it may.

        The original reads each storage first at some node (of ``nodes``, or on a path from one of
        ``reads`` into them); the call reads it at ``root``. A write to that storage in between
        would be seen by the call and not (or only partly) by the original."""
        if not self.writes:
            return None
        pos, hi = self._position, self._position(root)
        region = set(nodes)
        outside = [r for r in dict.fromkeys(reads) if r not in region]
        lo = min(pos(n) for n in (*region, *outside))
        if not any(lo < pos(w) < hi for w, _ in self.writes):
            return None
        first: dict[Any, int] = {}  # storage -> where the original first reads it (None: unknown storage)
        for n in (*region, *self._paths(region, outside)):
            for a in (n, *n.all_input_nodes):
                if tensor_meta(a) is not None:
                    key = storage_key(a)
                    first[key] = min(first.get(key, pos(n)), pos(n))
        for w, keys in self.writes:
            at = pos(w)
            if not at < hi:
                continue
            hit = first.get(None, hi) < at or any(p < at for k, p in first.items()
                                                  if keys is None or k in keys)
            if hit:
                target = w.target if isinstance(w.target, str) else getattr(w.target, "__name__", str(w.target))
                return (f"`{w.name}` ({target}) writes in place into a tensor the pattern reads, after the "
                        f"pattern first reads it and before `{root.name}`: one fused call there would read "
                        f"the new value")
        return None

    def _paths(self, region: set[fx.Node], sources: list[fx.Node]) -> list[fx.Node]:
        """The nodes outside ``region`` on a path from one of ``sources`` into it, and the sources
        no such path joins (counted as read where they are computed)."""
        if not sources:
            return []
        pos = self._position
        floor = min(pos(s) for s in sources)
        above: set[fx.Node] = set()
        stack = [a for n in region for a in n.all_input_nodes if a not in region]
        while stack:
            a = stack.pop()
            if a in above or a in region or pos(a) < floor:
                continue
            above.add(a)
            stack.extend(a.all_input_nodes)
        srcs, on, joined = set(sources), set(), set()
        for a in sorted(above, key=pos):
            if a in srcs:
                joined.add(a)  # read by the nodes after it on the path, not where it is computed
            elif any(i in on or i in srcs for i in a.all_input_nodes):
                on.add(a)
        joined |= {i for n in region for i in n.all_input_nodes if i in srcs}
        return [*on, *(s for s in sources if s not in joined)]


# ----------------------------------------------------------------------------------------------
# Private writes, made functional
# ----------------------------------------------------------------------------------------------
# in-place spelling -> the out-of-place call computing the same value (before the cast back)
_FUNCTIONAL = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
               operator.itruediv: operator.truediv, "add_": operator.add, "sub_": operator.sub,
               "mul_": operator.mul, "div_": operator.truediv, "masked_fill_": "masked_fill"}


def functionalize_private_writes(graph: fx.Graph, fake_mode) -> int:
    """``scores += bias``, ``scores.masked_fill_(m, -inf)``, ``x *= c`` on a tensor no other node
    can see become ``scores + bias``, ``scores.masked_fill(m, -inf)``, ``x * c``, so that patterns
    match what hand-written attention computes (MPNet, T5-style ``+=`` biases). Private: the target
    is computed in the graph (not an input or buffer), and every node sharing its storage is
    itself, an in-place write into it, or a view of such a write's result (so no view of the old
    value exists). Later reads of the target read the new node; the result is cast back to the
    target's dtype, as the in-place op stores it. Returns how many were rewritten."""
    candidates = [(w, _FUNCTIONAL[w.target]) for w in graph.nodes
                  if w.op in ("call_method", "call_function") and w.target in _FUNCTIONAL]
    if not candidates:  # (most graphs: no storage bookkeeping at all)
        return 0
    sharing: dict[int, list[fx.Node]] = {}
    for n in graph.nodes:
        key = storage_key(n)
        if key is not None:
            sharing.setdefault(key, []).append(n)
    order: dict[fx.Node, float] = {n: i for i, n in enumerate(graph.nodes)}  # (inserted nodes: just before)

    done = 0
    for w, fn in candidates:
        if w.kwargs or len(w.args) != (3 if fn == "masked_fill" else 2):
            continue
        target = w.args[0]
        t = tensor_meta(target)
        # (not t._is_view(): a 4-D matmul's FakeTensor is a view of its bmm, which no node sees)
        if t is None or tensor_meta(w) is None or target.op not in ("call_function", "call_method") \
                or written_args(target):
            continue
        key = storage_key(target)
        group = sharing.get(key) if key is not None else None
        if not group:
            continue
        # (a view of the write's own result reads the new value either way: fairseq's
        # ``w += mask; w.view(B, H, T, S)``)
        views = [n for n in group if n.args and n.args[0] is w]
        if not all(n is target or _writes_into(n, key) or n in views for n in group):
            continue  # an input, a buffer, or a tensor some view or other node can see
        with graph.inserting_before(w):
            new = (graph.call_method(fn, tuple(w.args)) if isinstance(fn, str)
                   else graph.call_function(fn, tuple(w.args)))
            new.meta.update({k: w.meta[k] for k in ("stack_trace", "nn_module_stack") if k in w.meta})
            got = _propagated(new, fake_mode, w)
            if got is None or not _same_shape(got.shape, t.shape):
                graph.erase_node(new)
                continue
            if got.dtype != t.dtype:  # (the in-place op computes in the promoted dtype, stores in t's)
                new = graph.call_function(ops.cast, (new, t.dtype))
                _propagated(new, fake_mode, w)
        order[new] = order[w] - 0.5
        if new.args[0] is not target:  # the cast back: the op it casts comes before it
            order[new.args[0]] = order[w] - 0.75
        for user in list(target.users):
            if user is not w and order[user] > order[w]:  # (a later read: the new value)
                user.replace_input_with(target, new)
        w.replace_all_uses_with(new)
        graph.erase_node(w)
        # the views of the old result now view the new one: a later write into it is seen by them
        sharing.setdefault(storage_key(new), []).extend([new, *views])
        done += 1
    return done


def _writes_into(node: fx.Node, key: int) -> bool:
    args = written_args(node)
    return bool(args) and storage_key(args[0]) == key


def _propagated(node: fx.Node, fake_mode, at: fx.Node) -> torch.Tensor | None:
    try:
        propagate(node, fake_mode, at=at)
    except Exception:  # noqa: BLE001 - unknown value: the caller leaves the write as it is
        return None
    return tensor_meta(node)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))
