"""Prove that an additive mask is causal (a causal sliding window, causal chunks) from how it is built.

The mask's producer subgraph is evaluated abstractly: ``arange`` values placed on the query (-2)
or key (-1) axis are affine index forms, comparisons between them are linear constraints, ``&``
joins constraints, and ``where(allowed, 0, -big)`` makes the additive mask. ``a // c == b // c``
of a key and a query position is a chunk constraint (Llama 4's chunked attention). A mask built only from
these is the same at every sequence length, so the proof holds under dynamic shapes. Anything else
(a buffer, a padding mask from the batch) is runtime data: the mask then stays a general bias.
So is a tensor written in place anywhere in the graph (``mask[..., :n] = 0``): its producer no
longer says what it holds.

Position tensors are affine too: ``positions[batch_idx, q_idx]`` with arange index tensors is
the positions' formula at those indices (transformers builds its causal mask so, from
``position_ids = arange(T)``), and a tensor equal everywhere is a ``Const`` (its packed-sequence
ids ``cumsum(diff(positions) != 1)`` are 0 throughout when the positions are an arange).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..rewrite import ops
from ..rewrite.graph import tensor_meta
from ..rewrite.mutation import GraphWrites

NEG_LIMIT = -1e4  # a fill at or below this is a mask value, not a score


@dataclass(frozen=True)
class Affine:
    """Σ coef[axis]·index(axis) + const, with axes counted from the end (-1 = key, -2 = query)."""

    terms: tuple[tuple[int, int], ...]
    const: int
    rank: int
    lengths: tuple[tuple[int, object], ...] = ()  # axis -> arange length

    def shift(self, c: int) -> "Affine":
        return Affine(self.terms, self.const + c, self.rank, self.lengths)


@dataclass(frozen=True)
class Quotient:
    """``affine // divisor``: floor division by a positive integer."""

    affine: Affine
    divisor: int


@dataclass(frozen=True)
class Allowed:
    """Positions where every constraint ``Σ coef·index + const ≤ 0`` holds, and every chunk
    constraint ``a // size == b // size`` (entries ``(a, b, size)``)."""

    constraints: tuple[Affine, ...]
    chunks: tuple[tuple[Affine, Affine, int], ...] = ()


@dataclass(frozen=True)
class Const:
    """A tensor holding one value everywhere (any shape: it broadcasts)."""

    value: int | bool


def _scaled(a: Affine, c: int) -> Affine:
    return Affine(tuple((ax, k * c) for ax, k in a.terms if k * c), a.const * c, a.rank, a.lengths)


def _added(a: Affine, b: Affine) -> Affine:
    return _sub(a, _scaled(b, -1))


def _index_ok(a) -> bool:
    """An index tensor whose every entry is ≥ 0 (negative indices would wrap around)."""
    return isinstance(a, Affine) and a.const >= 0 and all(k >= 0 for _, k in a.terms)


def _is_device(x) -> bool:
    return isinstance(x, (torch.device, str))


def _as_int(x):
    """An integer operand: a Python int, or a tensor holding one integer everywhere."""
    if isinstance(x, Const) and isinstance(x.value, int) and not isinstance(x.value, bool):
        return x.value
    return x if isinstance(x, int) and not isinstance(x, bool) else None


