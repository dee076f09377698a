"""Splice a replacement into the graph in place of a match."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.proxy import GraphAppendingTracer, Proxy
from torch.utils._pytree import tree_map

from .autocast import state_key
from .graph import fake_mode_of, propagate, tensor_meta
from .match import Match


class ReplacementError(ValueError):
    pass


_leaf_meta: dict[Any, Any] = {}


def _meta_key(a: Any) -> Any:
    v = a.meta.get("example_value") if isinstance(a, fx.Node) else a
    if isinstance(v, torch.Tensor):
        return ("T", repr(tuple(v.shape)), repr(v.stride()), v.dtype, v.device, v.requires_grad)
    if isinstance(a, fx.Node):
        return ("N", repr(v))
    return ("L", repr(v))


def _cached_meta(node: fx.Node, fake_mode, at: fx.Node) -> bool:
    """A leaf call whose inputs look exactly like an earlier one's (the next layer) reuses its meta.

    Fake propagation through a kernel op costs milliseconds; a 32-layer model repeats one signature.
    """
    if node.op != "call_function" or not getattr(node.target, "_gla_leaf", False):
        return False
    if _leaf_meta.get("mode") is not fake_mode:  # one compile's fake mode at a time: no leak across compiles
        _leaf_meta.clear()
        _leaf_meta["mode"] = fake_mode
    key = (node.target, tuple(sorted((k, _meta_key(v)) for k, v in node.kwargs.items())), state_key(at))
    if key in _leaf_meta:
        node.meta["example_value"] = _leaf_meta[key]
        return True
    try:
        propagate(node, fake_mode, at=at)
    except Exception:
        return False
    if "example_value" in node.meta:
        _leaf_meta[key] = node.meta["example_value"]
    return True


def leaf(fn: Callable) -> Callable:
    """Mark ``fn`` to be inserted as one graph node (``call_function fn``) instead of traced through."""
    fn._gla_leaf = True
    return fn


def insert_call(graph: fx.Graph, before: fx.Node, fn: Callable, kwargs: dict[str, Any]) -> fx.Node:
    """Trace ``fn(**kwargs)`` into ``graph`` just before ``before``; nodes in kwargs become proxies."""
    tracer = GraphAppendingTracer(graph)
    wrap = lambda a: Proxy(a, tracer) if isinstance(a, fx.Node) else a
    first_new = before.prev
    try:
        with graph.inserting_before(before):
            if getattr(fn, "_gla_leaf", False):
                out = Proxy(graph.call_function(fn, (), dict(kwargs)), tracer)
            else:
                out = fn(**tree_map(wrap, kwargs))
    except Exception as e:  # a replacement that cannot be traced is declined, not a compile crash
        for node in reversed(list(_nodes_between(first_new, before))):
            if not node.users:
                graph.erase_node(node)
        raise ReplacementError(f"replacement {getattr(fn, '__name__', fn)} failed while being traced: "
                               f"{type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(out, Proxy):
        raise ReplacementError(f"replacement {getattr(fn, '__name__', fn)} returned {type(out).__name__}, not a tensor")
    fake_mode = fake_mode_of(graph)
    node = first_new.next
    while node is not before:
        if "example_value" not in node.meta and _cached_meta(node, fake_mode, before):
            pass
        elif "example_value" not in node.meta:
            try:
                propagate(node, fake_mode, at=before)
            except Exception:  # meta is best-effort; the shape check below then has nothing to compare
                pass
        node = node.next
    return out.node


def _nodes_between(first: fx.Node, stop: fx.Node):
    node = first.next
    while node is not stop:
        yield node
        node = node.next


def replace_match(graph: fx.Graph, match: Match, fn: Callable, kwargs: dict[str, Any]) -> fx.Node:
    """Insert the replacement, check its output agrees with the root's shape and dtype, rewire, clean up."""
    new = insert_call(graph, match.root, fn, kwargs)
    want, got = tensor_meta(match.root), tensor_meta(new)
    if want is not None and got is not None and (want.shape != got.shape or want.dtype != got.dtype):
        _erase_unused_after(graph, new)
        raise ReplacementError(
            f"replacement returns {tuple(got.shape)} {got.dtype}, the pattern computes {tuple(want.shape)} {want.dtype}")
    match.root.replace_all_uses_with(new)
    for node in reversed(match.nodes):
        if not node.users and node.graph is graph:
            graph.erase_node(node)
    return new


def _erase_unused_after(graph: fx.Graph, node: fx.Node) -> None:
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op in ("placeholder", "output"):
            continue
        inputs = [a for a in n.all_input_nodes]
        graph.erase_node(n)
        stack.extend(inputs)
