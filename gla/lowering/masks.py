"""Prove that an additive mask is causal (or a causal sliding window) from how it is built.

The mask's producer subgraph is evaluated abstractly: ``arange`` values placed on the query (-2)
or key (-1) axis are affine index forms, comparisons between them are linear constraints, ``&``
joins constraints, and ``where(allowed, 0, -big)`` makes the additive mask. A mask built only from
these is the same at every sequence length, so the proof holds under dynamic shapes. Anything else
(a buffer, a padding mask from the batch) is runtime data: the mask then stays a general bias.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..rewrite import ops
from ..rewrite.graph import tensor_meta

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
class Allowed:
    """Positions where every constraint ``Σ coef·index + const ≤ 0`` holds."""

    constraints: tuple[Affine, ...]


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


class _Eval:
    def __init__(self):
        self.nodes: list[fx.Node] = []

    def __call__(self, x):
        if not isinstance(x, fx.Node):
            return x if isinstance(x, int) and not isinstance(x, bool) else None
        r = self._node(x)
        if r is not None:
            self.nodes.append(x)
        return r

    def _node(self, n: fx.Node):
        t, a = n.target, n.args
        if n.op == "call_function" and t is torch.arange:
            if len(a) != 1 or set(n.kwargs) - {"device", "dtype"}:
                return None
            length = a[0].meta.get("example_value") if isinstance(a[0], fx.Node) else a[0]  # SymInt under dynamic shapes
            return Affine(((-1, 1),), 0, 1, ((-1, length),))
        if n.op == "call_function" and t in (operator.add, operator.sub):
            x, y = self(a[0]), self(a[1])
            sign = 1 if t is operator.add else -1
            if isinstance(x, Affine) and isinstance(y, int):
                return x.shift(sign * y)
            if isinstance(x, int) and isinstance(y, Affine) and t is operator.add:
                return y.shift(x)
            return None
        if n.op == "call_function" and t is operator.getitem and isinstance(a[1], tuple):
            x = self(a[0])
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
            if isinstance(x, (Affine, Allowed)):
                return x
            return None
        if n.op == "call_function" and t is ops.cast:
            return self(a[0])
        if n.op == "call_function" and t in (operator.le, operator.lt, operator.ge, operator.gt):
            x, y = self(a[0]), self(a[1])
            if not (isinstance(x, Affine) and isinstance(y, Affine)):
                return None
            if t is operator.le:
                return Allowed((_sub(x, y),))
            if t is operator.lt:
                return Allowed((_sub(x, y).shift(1),))
            if t is operator.ge:
                return Allowed((_sub(y, x),))
            return Allowed((_sub(y, x).shift(1),))
        if n.op == "call_function" and t is operator.and_:
            x, y = self(a[0]), self(a[1])
            if isinstance(x, Allowed) and isinstance(y, Allowed):
                return Allowed(x.constraints + y.constraints)
            return None
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
    if not isinstance(res, Allowed) or len(res.constraints) != 1:
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
    if not causal:
        return None
    meta = tensor_meta(node)
    if meta is None or meta.dim() < 2:
        return None
    return MaskForm(True, window, tuple(dict.fromkeys(ev.nodes)))