_INT_DTYPES = (int, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FLOORDIV = (operator.floordiv, torch.floor_divide)


@dataclass(frozen=True)
class _Filled:
    """``torch.full((Tq, Tk), value)`` / ``torch.ones(Tq, Tk)``: the input of ``triu``/``tril``."""

    value: object
    lengths: tuple[tuple[int, object], ...]


@dataclass(frozen=True)
class MaskForm:
    causal: bool
    window: int
    nodes: tuple[fx.Node, ...]
    chunk: int = 0  # > 0: causal within aligned chunks of this many positions


def _zero(x) -> bool:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x == 0
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target in (torch.zeros, torch.zeros_like):
        return True
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target is torch.tensor:
        return x.args and x.args[0] == 0
    return False


def _neg(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x <= NEG_LIMIT


def _sub(a: Affine, b: Affine) -> Affine:
    terms = dict(a.terms)
    for ax, c in b.terms:
        terms[ax] = terms.get(ax, 0) - c
    lengths = dict(a.lengths) | dict(b.lengths)
    return Affine(tuple(sorted((k, v) for k, v in terms.items() if v)), a.const - b.const,
                  max(a.rank, b.rank), tuple(sorted(lengths.items())))


# The same comparison or conjunction, however the model (or the torch version's Dynamo) spells it:
# ``a == b`` is ``operator.eq`` in one torch release and ``call_method __eq__`` in another.
_BINARY = {operator.eq: ("__eq__", "eq", torch.eq), operator.ne: ("__ne__", "ne", torch.ne),
           operator.le: ("__le__", "le", torch.le), operator.lt: ("__lt__", "lt", torch.lt),
           operator.ge: ("__ge__", "ge", torch.ge), operator.gt: ("__gt__", "gt", torch.gt),
           operator.and_: ("__and__", "bitwise_and", "logical_and", torch.bitwise_and, torch.logical_and)}
_METHOD_ALIASES = {name: op for op, names in _BINARY.items() for name in names if isinstance(name, str)}
_FUNCTION_ALIASES = {fn: op for op, names in _BINARY.items() for fn in names if not isinstance(fn, str)}


def _binary_op(n: fx.Node):
    """``operator.<op>`` for a two-operand comparison / ``&`` node in any of its spellings, else None.

    (``logical_and`` equals ``&`` only on booleans; a non-boolean operand never evaluates to a
    constraint or a boolean ``Const`` here, so the proof cannot go through it.)"""
    if len(n.args) != 2 or n.kwargs:
        return None
    if n.op == "call_method":
        return _METHOD_ALIASES.get(n.target)
    if n.op == "call_function":
        return n.target if n.target in _BINARY else _FUNCTION_ALIASES.get(n.target)
    return None


class _Eval:
    def __init__(self):
        self.nodes: list[fx.Node] = []

    def __call__(self, x):
        if not isinstance(x, fx.Node):
            return x if isinstance(x, int) and not isinstance(x, bool) else None
        if GraphWrites.of(x.graph).written(x):
            return None
        r = self._node(x)
        if r is not None:
            self.nodes.append(x)
        return r

    def _node(self, n: fx.Node):
        t, a = n.target, n.args
        binary = _binary_op(n)
        if binary is not None:
            return self._binary(binary, a)
        if n.op == "call_function" and t is torch.arange:
            if len(a) != 1 or set(n.kwargs) - {"device", "dtype"}:
                return None
            length = a[0].meta.get("example_value") if isinstance(a[0], fx.Node) else a[0]  # SymInt under dynamic shapes
            return Affine(((-1, 1),), 0, 1, ((-1, length),))
        if n.op == "call_function" and t in (operator.add, operator.sub):
            x, y = self(a[0]), self(a[1])
            sign = 1 if t is operator.add else -1
            if isinstance(x, Affine) and _as_int(y) is not None:
                return x.shift(sign * _as_int(y))
            if _as_int(x) is not None and isinstance(y, Affine) and t is operator.add:
                return y.shift(_as_int(x))
            return None
        if (n.op == "call_function" and t in _FLOORDIV) or \
                (n.op == "call_method" and t in ("__floordiv__", "floor_divide")):
            x, c = self(a[0]), (a[1] if len(a) == 2 and not n.kwargs else None)
            ok = isinstance(x, Affine) and isinstance(c, int) and not isinstance(c, bool) and c > 0
            return Quotient(x, c) if ok else None
        if n.op == "call_function" and t is torch.zeros and len(a) >= 1 and \
                n.kwargs.get("dtype") in _INT_DTYPES and not set(n.kwargs) - {"dtype", "device"}:
            return Const(0)  # (integer zeros: subtracting them keeps a position exact)
        if n.op == "call_function" and t is operator.getitem and isinstance(a[1], fx.Node):
            return self._gather(a[0], (a[1],))
        if n.op == "call_function" and t is operator.getitem and isinstance(a[1], tuple) and \
                any(isinstance(i, fx.Node) for i in a[1]):
            return self._gather(a[0], a[1])
        if n.op == "call_function" and t is operator.getitem and isinstance(a[1], tuple):
            x = self(a[0])
            if isinstance(x, Const):
                return x
            if isinstance(x, Allowed) or (isinstance(x, tuple) and x[0] == "bias"):
                return x if self._whole(a[0], a[1]) else None
            if not isinstance(x, Affine):
                return None
            idx = a[1]
            if any(i is Ellipsis for i in idx) or not all(i is None or i == slice(None) for i in idx):
                return None
            if sum(i is not None for i in idx) != x.rank:
                return None
            new_rank = len(idx)
            # old dims (from the front) map to the positions of the slices
            slots = [p for p, i in enumerate(idx) if i is not None]
            remap = {d - x.rank: slots[d] - new_rank for d in range(x.rank)}
            return Affine(tuple((remap[ax], c) for ax, c in x.terms), x.const, new_rank,
                          tuple((remap[ax], ln) for ax, ln in x.lengths))
        if (n.op == "call_method" and t == "expand") or (n.op == "call_function" and t is torch.Tensor.expand):
            x = self(a[0])
            if isinstance(x, Affine):  # new leading dims: the axes, counted from the end, stay
                sizes = a[1] if len(a) == 2 and isinstance(a[1], (tuple, list)) else a[1:]
                return Affine(x.terms, x.const, max(x.rank, len(sizes)), x.lengths)
            if isinstance(x, (Allowed, Const)):
                return x
            return None
        if (n.op == "call_method" and t == "unsqueeze") or (n.op == "call_function" and t is torch.unsqueeze):
            x, d = self(a[0]), (a[1] if len(a) > 1 else n.kwargs.get("dim"))
            if isinstance(x, Const):
                return x
            if not isinstance(x, Affine) or not isinstance(d, int) or not -x.rank - 1 <= d <= x.rank:
                return None
            d = d % (x.rank + 1)
            move = lambda ax: ax - 1 if ax + x.rank < d else ax  # noqa: E731  (axes before the new one)
            return Affine(tuple((move(ax), c) for ax, c in x.terms), x.const, x.rank + 1,
                          tuple((move(ax), ln) for ax, ln in x.lengths))
        if n.op == "call_method" and t == "to" and not set(n.kwargs) - {"device", "non_blocking"} and \
                all(_is_device(v) for v in (*a[1:], *([n.kwargs["device"]] if "device" in n.kwargs else []))):
            return self(a[0])  # a device move keeps every value
        if n.op == "call_method" and t == "new_ones" and n.kwargs.get("dtype") is torch.bool and \
                not set(n.kwargs) - {"dtype", "device"}:
            return Const(True)
        if n.op == "call_function" and t is torch.diff:
            return self._diff(n)
        if (n.op == "call_method" and t == "cumsum") or (n.op == "call_function" and t is torch.cumsum):
            x = self(a[0])
            return Const(0) if isinstance(x, Const) and x.value == 0 and not n.kwargs else None
        if n.op == "call_function" and t is ops.cast:
            return self(a[0])
        if n.op == "call_function" and t in (torch.full, torch.ones) and not (set(n.kwargs) - {"device", "dtype"}):
            size = a[0] if t is torch.ones and len(a) == 1 else (a[0] if t is torch.full else a)
            value = 1 if t is torch.ones else (a[1] if len(a) > 1 else None)
            if not isinstance(size, (tuple, list)) or len(size) != 2 or not isinstance(value, (int, float, bool)):
                return None
            sizes = [x.meta.get("example_value") if isinstance(x, fx.Node) else x for x in size]
            return _Filled(value, ((-2, sizes[0]), (-1, sizes[1])))
        if n.op == "call_function" and t in (torch.triu, torch.tril) or (n.op == "call_method" and t in ("triu", "tril")):
            x = self(a[0])
            d = a[1] if len(a) > 1 else n.kwargs.get("diagonal", 0)
            if not isinstance(x, _Filled) or not isinstance(d, int):
                return None
            if t in (torch.triu, "triu") and _neg(x.value):   # -big where k - q >= d: allowed k - q - (d - 1) <= 0
                return ("bias", Allowed((Affine(((-2, -1), (-1, 1)), -(d - 1), 2, x.lengths),)))
            if t in (torch.tril, "tril") and x.value:          # nonzero where k - q <= d: a keep mask
                return Allowed((Affine(((-2, -1), (-1, 1)), -d, 2, x.lengths),))
            return None
        if n.op == "call_function" and t is torch.where and len(a) == 3:
            cond = self(a[0])
            if isinstance(cond, Allowed) and _zero(a[1]) and _neg(a[2]):
                if isinstance(a[1], fx.Node):
                    self.nodes.append(a[1])
                return ("bias", cond)
            return None
        return None

    def _binary(self, t, a):
        if t in (operator.eq, operator.ne):
            x, y = self(a[0]), (self(a[1]) if isinstance(a[1], fx.Node) else a[1])
            if t is operator.eq and isinstance(x, Quotient) and isinstance(y, Quotient) and \
                    x.divisor == y.divisor:
                return Allowed((), ((x.affine, y.affine, x.divisor),))
            x = x.value if isinstance(x, Const) else None
            y = y.value if isinstance(y, Const) else (y if isinstance(y, (int, bool)) else None)
            if x is None or y is None:
                return None
            return Const((x == y) if t is operator.eq else (x != y))
        if t is operator.and_:
            x, y = self(a[0]), self(a[1])
            x = Allowed(()) if isinstance(x, Const) and x.value is True else x  # all True: no constraint
            y = Allowed(()) if isinstance(y, Const) and y.value is True else y
            if isinstance(x, Allowed) and isinstance(y, Allowed):
                return Allowed(x.constraints + y.constraints, x.chunks + y.chunks)
            return None
        x, y = self(a[0]), self(a[1])  # le / lt / ge / gt
        if not (isinstance(x, Affine) and isinstance(y, Affine)):
            return None
        if t is operator.le:
            return Allowed((_sub(x, y),))
        if t is operator.lt:
            return Allowed((_sub(x, y).shift(1),))
        if t is operator.ge:
            return Allowed((_sub(y, x),))
        return Allowed((_sub(y, x).shift(1),))

    def _gather(self, base: fx.Node, idx: tuple):
        """``base[i0, i1, ...]``, every dim indexed by an affine index tensor: the base's formula at
        those indices (values ≥ 0; an index past the end raises at run time, never silently)."""
        x = self(base)
        if not isinstance(x, (Affine, Const)) or len(idx) != getattr(x, "rank", len(idx)):
            return None
        ix = [self(i) if isinstance(i, fx.Node) else None for i in idx]
        if not all(_index_ok(i) for i in ix):
            return None
        if isinstance(x, Const):
            return x
        out = Affine((), x.const, max(i.rank for i in ix))
        for pos, i in enumerate(ix):  # dim pos of the base is its axis pos - rank
            coef = dict(x.terms).get(pos - x.rank, 0)
            if coef:
                out = _added(out, _scaled(i, coef))
        return out

    def _diff(self, n: fx.Node):
        """``diff(p, dim=-1, prepend=p[..., :1] - c)`` of positions ``p`` rising by ``c`` along the
        last axis: ``c`` everywhere (the first entry too)."""
        a, kw = n.args, n.kwargs
        dim = a[2] if len(a) > 2 else kw.get("dim", -1)
        if len(a) > 1 and a[1] != 1 or kw.get("n", 1) != 1 or kw.get("append") is not None:
            return None
        x, pre = self(a[0]), (a[3] if len(a) > 3 else kw.get("prepend"))
        if not isinstance(x, Affine) or dim not in (-1, x.rank - 1):
            return None
        c = dict(x.terms).get(-1, 0)
        head = (slice(None),) * (x.rank - 1) + (slice(None, 1, None),)
        if not (isinstance(pre, fx.Node) and pre.op == "call_function" and pre.target is operator.sub
                and pre.args[1] == c and isinstance(pre.args[0], fx.Node)
                and pre.args[0].op == "call_function" and pre.args[0].target is operator.getitem
                and pre.args[0].args[0] is a[0]):
            return None
        first = pre.args[0].args[1]
        if (first if isinstance(first, tuple) else (first,)) != head:
            return None
        self.nodes += [pre, pre.args[0]]
        return Const(c)

    @staticmethod
    def _whole(base: fx.Node, idx: tuple) -> bool:
        """Whether ``base[idx]`` (slices only) keeps every element: ``[..., :n]`` with n ≥ the size."""
        meta = tensor_meta(base)
        if meta is None or len(idx) > meta.dim():
            return False
        for size, i in zip(meta.shape, idx):
            if not isinstance(i, slice) or i.step not in (None, 1) or i.start not in (None, 0):
                return False
            if i.stop is not None:
                stop = i.stop.meta.get("example_value") if isinstance(i.stop, fx.Node) else i.stop
                if stop is None or not statically_known_true(stop >= size):
                    return False
        return True


def mask_form(bias: fx.Node, scores_shape) -> MaskForm | None:
    """``MaskForm`` when additive ``bias`` is provably a causal (windowed) mask for these scores."""
    ev = _Eval()
    res = ev(bias)
    if not (isinstance(res, tuple) and res[0] == "bias"):
        return None
    return _form(res[1], ev, bias, scores_shape)


def keep_form(keep: fx.Node, scores_shape) -> MaskForm | None:
    """The same for a boolean "may attend" mask used as ``where(keep, scores, -big)``."""
    ev = _Eval()
    res = ev(keep)
    if not isinstance(res, Allowed):
        return None
    return _form(res, ev, keep, scores_shape)


def masked_form(masked: fx.Node, scores_shape) -> MaskForm | None:
    """The same for a boolean "masked out" mask used as ``where(masked, -big, scores)`` / ``masked_fill``.

    Only a single constraint can be negated exactly: ¬(e ≤ 0) ⇔ −e + 1 ≤ 0 over the integers.
    """
    ev = _Eval()
    res = ev(masked)
    if not isinstance(res, Allowed) or len(res.constraints) != 1 or res.chunks:
        return None
    (c,) = res.constraints
    negated = Affine(tuple((ax, -k) for ax, k in c.terms), -c.const + 1, c.rank, c.lengths)
    return _form(Allowed((negated,)), ev, masked, scores_shape)


def _form(allowed: Allowed, ev: _Eval, node: fx.Node, scores_shape) -> MaskForm | None:
    tq, tk = scores_shape[-2], scores_shape[-1]
    if not statically_known_true(tq == tk):
        return None
    causal, window = False, 0
    for c in allowed.constraints:
        terms, lengths = dict(c.terms), dict(c.lengths)
        if set(terms) != {-1, -2}:
            return None
        if not (statically_known_true(lengths.get(-2, -1) == tq) and statically_known_true(lengths.get(-1, -1) == tk)):
            return None
        if terms == {-1: 1, -2: -1} and c.const == 0:       # k - q <= 0
            causal = True
        elif terms == {-1: -1, -2: 1} and c.const <= 0:     # q - k + const <= 0  ⇔  q - k < 1 - const
            w = 1 - c.const
            window = w if not window else min(window, w)
        else:
            return None
    chunk = 0
    for a, b, size in allowed.chunks:
        if not _same_chunk(a, b, size, tq, tk) or chunk not in (0, size):
            return None
        chunk = size
    if not causal:
        return None
    if chunk and statically_known_true(tq <= chunk):
        chunk = 0  # every position is in the first chunk: the mask is just causal
    meta = tensor_meta(node)
    if meta is None or meta.dim() < 2:
        return None
    return MaskForm(True, window, tuple(dict.fromkeys(ev.nodes)), chunk)


def _same_chunk(a: Affine, b: Affine, size: int, tq, tk) -> bool:
    """``a // size == b // size`` says "key and query in the same aligned chunk": one is the
    key index plus c, the other the query index plus the same c, with c a multiple of size
    (then ``(k + c) // size == (q + c) // size`` ⇔ ``k // size == q // size``)."""
    ta, tb = dict(a.terms), dict(b.terms)
    if ta == {-2: 1} and tb == {-1: 1}:
        a, b, ta, tb = b, a, tb, ta
    if not (ta == {-1: 1} and tb == {-2: 1} and a.const == b.const and a.const % size == 0):
        return False
    la, lb = dict(a.lengths), dict(b.lengths)
    return statically_known_true(la.get(-1, -1) == tk) and statically_known_true(lb.get(-2, -1) == tq)
