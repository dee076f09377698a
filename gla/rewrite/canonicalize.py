"""Dynamo FX graph → canonical FX graph: the same function, written with fewer spellings.

Canonicalization is a list of rules (data): each names the spelling it removes and maps a node to
its canonical replacement — a ``(target, args, kwargs)`` call, ``IDENTITY`` (the node is a no-op:
use its input), or ``None`` (the rule does not apply). Patterns are canonicalized by the same rules,
so a pattern written one way matches a model written another.

Canonical spellings:
  matmul        ``torch.matmul``  (``@``, ``bmm``, ``.matmul``, two-operand batched ``einsum``)
  transpose     ``torch.transpose(x, a, b)`` with negative dims; single-swap permutes become transposes
  permute       ``torch.permute(x, dims)`` with non-negative dims
  softmax       ``torch.softmax(x, dim<0)``; a ``dtype=`` argument becomes a ``cast`` before it
  cast          ``gla.rewrite.ops.cast(x, dtype)``; casts to the input's own dtype vanish
  scale         ``x * c``  (``x / c``, ``torch.mul``, ``torch.div``, ``.mul``)
  add           ``x + y``  (``torch.add``, ``.add``)
  where         ``torch.where(mask, value, x)``  (``masked_fill``)
  views         an elementwise activation whose only use is a view moves after it
  activations   ``torch.sigmoid``, ``F.silu(x)`` (also ``x * sigmoid(x)``), ``F.gelu(x, approximate=…)``,
                ``torch.relu``, ``torch.tanh``
  linear        ``F.linear(x, w, b)``
  GQA           ``gla.rewrite.ops.repeat_heads(x, n, dim)`` (``repeat_kv`` expand+reshape, ``repeat_interleave``)
  SDPA          ``F.scaled_dot_product_attention(q, k, v, mask, p, causal, scale=, enable_gqa=)``
  chunk         ``torch.chunk(x, n, dim<0)`` (``.chunk``, an even ``split``)
  batch views   attention on flattened heads (``bmm`` on [B·H, T, D], scores viewed as [B, H, T, T] for
                the mask, then back): the views move off the scores, so the matmuls run on
                [B, H, ·, ·] views of their inputs and the whole attention is one 4-d pattern
  no-ops        dropout with p=0 or in eval: removed (``contiguous``/``clone`` are transparent to matching)
  in-place      ``x += y``, ``x.add_(y)``, ``x *= c``, ``x.masked_fill_(m, v)`` on a tensor nothing else
                can see (no input, buffer or view): the out-of-place op, read by every later use

Other in-place writes (``copy_``, ``x[i] = y``, writes into inputs or views) are never respelled,
and a respelling that could change what aliases what is skipped where a tensor it touches is
written (see ``gla.rewrite.mutation``).
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import ops
from .graph import fake_mode_of, is_reshape, propagate, rank, static_shape, tensor_meta
from .mutation import (GraphWrites, eliminate_dead_code, functionalize_private_writes, is_impure, storage_key,
                       written_args)

IDENTITY = object()  # "this node computes its first input unchanged"

Call = tuple  # (target, args, kwargs)


@dataclass(frozen=True)
class Rule:
    """One canonicalization: ``rewrite(node)`` → a canonical Call, IDENTITY, or None (not mine)."""

    name: str
    rewrite: Callable[[fx.Node], Any]


def _is_call(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _method(node: fx.Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def _neg_dim(d: int, r: int | None) -> int | None:
    if r is None:
        return d if d < 0 else None
    return d - r if d >= 0 else d


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# --- the rules -------------------------------------------------------------------------------


def _matmul(node):
    if _is_call(node, operator.matmul, torch.matmul, torch.bmm) and not node.kwargs:
        return None if node.target is torch.matmul else (torch.matmul, node.args[:2], {})
    if _method(node, "matmul", "bmm") and not node.kwargs:
        return (torch.matmul, node.args[:2], {})
    return None


def _einsum(node):
    if not _is_call(node, torch.einsum, torch.functional.einsum):
        return None
    args = node.args
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        args = (args[0], *args[1])
    if len(args) != 3 or not isinstance(args[0], str):
        return None
    eq = args[0].replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    specs = lhs.split(",")
    if len(specs) != 2:
        return None
    a, b = specs
    batch = [c for c in out if c in a and c in b]
    nb = len(batch)
    if "".join(batch) != a[:nb] or "".join(batch) != b[:nb] or "".join(batch) != out[:nb]:
        return None
    ra, rb, ro = a[nb:], b[nb:], out[nb:]
    if len(ra) != 2 or len(rb) != 2 or len(ro) != 2 or len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    contracted = [c for c in ra if c in rb and c not in ro]
    if len(contracted) != 1:
        return None
    c = contracted[0]
    m = ra.replace(c, "")
    n = rb.replace(c, "")
    if {m, n} != set(ro) or m == n:
        return None
    return ("einsum", (args[1], ra == m + c, args[2], rb == c + n, ro == n + m), {})


def _transpose(node):
    if _is_call(node, torch.transpose) or _method(node, "transpose"):
        x, a, b = node.args[0], _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        r = rank(x)
        a, b = _neg_dim(a, r), _neg_dim(b, r)
        if a is None or b is None:
            return None
        a, b = min(a, b), max(a, b)
        if a == b:
            return IDENTITY
        new = (torch.transpose, (x, a, b), {})
        if node.op == "call_function" and tuple(node.args[1:]) == (a, b) and not node.kwargs:
            return None
        return new
    if _method(node, "t") and rank(node.args[0]) == 2:
        return (torch.transpose, (node.args[0], -2, -1), {})
    if _is_call(node, torch.permute) or _method(node, "permute"):
        x = node.args[0]
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if not dims and "dims" in node.kwargs:
            dims = node.kwargs["dims"]
        r = rank(x)
        if r is None or not all(isinstance(d, int) for d in dims):
            return None
        dims = tuple(d % r for d in dims)
        moved = [i for i, d in enumerate(dims) if d != i]
        if not moved:
            return IDENTITY
        if len(moved) == 2:
            return (torch.transpose, (x, moved[0] - r, moved[1] - r), {})
        if node.op == "call_function" and node.args[1:] == (dims,):
            return None
        return (torch.permute, (x, dims), {})
    return None


def _softmax(node):
    if _is_call(node, F.softmax, torch.softmax, torch.Tensor.softmax) or _method(node, "softmax"):
        x = node.args[0]
        dim = _arg(node, 1, "dim")
        dtype = node.kwargs.get("dtype", node.args[2] if node.target is torch.softmax and len(node.args) > 2 else None)
        if node.target is F.softmax and len(node.args) > 3:
            dtype = node.args[3]
        if not isinstance(dim, int):
            return None
        d = _neg_dim(dim, rank(x))
        if d is None:
            return None
        if dtype is not None:
            return ("softmax_cast", (x, d, dtype), {})
        if node.target is torch.softmax and node.args == (x, d) and not node.kwargs:
            return None
        return (torch.softmax, (x, d), {})
    return None


_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def _cast(node):
    if node.op == "call_method" and node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        dtype = _CAST_METHODS[node.target]
    elif _method(node, "to", "type"):
        x = node.args[0]
        dtypes = [a for a in node.args[1:] if isinstance(a, torch.dtype)]
        dtype = node.kwargs.get("dtype", dtypes[0] if dtypes else None)
        others = [a for a in node.args[1:] if not isinstance(a, torch.dtype)]
        device = node.kwargs.get("device", others[0] if others else None)
        extra = set(node.kwargs) - {"dtype", "device", "non_blocking", "copy"}
        if extra or node.kwargs.get("copy"):
            return None
        t = tensor_meta(x)
        if device is not None and (t is None or torch.device(device) != t.device):
            return None
        if dtype is None:
            return IDENTITY if device is not None else None
    elif _method(node, "type_as"):
        other = tensor_meta(node.args[1])
        if other is None:
            return None
        dtype = other.dtype
    elif _is_call(node, ops.cast):
        dtype = node.args[1]
    else:
        return None
    t = tensor_meta(node.args[0])
    if t is not None and t.dtype == dtype:
        return IDENTITY
    if _is_call(node, ops.cast):
        return None
    return (ops.cast, (node.args[0], dtype), {})


def _no_op(node):
    # contiguous/clone are not removed: a later .view() may depend on the layout they produce.
    # The matcher treats them as transparent instead.
    if _is_call(node, F.dropout, torch.dropout, torch.nn.functional.dropout):
        p = _arg(node, 1, "p", 0.5)
        training = _arg(node, 2, "training" if node.target is not torch.dropout else "train", True)
        if p == 0 or training is False:
            return IDENTITY
    return None


def _scalar(x: Any) -> bool:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if isinstance(x, fx.Node):
        v = x.meta.get("example_value")
        return isinstance(v, (torch.SymInt, torch.SymFloat, int, float))
    return False


def _arith(node):
    if (_is_call(node, torch.mul) or _method(node, "mul")) and len(node.args) == 2 and not node.kwargs:
        return (operator.mul, node.args, {})
    if (_is_call(node, torch.add) or _method(node, "add")) and len(node.args) == 2 and not node.kwargs:
        return (operator.add, node.args, {})
    div = (_is_call(node, operator.truediv, torch.div) or _method(node, "div")) and len(node.args) == 2 and not node.kwargs
    if div and _scalar(node.args[1]):
        c = node.args[1]
        if isinstance(c, (int, float)):
            return (operator.mul, (node.args[0], 1.0 / c), {})
        return ("reciprocal_mul", (node.args[0], c), {})
    return None


def _activation(node):
    if _is_call(node, torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid) or _method(node, "sigmoid"):
        return None if _is_call(node, torch.sigmoid) else (torch.sigmoid, node.args[:1], {})
    if _is_call(node, F.silu):
        return None if not node.kwargs and len(node.args) == 1 else (F.silu, node.args[:1], {})
    if _method(node, "silu"):
        return (F.silu, node.args[:1], {})
    if _is_call(node, F.relu, torch.relu) or _method(node, "relu"):
        return None if _is_call(node, torch.relu) and len(node.args) == 1 else (torch.relu, node.args[:1], {})
    if _is_call(node, torch.tanh, F.tanh) or _method(node, "tanh"):
        return None if _is_call(node, torch.tanh) else (torch.tanh, node.args[:1], {})
    if _is_call(node, F.gelu):
        approx = _arg(node, 1, "approximate", "none")
        if node.args[1:] == () and node.kwargs == {"approximate": approx}:
            return None
        return (F.gelu, node.args[:1], {"approximate": approx})
    if _is_call(node, operator.mul):  # x * sigmoid(x) is silu
        a, b = node.args
        for x, s in ((a, b), (b, a)):
            if _is_call(s, torch.sigmoid) and s.args[0] is x:
                return (F.silu, (x,), {})
    return None


def _glu(node):
    if _is_call(node, F.glu):
        x, dim = node.args[0], _arg(node, 1, "dim", -1)
        d = _neg_dim(dim, rank(x)) if isinstance(dim, int) else None
        if d is None or (node.args == (x, d) and not node.kwargs):
            return None
        return (F.glu, (x, d), {})
    return None


_ELEMENTWISE = (torch.sigmoid, F.silu, torch.tanh, torch.relu, F.gelu)


def _view_like(node: fx.Node) -> bool:
    if _method(node, "unsqueeze", "view", "reshape", "expand") or _is_call(node, torch.unsqueeze, torch.reshape):
        return True
    if _is_call(node, operator.getitem) and isinstance(node.args[1], tuple):
        return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in node.args[1])
    return False


def _activation_after_view(node):
    """``sigmoid(g)[:, :, None]`` → ``sigmoid(g[:, :, None])``: an elementwise activation moves after a
    view of its output (the same values), so gates and GLUs match whatever indexing follows them."""
    if not _view_like(node) or not isinstance(node.args[0], fx.Node):
        return None
    act = node.args[0]
    if not _is_call(act, *_ELEMENTWISE) or len(act.users) != 1 or len(act.args) != 1:
        return None
    return ("swap_activation", (act,), {})


def _linear(node):
    if _is_call(node, torch._C._nn.linear, F.linear):
        x, w = node.args[0], _arg(node, 1, "weight")
        b = _arg(node, 2, "bias")
        if node.target is F.linear and node.args == (x, w, b) and not node.kwargs:
            return None
        return (F.linear, (x, w, b), {})
    return None


def _masked_fill(node):
    if _is_call(node, torch.masked_fill) or _method(node, "masked_fill"):
        x, mask, value = node.args[0], _arg(node, 1, "mask"), _arg(node, 2, "value")
        return (torch.where, (mask, value, x), {})
    return None


# Flattened-heads attention (DeBERTa, fairseq-style MHA): ``bmm(q, kᵀ)`` on [B·H, T, D], the
# scores viewed as [B, H, T, T] for the mask, the probabilities viewed back for ``bmm(p, v)``. The
# four rules below move the views off the scores so the whole attention is one 4-d pattern. Every
# operand keeps its values (views of contiguous batches); only private intermediates (one user)
# move; static shapes only.
def _batch_split(flat: Any, four: Any) -> tuple[int, int] | None:
    """(B, H) if rank-4 ``four`` [B, H, M, N] holds rank-3 ``flat`` [B·H, M, N]."""
    src, out = static_shape(flat), static_shape(four)
    if src is None or out is None or len(src) != 3 or len(out) != 4:
        return None
    if out[0] * out[1] != src[0] or out[2:] != src[1:]:
        return None
    return out[0], out[1]


def _batched_like(x: Any, n: int) -> bool:
    shape = static_shape(x)
    return shape is not None and len(shape) == 3 and shape[0] == n


def _split_operand(operand: Any, x: fx.Node) -> bool | None:
    """For an operand of ``x = a + b`` whose batch axis gets split: True if it is viewed with it
    (its shape is x's), False if it broadcasts the same either way (a number, rank ≤ 2, or a
    leading 1), None if neither."""
    if isinstance(operand, (int, float)) and not isinstance(operand, bool):
        return False
    shape = static_shape(operand)
    if shape is None:
        return None
    if shape == static_shape(x):
        return True
    return False if len(shape) <= 2 or (len(shape) == 3 and shape[0] == 1) else None


def _private(x: Any) -> bool:
    """Is ``x``'s value read once? (Respelled nodes wait for the final dead-code pass: users
    with no users of their own that write nothing do not count.)"""
    return isinstance(x, fx.Node) and sum(1 for u in x.users if u.users or is_impure(u)) == 1


def _acts_on_scores(node: fx.Node) -> bool:
    """What a model does to attention scores on their 4-d view: mask, bias, scale, softmax."""
    return _is_call(node, torch.where, torch.masked_fill, operator.add, operator.mul, operator.truediv,
                    torch.softmax, F.softmax) or \
        _method(node, "masked_fill", "add", "mul", "div", "softmax")


def _scores_view(node):
    """``view(matmul(a, b))`` → ``matmul(view(a), view(b))`` and ``view(matmul(a, b) + r)`` →
    ``view(matmul(a, b)) + view(r)`` (a bias on the flat scores), B·H split into B, H, where the
    4-d view is masked, biased, scaled or normalized (a plain 3-d attention keeps its form)."""
    x = node.args[0] if is_reshape(node) else None
    if not _private(x):
        return None
    bh = _batch_split(x, node)
    if bh is None or not all(_acts_on_scores(u) for u in node.users):
        return None
    if _is_call(x, torch.matmul) and all(_batched_like(o, bh[0] * bh[1]) for o in x.args[:2]):
        return ("split_batch", (torch.matmul, x.args[0], x.args[1], True, True, bh), {})
    if _is_call(x, operator.add) and len(x.args) == 2 and \
            any(_is_call(o, torch.matmul) and _private(o) for o in x.args):
        views = [_split_operand(o, x) for o in x.args]
        if None not in views:
            return ("split_batch", (operator.add, *x.args, *views, bh), {})
    return None


def _softmax_of_merged_view(node):
    """``softmax(view(s4), -1)`` → ``view(softmax(s4, -1))``: fairseq masks [B, H, T, T] and
    takes the softmax on [B·H, T, T]."""
    if not (_is_call(node, torch.softmax) and node.args[1:] == (-1,)):
        return None
    p = node.args[0]
    if is_reshape(p) and _private(p) and _batch_split(p, p.args[0]) is not None:
        return ("softmax_before_view", (p.args[0],), {})
    return None


def _pv_of_merged_probabilities(node):
    """``matmul(view(p4), v)`` → ``view(matmul(p4, view(v)))``, p4 the [B, H, T, T] softmax."""
    if not (_is_call(node, torch.matmul) and len(node.args) == 2):
        return None
    p, v = node.args
    if not (is_reshape(p) and _private(p) and _is_call(p.args[0], torch.softmax)):
        return None
    bh = _batch_split(p, p.args[0])
    if bh is None or not _batched_like(v, bh[0] * bh[1]):
        return None
    return ("matmul_merge_batch", (p.args[0], v, bh), {})


def _view_round_trip(node):
    """``view(view(x))`` holding x itself (its shape and strides: no copy on the way, so a later
    ``view`` of it is valid on x too) → ``x``; what the rules above leave between the softmax
    and ``bmm(p, v)``."""
    x = node.args[0] if is_reshape(node) else None
    if not (is_reshape(x) and _private(x) and isinstance(x.args[0], fx.Node)):
        return None
    a, b = tensor_meta(x.args[0]), tensor_meta(node)
    if a is None or b is None or static_shape(a) is None or static_shape(a) != static_shape(b) \
            or tuple(a.stride()) != tuple(b.stride()):
        return None
    return ("same_as", (x.args[0],), {})


def _pure_unsqueeze(node: fx.Node) -> bool:
    if _method(node, "unsqueeze", "view", "reshape") or _is_call(node, torch.unsqueeze, torch.reshape):
        return True
    if _is_call(node, operator.getitem) and isinstance(node.args[1], tuple):
        idx = node.args[1]
        ok = all(i is None or i is Ellipsis or i == slice(None) for i in idx)
        return ok and sum(i is None for i in idx) == 1
    return False


def _repeat_heads(node):
    """``x[:, :, None].expand(B, H, n, T, D).reshape(B, H*n, T, D)`` and ``repeat_interleave``."""
    if _is_call(node, torch.repeat_interleave) or _method(node, "repeat_interleave"):
        x, n, dim = node.args[0], _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if isinstance(n, int) and isinstance(dim, int) and not node.kwargs.get("output_size"):
            return (ops.repeat_heads, (x, n, dim % rank(x) if rank(x) else dim), {})
        return None
    if not (_method(node, "reshape", "view", "flatten") or _is_call(node, torch.reshape, torch.flatten)):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and (_method(expand, "expand") or _is_call(expand, torch.Tensor.expand))):
        return None
    unsq = expand.args[0]
    if not isinstance(unsq, fx.Node) or len(unsq.users) != 1 or len(expand.users) != 1:
        return None
    if not _pure_unsqueeze(unsq):
        return None
    x = unsq.args[0] if isinstance(unsq.args[0], fx.Node) else None
    tx, tu, te, to = (tensor_meta(n) for n in (x, unsq, expand, node))
    if None in (tx, tu, te, to) or tu.dim() != tx.dim() + 1 or te.dim() != tu.dim() or to.dim() != tx.dim():
        return None
    # find the inserted unit axis d+1 that follows heads axis d
    for d in range(tx.dim()):
        xs, us = list(tx.shape), list(tu.shape)
        if us[:d + 1] + us[d + 2:] != xs or not statically_known_true(us[d + 1] == 1):
            continue
        es = list(te.shape)
        n = es[d + 1]
        if not isinstance(n, int) or n < 1:
            return None
        same = all(statically_known_true(es[i] == us[i]) for i in range(len(es)) if i != d + 1)
        os_ = list(to.shape)
        merged = statically_known_true(os_[d] == xs[d] * n)
        rest = all(statically_known_true(a == b) for a, b in zip(os_[:d] + os_[d + 1:], xs[:d] + xs[d + 1:]))
        if same and merged and rest:
            return (ops.repeat_heads, (x, n, d), {})
        return None
    return None


_SDPA_DEFAULTS = (("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None),
                  ("enable_gqa", False))


def _sdpa(node):
    """``F.scaled_dot_product_attention`` with every argument positional and defaults filled in."""
    if not _is_call(node, F.scaled_dot_product_attention):
        return None
    args = list(node.args[:3])
    for i, (name, default) in enumerate(_SDPA_DEFAULTS[:3]):
        args.append(_arg(node, 3 + i, name, default))
    kwargs = {name: node.kwargs.get(name, default) for name, default in _SDPA_DEFAULTS[3:]}
    if set(node.kwargs) - {n for n, _ in _SDPA_DEFAULTS}:
        return None
    if tuple(args) == tuple(node.args) and kwargs == node.kwargs:
        return None
    return (F.scaled_dot_product_attention, tuple(args), kwargs)


def _mha(node):
    """``F.multi_head_attention_forward``: 13 positional arguments, every keyword one spelled out."""
    if not _is_call(node, F.multi_head_attention_forward):
        return None
    params = list(inspect.signature(F.multi_head_attention_forward).parameters.values())
    try:
        bound = inspect.signature(F.multi_head_attention_forward).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    args = tuple(bound.arguments[p.name] for p in params[:13])
    kwargs = {p.name: bound.arguments[p.name] for p in params[13:]}
    if args == tuple(node.args) and kwargs == dict(node.kwargs):
        return None
    return (F.multi_head_attention_forward, args, kwargs)


def _chunk(node):
    """``x.chunk(2, -1)``, ``torch.chunk``, and an even ``split`` become ``torch.chunk(x, n, dim<0)``."""
    if _is_call(node, torch.chunk) or _method(node, "chunk"):
        x, n, dim = node.args[0], _arg(node, 1, "chunks"), _arg(node, 2, "dim", 0)
    elif _is_call(node, torch.split) or _method(node, "split"):
        x, size, dim = node.args[0], _arg(node, 1, "split_size_or_sections" if node.op == "call_function" else "split_size"), _arg(node, 2, "dim", 0)
        t = tensor_meta(x)
        if t is None or not isinstance(size, int) or not isinstance(dim, int):
            return None
        total = t.shape[dim]
        if not isinstance(total, int) or total % size:
            return None
        n = total // size
    else:
        return None
    if not isinstance(n, int) or not isinstance(dim, int):
        return None
    d = _neg_dim(dim, rank(x))
    if d is None:
        return None
    if _is_call(node, torch.chunk) and node.args == (x, n, d) and not node.kwargs:
        return None
    return (torch.chunk, (x, n, d), {})


RULES: tuple[Rule, ...] = (
    Rule("no-op dropout(p=0|eval)", _no_op),
    Rule("dtype casts", _cast),
    Rule("matmul spellings", _matmul),
    Rule("einsum as matmul", _einsum),
    Rule("transpose/permute", _transpose),
    Rule("softmax spellings", _softmax),
    Rule("mul/add/div-by-scalar", _arith),
    Rule("activation spellings", _activation),
    Rule("linear spellings", _linear),
    Rule("activation after a view", _activation_after_view),
    Rule("F.glu dim", _glu),
    Rule("masked_fill as where", _masked_fill),
    Rule("repeat_kv as repeat_heads", _repeat_heads),
    Rule("scaled_dot_product_attention arguments", _sdpa),
    Rule("chunk/split halves", _chunk),
    Rule("scores viewed with heads split", _scores_view),
    Rule("softmax of a heads-merged view", _softmax_of_merged_view),
    Rule("p·v of heads-merged probabilities", _pv_of_merged_probabilities),
    Rule("view round trips", _view_round_trip),
    Rule("multi_head_attention_forward arguments", _mha),
)


def canonicalize(gm: fx.GraphModule, rules: tuple[Rule, ...] = RULES, max_passes: int = 4) -> dict[str, int]:
    """Rewrite ``gm`` in place into canonical form. Returns how often each rule fired."""
    graph = gm.graph
    fake_mode = fake_mode_of(graph)
    fired: dict[str, int] = {}
    made = functionalize_private_writes(graph, fake_mode)
    if made:
        fired["in-place ops on private tensors"] = made
    writes = GraphWrites.of(graph, fresh=True)
    for _ in range(max_passes):
        changed = False
        for node in list(graph.nodes):
            if node.op not in ("call_function", "call_method") or not node.graph is graph:
                continue
            if writes.writes and written_args(node):  # a write stays as written (a respelling could drop it)
                continue
            for rule in rules:
                result = rule.rewrite(node)
                if result is None or not _aliasing_exact(node, result, writes):
                    continue
                _apply(graph, node, result, fake_mode)
                fired[rule.name] = fired.get(rule.name, 0) + 1
                changed = True
                break
        if not changed:
            break
    eliminate_dead_code(graph)  # spellings replaced above leave pure nodes behind (writes stay)
    graph.lint()
    gm.recompile()
    return fired


def _aliasing_exact(node: fx.Node, result: Any, writes: GraphWrites) -> bool:
    """Is this respelling exact given the graph's in-place writes? ``IDENTITY`` can turn a copy (an
    eval-mode dropout...) into an alias, ``repeat_heads`` a view (n = 1) into a copy, and a swapped
    activation reads its input later: each is exact only where no tensor involved is written."""
    if not writes.writes:
        return True
    if result is IDENTITY:
        src = node.args[0]
        alias = storage_key(node) is not None and storage_key(node) == storage_key(src)
        return alias or not (writes.written(node) or writes.written(src))
    if result[0] in ("split_batch", "matmul_merge_batch", "softmax_before_view", "same_as"):
        touched = {node, *node.all_input_nodes, *node.args[0].all_input_nodes}
        return not any(writes.written(n) for n in touched)
    if result[0] is ops.repeat_heads or result[0] == "swap_activation":
        touched = {node, *node.all_input_nodes}
        if result[0] == "swap_activation":
            touched |= set(result[1][0].all_input_nodes)
        return not any(writes.written(n) for n in touched)
    return True


def _emit(graph: fx.Graph, target, args, kwargs, fake_mode, meta_from: fx.Node, final: bool = False) -> fx.Node:
    new = graph.call_function(target, tuple(args), dict(kwargs))
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in meta_from.meta:
            new.meta[key] = meta_from.meta[key]
    if final and "example_value" in meta_from.meta:
        # a respelling computes the very value the old node did: reuse its meta, skip fake propagation
        new.meta["example_value"] = meta_from.meta["example_value"]
        return new
    try:
        propagate(new, fake_mode, at=meta_from)
    except Exception:  # meta is best-effort; matching treats a missing meta as unknown
        pass
    return new


def _apply(graph: fx.Graph, node: fx.Node, result, fake_mode) -> None:
    if result is IDENTITY:
        src = node.args[0]
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        return
    target, args, kwargs = result
    with graph.inserting_before(node):
        if target == "softmax_cast":
            x, d, dtype = args
            t = tensor_meta(x)
            if t is None or t.dtype != dtype:
                x = _emit(graph, ops.cast, (x, dtype), {}, fake_mode, node)
            new = _emit(graph, torch.softmax, (x, d), {}, fake_mode, node, final=True)
        elif target == "swap_activation":
            (act,) = args
            view = _emit(graph, node.target, (act.args[0], *node.args[1:]), node.kwargs, fake_mode, node) \
                if node.op == "call_function" else None
            if view is None:  # a call_method view: re-emit as a method call on the activation's input
                view = graph.call_method(node.target, (act.args[0], *node.args[1:]), dict(node.kwargs))
                try:
                    propagate(view, fake_mode, at=node)
                except Exception:
                    pass
            new = _emit(graph, act.target, (view,), act.kwargs, fake_mode, node, final=True)
        elif target == "same_as":  # an existing node computes this one's value
            (new,) = args
        elif target == "split_batch":
            op, a, b, view_a, view_b, (d0, d1) = args
            a, b = (_emit(graph, torch.reshape, (t, (d0, d1, *static_shape(t)[1:])), {}, fake_mode, node)
                    if view else t for t, view in ((a, view_a), (b, view_b)))
            new = _emit(graph, op, (a, b), {}, fake_mode, node, final=True)
        elif target == "softmax_before_view":
            (s4,) = args
            sm = _emit(graph, torch.softmax, (s4, -1), {}, fake_mode, node)
            new = _emit(graph, torch.reshape, (sm, tuple(static_shape(node))), {}, fake_mode, node,
                        final=True)
        elif target == "matmul_merge_batch":
            p4, v, (d0, d1) = args
            v4 = _emit(graph, torch.reshape, (v, (d0, d1, *static_shape(v)[1:])), {}, fake_mode, node)
            out = _emit(graph, torch.matmul, (p4, v4), {}, fake_mode, node)
            new = _emit(graph, torch.reshape, (out, tuple(static_shape(node))), {}, fake_mode, node,
                        final=True)
        elif target == "reciprocal_mul":
            x, c = args
            inv = _emit(graph, operator.truediv, (1.0, c), {}, fake_mode, node)
            new = _emit(graph, operator.mul, (x, inv), {}, fake_mode, node, final=True)
        elif target == "einsum":
            a, a_ok, b, b_ok, out_swapped = args
            if not a_ok:
                a = _emit(graph, torch.transpose, (a, -2, -1), {}, fake_mode, node)
            if not b_ok:
                b = _emit(graph, torch.transpose, (b, -2, -1), {}, fake_mode, node)
            new = _emit(graph, torch.matmul, (a, b), {}, fake_mode, node, final=not out_swapped)
            if out_swapped:
                new = _emit(graph, torch.transpose, (new, -2, -1), {}, fake_mode, node, final=True)
        else:
            new = _emit(graph, target, args, kwargs, fake_mode, node, final=True)
    if "example_value" not in new.meta and "example_value" in node.meta:
        new.meta["example_value"] = node.meta["example_value"]
    node.replace_all_uses_with(new)
    graph.erase_node(node)
