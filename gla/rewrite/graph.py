"""Small, attention-agnostic facts about FX nodes: their example values, and meta for new nodes."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from .autocast import autocast_at


def hint_int(s: Any) -> int:
    """A size as the int seen at compile time (the hint of a symbolic size)."""
    if isinstance(s, int):
        return s
    node = s.node
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    return int(node.shape_env.size_hint(node.expr))


def value_of(arg: Any) -> Any:
    """The example value behind an FX argument (a FakeTensor, SymInt…), or the literal itself."""
    if isinstance(arg, fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def tensor_meta(arg: Any) -> torch.Tensor | None:
    v = value_of(arg)
    return v if isinstance(v, torch.Tensor) else None


def rank(arg: Any) -> int | None:
    t = tensor_meta(arg)
    return None if t is None else t.dim()


def static_shape(arg: Any) -> tuple[int, ...] | None:
    """The shape of a node's tensor when every size is a plain int (None: unknown or symbolic)."""
    t = tensor_meta(arg)
    if t is None or not all(isinstance(d, int) for d in t.shape):
        return None
    return tuple(t.shape)


def is_reshape(node: Any) -> bool:
    """``x.view(...)``, ``x.reshape(...)`` or ``torch.reshape(x, ...)``."""
    return isinstance(node, fx.Node) and ((node.op == "call_method" and node.target in ("view", "reshape"))
                                          or (node.op == "call_function" and node.target is torch.reshape))


def concrete_shape(t: torch.Tensor) -> tuple[int, ...]:
    """Shape with symbolic sizes replaced by their hints (the sizes seen at compile time)."""
    return tuple(hint_int(s) for s in t.shape)


def fake_mode_of(graph: fx.Graph):
    for node in graph.nodes:
        t = tensor_meta(node)
        if t is not None and hasattr(t, "fake_mode"):
            return t.fake_mode
    return None


def propagate(node: fx.Node, fake_mode, at: fx.Node | None = None) -> None:
    """Compute ``example_value`` for a node we inserted, from its inputs' example values, under the
    autocast state of ``at`` (the node it is placed next to; default: none)."""
    if fake_mode is None:
        return
    args = tree_map(value_of, node.args)
    kwargs = tree_map(value_of, node.kwargs)
    amp = autocast_at(at) if at is not None else contextlib.nullcontext()
    with fake_mode, torch.no_grad(), amp:  # shapes only; autograd bookkeeping would be wasted work
        if node.op == "call_function":
            out = node.target(*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            return
    wants_grad = any(isinstance(a, torch.Tensor) and a.requires_grad
                     for a in torch.utils._pytree.tree_leaves((args, kwargs)))
    if wants_grad and isinstance(out, torch.Tensor) and out.dtype.is_floating_point:
        out.requires_grad_(True)  # computed under no_grad for speed; keep what autograd would say
    node.meta["example_value"] = out


def is_float_dtype(dtype: Any) -> bool:
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point
