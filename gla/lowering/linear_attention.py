"""Gated linear attention written in plain PyTorch → ``gla.kernels.linear_attention.chunk_gla``.

Two forms are recognized, both the same function as GLA (``S_t = Diag(exp(g_t)) S_{t-1} + k_tᵀ v_t``,
``o_t = scale · q_t S_t``), so the rewrite is exact:

* **The recurrence**, a Python loop over time that Dynamo unrolls into a chain of T steps. The
  pattern roots at the ``torch.stack`` / ``torch.cat`` of the per-step outputs; ``RecurrenceLowering``
  walks the chain back to the initial state. Each step is read by a small abstract interpreter that
  tracks tensor axes as labels through slicing, ``unsqueeze``, broadcasting ``*``, ``einsum``,
  ``matmul``, ``sum`` and transposes (so ``q_t[..., None] * S).sum(-2)``, ``einsum("bhk,bhkv->bhv")``
  and ``q_t.unsqueeze(-2) @ S`` are one readout, and every outer-product spelling is one update). A
  step must be ``S_t = S_{t-1} · gate_t + k_t ⊗ v_t`` and ``o_t = c · Σ_k q_t S_t``, with q_t, k_t,
  v_t, g_t slices of the same tensors at t = 0..T-1 (the whole time axis). The gate is
  ``exp(x_t)`` (log gate x), ``sigmoid(x_t)`` (log gate ``logsigmoid(x)``: exact, the gate is > 0),
  or absent; per key channel or one per head. A gate that is neither (``S * a_t``), a state used
  outside the chain (the final state too, for now: the pipeline splices one value per match), a
  delta-rule update or a nonlinearity on S is declined with the reason.
* **The parallel form**: ``((q·exp(G)) (k·exp(-G))ᵀ ⊙ causal) v`` with ``G = cumsum(g)`` (per
  channel), or ``((q kᵀ) ⊙ exp(G_i − G_j) ⊙ causal) v`` (one gate per head), or ungated
  ``((q kᵀ) ⊙ causal) v``. The causal mask must be provable from the graph (``tril``, ``tril(ones)``,
  ``triu(ones, 1)`` inverted, ``arange`` comparisons); a mask buffer is runtime data: not matched.

Both lower to one ``chunk_gla`` call (the chunked form is stable where the parallel form's
``exp(-G)`` overflows). ``impl``: ``kernels="reference"`` → reference; ``"triton"`` → Triton
(declining with the kernel's reason); ``"auto"`` → Triton on CUDA, else the reference. The
Triton kernels take decays (log gate ≤ 0): a gate written as ``sigmoid(x)`` / ``exp(logsigmoid(x))``
is one for every x; ``exp(x)`` of an arbitrary x is not, so it runs the reference ("triton" declines).
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import Config
from ..rewrite import Match, leaf, ops
from ..rewrite.graph import hint_int, tensor_meta
from ..rewrite.mutation import GraphWrites
from .masks import keep_form
from .select import Decline, Selected


# ---------------------------------------------------------------------------------------------
# The replacement
# ---------------------------------------------------------------------------------------------
@leaf
def gla_call(q, k, v, g=None, initial_state=None, *, layout, gate, scale, out_perm, out_shape, out_dtype,
             state_perm=None, impl):
    """One ``chunk_gla`` call for a recognized GLA site.

    ``layout``: per input, ``(time_axis, batch_axes, channel_axis)`` — how to read the model's
    tensor as ``[B, T, H, D]`` (a missing head axis becomes H = 1). ``gate``: ``"log"`` (g is the
    log gate), ``"sigmoid"`` (the gate is sigmoid(g)). ``out_perm`` / ``out_shape``: how the
    ``[B, T, H, V]`` result is laid out in the model. ``state_perm``: the initial state's axes as
    ``[B, H, K, V]``.
    """
    from ..kernels.linear_attention import chunk_gla

    def to_bthd(x, lay):
        t_ax, batch, ch = lay
        dims = [batch[0], t_ax] + list(batch[1:]) + ([ch] if ch is not None else [])
        x = x.permute(dims)
        if len(batch) == 1:
            x = x.unsqueeze(2)
        return x.contiguous() if impl == "triton" else x  # the Triton kernels index dense [B, T, H, D]

    qk, kk, vk = to_bthd(q, layout["q"]), to_bthd(k, layout["k"]), to_bthd(v, layout["v"])
    gk = None
    if g is not None:
        gk = to_bthd(g, layout["g"])
        if gate == "sigmoid":
            gk = F.logsigmoid(gk.float())
    h0 = initial_state.permute(state_perm) if initial_state is not None else None
    if h0 is not None and h0.dim() == 3:
        h0 = h0.unsqueeze(1)
    if h0 is not None and impl == "triton":
        h0 = h0.contiguous()
    o, _ = chunk_gla(qk, kk, vk, gk, scale=scale, initial_state=h0, impl=impl)
    o = o.permute(out_perm).reshape(out_shape)
    return o if o.dtype == out_dtype else o.to(out_dtype)


def _impl_for(config: Config, device, inputs: dict, gate: str | None = None) -> str | Decline:
    """``choose_impl`` on the shapes the kernel will see (``inputs``: name -> (shape, dtype) or None).

    The Triton kernels take a log gate ≤ 0 (a decay); a log gate not provably ≤ 0 (``exp(x)`` of
    an arbitrary x, which the rewrite must reproduce for every x) runs the reference."""
    from types import SimpleNamespace

    from ..kernels.linear_attention import triton_unsupported_reason

    if config.kernels in ("reference", "pytorch"):
        return "reference"
    ns = {k: (SimpleNamespace(shape=tuple(v[0]), dtype=v[1], device=device) if v is not None else None)
          for k, v in inputs.items()}
    reason = triton_unsupported_reason(ns["q"], ns["k"], ns["v"], ns.get("g"), ns.get("initial_state"))
    if reason is None and gate == "log":
        reason = ("the log gate is not provably ≤ 0 (the Triton GLA kernel needs a decay; write the gate as "
                  "sigmoid(x) or exp(logsigmoid(x)))")
    if config.kernels == "triton":
        return Decline(reason) if reason else "triton"
    return "triton" if reason is None and device.type == "cuda" else "reference"


def _bthd_shape(t: torch.Tensor, lay) -> list[int]:
    t_ax, batch, ch = lay
    shape = [hint_int(t.shape[batch[0]]), hint_int(t.shape[t_ax])]
    shape += [hint_int(t.shape[b]) for b in batch[1:]] or [1]
    if ch is not None:
        shape.append(hint_int(t.shape[ch]))
    return shape


# ---------------------------------------------------------------------------------------------
# The abstract interpreter: axes as labels
# ---------------------------------------------------------------------------------------------
_fresh = itertools.count()


@dataclass
class Fac:
    """A factor of a product: a time slice of a tensor (``base[.., t, ..]``, possibly under exp or
    sigmoid), or an opaque tensor (``t is None``: a state, a gate tensor)."""

    kind: str                 # "slice" | "exp" | "sigmoid" | "node"
    base: fx.Node
    t_axis: int | None
    t: int | None
    labels: tuple             # one label per axis of base, time axis removed


@dataclass
class Term:
    """Σ_summed coef · Π facs, with ``out`` the label of each output axis (None: a singleton)."""

    facs: list
    out: list
    summed: set = field(default_factory=set)
    coef: Any = 1.0
    nodes: list = field(default_factory=list)

    def rename(self, m: dict) -> "Term":
        r = lambda l: m.get(l, l) if l is not None else None
        facs = [Fac(f.kind, f.base, f.t_axis, f.t, tuple(r(l) for l in f.labels)) for f in self.facs]
        return Term(facs, [r(l) for l in self.out], {r(l) for l in self.summed}, self.coef, self.nodes)


def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _meth(n, *names) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in names


def _is(n, fn_targets=(), methods=()) -> bool:
    return _call(n, *fn_targets) or _meth(n, *methods)


def _arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _shape(n) -> tuple | None:
    t = tensor_meta(n)
    return None if t is None else tuple(t.shape)


def _scalar(x) -> bool:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if isinstance(x, fx.Node):
        v = x.meta.get("example_value")
        return isinstance(v, (torch.SymFloat, torch.SymInt, int, float)) and not isinstance(v, bool)
    return False


class Interp:
    """Reads a value as a labelled product of slices and opaque tensors, or fails (``None``)."""

    def __init__(self, stop: set | None = None):
        self.stop = stop or set()   # nodes read as opaque even if interpretable

    def opaque(self, n: fx.Node) -> Term | None:
        s = _shape(n)
        if s is None:
            return None
        labels = tuple(next(_fresh) for _ in s)
        kind = "causal" if len(s) >= 2 and causal_mask(n, keep=True) is not None else "node"
        return Term([Fac(kind, n, None, None, labels)], list(labels), nodes=[])

    def __call__(self, n) -> Term | None:
        if not isinstance(n, fx.Node):
            return None
        if _written(n):  # written in place somewhere: only its value at run time says what it is
            return self.opaque(n)
        if n in self.stop or (_is(n, (torch.tril, ops.cast, operator.invert), ("tril", "bool", "float", "to"))
                              and causal_mask(n, keep=True) is not None):
            return self.opaque(n)
        r = self._node(n)
        if r is None:
            return self.opaque(n) if not self._interpretable(n) else None
        r.nodes = r.nodes + [n]
        return r

    def _single(self, n) -> Term | None:
        """n as one opaque tensor, possibly unsqueezed (``G[..., :, None]``)."""
        t = self(n)
        if t is None or len(t.facs) != 1 or t.facs[0].kind != "node" or t.summed or t.coef != 1.0:
            return None
        return t

    @staticmethod
    def _interpretable(n: fx.Node) -> bool:
        return (_call(n, operator.getitem, torch.select, torch.unsqueeze, torch.squeeze, torch.exp, torch.sigmoid,
                      operator.mul, torch.einsum, torch.functional.einsum, torch.matmul, torch.sum, torch.transpose,
                      torch.permute, ops.cast, operator.neg, torch.neg, operator.truediv, torch.tril, torch.where)
                or _meth(n, "select", "unsqueeze", "squeeze", "exp", "sigmoid", "sum", "contiguous", "clone", "neg",
                         "tril"))

    def _index(self, n: fx.Node, x: fx.Node, idx: tuple) -> Term | None:
        tx = self(x) if self._interpretable(x) and x not in self.stop else None
        if tx is not None:  # x is a per-step term: only unsqueeze / squeeze of singletons
            idx = self._expand_ellipsis(idx, len(tx.out))
            if idx is None:
                return None
            out, pos = [], 0
            for i in idx:
                if i is None:
                    out.append(None)
                elif i == slice(None):
                    out.append(tx.out[pos]); pos += 1
                elif i == 0 and isinstance(i, int) and tx.out[pos] is None:
                    pos += 1
                else:
                    return None
            out += tx.out[pos:]
            return Term(tx.facs, out, tx.summed, tx.coef, tx.nodes)
        # a slice of a tensor at one time step
        if _shape(x) is None:
            return None
        rank = len(_shape(x))
        idx = self._expand_ellipsis(idx, rank)
        if idx is None:
            return None
        ints = [p for p, i in enumerate(idx) if isinstance(i, int) and not isinstance(i, bool)]
        if not ints and all(i is None or i == slice(None) for i in idx):  # unsqueeze of a whole tensor
            tx = self.opaque(x)
            out, pos = [], 0
            for i in idx:
                if i is None:
                    out.append(None)
                else:
                    out.append(tx.out[pos]); pos += 1
            return Term(tx.facs, out + tx.out[pos:], set(), 1.0, [])
        if len(ints) != 1 or not all(i is None or i == slice(None) or isinstance(i, int) for i in idx):
            return None
        labels, out, axis, t_axis, t = [], [], 0, None, None
        for i in idx:
            if i is None:
                out.append(None)
                continue
            if isinstance(i, int):
                t_axis, t = axis, i % hint_int(_shape(x)[axis])
            else:
                l = next(_fresh)
                labels.append(l)
                out.append(l)
            axis += 1
        while axis < rank:
            l = next(_fresh)
            labels.append(l); out.append(l); axis += 1
        return Term([Fac("slice", x, t_axis, t, tuple(labels))], out)

    @staticmethod
    def _expand_ellipsis(idx, rank):
        idx = tuple(idx) if isinstance(idx, (tuple, list)) else (idx,)
        if sum(i is Ellipsis for i in idx) > 1:
            return None
        if Ellipsis in idx:
            p = idx.index(Ellipsis)
            n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
            idx = idx[:p] + (slice(None),) * (rank - n_real) + idx[p + 1:]
        return idx

    def _node(self, n: fx.Node) -> Term | None:
        a = n.args
        if _call(n, operator.getitem) and isinstance(n.args[0], fx.Node):
            return self._index(n, a[0], a[1])
        if _is(n, (torch.select,), ("select",)):
            x, dim, i = a[0], _arg(n, 1, "dim"), _arg(n, 2, "index")
            s = _shape(x)
            if s is None or not isinstance(dim, int) or not isinstance(i, int):
                return None
            dim %= len(s)
            return self._index(n, x, (slice(None),) * dim + (i,))
        if _is(n, (torch.unsqueeze,), ("unsqueeze",)):
            tx = self(a[0])
            d = _arg(n, 1, "dim")
            if tx is None or not isinstance(d, int):
                return None
            d = d % (len(tx.out) + 1)
            return Term(tx.facs, tx.out[:d] + [None] + tx.out[d:], tx.summed, tx.coef, tx.nodes)
        if _is(n, (torch.squeeze,), ("squeeze",)):
            tx = self(a[0])
            d = _arg(n, 1, "dim")
            if tx is None or not isinstance(d, int):
                return None
            d %= len(tx.out)
            if tx.out[d] is not None:
                return None
            return Term(tx.facs, tx.out[:d] + tx.out[d + 1:], tx.summed, tx.coef, tx.nodes)
        if _call(n, ops.cast) or _meth(n, "contiguous", "clone"):
            return self(a[0])
        if _is(n, (torch.exp, torch.sigmoid), ("exp", "sigmoid")):
            is_exp = _is(n, (torch.exp,), ("exp",))
            if is_exp and _is(a[0], (operator.sub, torch.sub), ("sub",)) and len(a[0].args) == 2 \
                    and not a[0].kwargs:  # exp(x - y) = exp(x) · exp(-y)
                tx, ty = self._single(a[0].args[0]), self._single(a[0].args[1])
                if tx is None or ty is None:
                    return None
                ty = Term([Fac("expneg", ty.facs[0].base, None, None, ty.facs[0].labels)], ty.out, set(), 1.0, ty.nodes)
                tx = Term([Fac("exp", tx.facs[0].base, None, None, tx.facs[0].labels)], tx.out, set(), 1.0, tx.nodes)
                r = _broadcast_mul(tx, ty)
                r.nodes = r.nodes + [a[0]]
                return r
            tx = self(a[0])
            if tx is None or len(tx.facs) != 1 or tx.summed or tx.coef not in (1.0, -1.0):
                return None
            f = tx.facs[0]
            if f.kind == "slice" and tx.coef == 1.0:
                kind = "exp" if is_exp else "sigmoid"
            elif f.kind == "node" and is_exp:
                kind = "exp" if tx.coef == 1.0 else "expneg"
            else:
                return None
            return Term([Fac(kind, f.base, f.t_axis, f.t, f.labels)], tx.out, set(), 1.0, tx.nodes)
        if _is(n, (operator.neg, torch.neg), ("neg",)):
            tx = self(a[0])
            return None if tx is None else Term(tx.facs, tx.out, tx.summed, _mul_coef(tx.coef, -1.0), tx.nodes)
        if _call(n, operator.truediv) and len(a) == 2:
            tx, ty = self(a[0]), self(a[1])
            if tx is None or ty is None or len(ty.facs) != 1 or ty.facs[0].kind not in ("exp", "expneg") \
                    or ty.coef != 1.0 or ty.summed:
                return None
            f = ty.facs[0]
            flip = Fac("expneg" if f.kind == "exp" else "exp", f.base, f.t_axis, f.t, f.labels)
            return _broadcast_mul(tx, Term([flip], ty.out, set(), 1.0, ty.nodes))
        if _is(n, (torch.tril,), ("tril",)):
            if _arg(n, 1, "diagonal", 0) != 0:
                return None
            tx = self(a[0])
            if tx is None or len(tx.out) < 2 or None in tx.out[-2:]:
                return None
            mask = Fac("causal", n, None, None, tuple(tx.out[-2:]))
            return Term(tx.facs + [mask], tx.out, tx.summed, tx.coef, tx.nodes)
        if _call(n, torch.where) and len(a) == 3:
            cond, x, y = a
            for keep, value, zero in ((True, x, y), (False, y, x)):
                if _zero(zero) and isinstance(cond, fx.Node) and causal_mask(cond, keep=keep) is not None:
                    tv = self(value)
                    if tv is None or len(tv.out) < 2:
                        return None
                    tc = Term([Fac("causal", cond, None, None, tuple(next(_fresh) for _ in _shape(cond)))],
                              None, set(), 1.0, [])
                    tc.out = list(tc.facs[0].labels)
                    return _broadcast_mul(tv, tc)
            return None
        if _call(n, operator.mul):
            x, y = a
            if _scalar(y) or _scalar(x):
                s, other = (y, x) if _scalar(y) else (x, y)
                tx = self(other)
                if tx is None:
                    return None
                return Term(tx.facs, tx.out, tx.summed, _mul_coef(tx.coef, s), tx.nodes)
            tx, ty = self(x), self(y)
            if tx is None or ty is None:
                return None
            return _broadcast_mul(tx, ty)
        if _call(n, torch.einsum, torch.functional.einsum):
            args = a[1] if len(a) == 2 and isinstance(a[1], (list, tuple)) else a[1:]
            if len(args) != 2 or not isinstance(a[0], str):
                return None
            return self._einsum(a[0], [self(x) for x in args])
        if _call(n, torch.matmul):
            tx, ty = self(a[0]), self(a[1])
            if tx is None or ty is None or len(tx.out) < 2 or len(ty.out) < 2:
                return None
            ty = ty.rename({})  # copy
            return _matmul(tx, ty)
        if _is(n, (torch.sum,), ("sum",)):
            tx = self(a[0])
            d = _arg(n, 1, "dim")
            if tx is None or isinstance(d, (list, tuple)) and len(d) == 1:
                d = d[0] if isinstance(d, (list, tuple)) else d
            if tx is None or not isinstance(d, int) or n.kwargs.get("keepdim") or n.kwargs.get("dtype") \
                    or len(a) > 2:
                return None
            d %= len(tx.out)
            l = tx.out[d]
            if l is None:
                return None
            return Term(tx.facs, tx.out[:d] + tx.out[d + 1:], tx.summed | {l}, tx.coef, tx.nodes)
        if _call(n, torch.transpose):
            tx = self(a[0])
            if tx is None:
                return None
            out = list(tx.out)
            i, j = a[1] % len(out), a[2] % len(out)
            out[i], out[j] = out[j], out[i]
            return Term(tx.facs, out, tx.summed, tx.coef, tx.nodes)
        if _call(n, torch.permute):
            tx = self(a[0])
            if tx is None:
                return None
            return Term(tx.facs, [tx.out[d] for d in a[1]], tx.summed, tx.coef, tx.nodes)
        return None

    def _einsum(self, eq: str, terms) -> Term | None:
        if any(t is None for t in terms):
            return None
        eq = eq.replace(" ", "")
        if "..." in eq or "->" not in eq:
            return None
        lhs, rhs = eq.split("->")
        specs = lhs.split(",")
        if len(specs) != 2 or any(len(s) != len(t.out) for s, t in zip(specs, terms)):
            return None
        letter: dict[str, Any] = {}
        renames = []
        for spec, t in zip(specs, terms):
            m = {}
            for c, l in zip(spec, t.out):
                if l is None:
                    continue
                if c in letter and letter[c] is not None:
                    m[l] = letter[c]
                else:
                    letter[c] = l
            renames.append(m)
        a, b = terms[0].rename(renames[0]), terms[1].rename(renames[1])
        out = [letter.get(c) for c in rhs]
        summed = a.summed | b.summed | {letter[c] for c in letter if c not in rhs and letter[c] is not None}
        return Term(a.facs + b.facs, out, summed, _mul_coef(a.coef, b.coef), a.nodes + b.nodes)


def _mul_coef(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a * b
    return ("product", a, b)  # symbolic: read by the lowering as a declined scale


def _broadcast_mul(tx: Term, ty: Term) -> Term | None:
    n = max(len(tx.out), len(ty.out))
    ox = [None] * (n - len(tx.out)) + list(tx.out)
    oy = [None] * (n - len(ty.out)) + list(ty.out)
    m = {}
    out = []
    for lx, ly in zip(ox, oy):
        if lx is not None and ly is not None:
            m[ly] = lx
            out.append(lx)
        else:
            out.append(lx if lx is not None else ly)
    ty = ty.rename(m)
    return Term(tx.facs + ty.facs, out, tx.summed | ty.summed, _mul_coef(tx.coef, ty.coef), tx.nodes + ty.nodes)


def _matmul(tx: Term, ty: Term) -> Term | None:
    bx, by = tx.out[:-2], ty.out[:-2]
    n = max(len(bx), len(by))
    bx = [None] * (n - len(bx)) + list(bx)
    by = [None] * (n - len(by)) + list(by)
    m = {}
    batch = []
    for lx, ly in zip(bx, by):
        if lx is not None and ly is not None:
            m[ly] = lx
            batch.append(lx)
        else:
            batch.append(lx if lx is not None else ly)
    kx, ky = tx.out[-1], ty.out[-2]
    if kx is None or ky is None:
        return None
    m[ky] = kx
    ty = ty.rename(m)
    out = batch + [tx.out[-2], ty.out[-1]]
    return Term(tx.facs + ty.facs, out, tx.summed | ty.summed | {kx}, _mul_coef(tx.coef, ty.coef),
                tx.nodes + ty.nodes)


# ---------------------------------------------------------------------------------------------
# Causal masks (proved from how they are built; a buffer is runtime data)
# ---------------------------------------------------------------------------------------------
def _zero(x) -> bool:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x == 0
    return isinstance(x, fx.Node) and (_call(x, torch.zeros, torch.zeros_like) or _meth(x, "new_zeros"))


def _ones_square(x) -> bool:
    s = _shape(x)
    return (_call(x, torch.ones, torch.ones_like) or _meth(x, "new_ones")) and s is not None and len(s) >= 2 \
        and statically_known_true(s[-1] == s[-2])


def _written(n: fx.Node, besides: fx.Node | None = None) -> bool:
    return GraphWrites.of(n.graph).written(n, besides)


def _producers(n: fx.Node) -> list[fx.Node] | None:
    """n and the tensor-valued call nodes it is built from (a constant mask's subgraph); None if
    one of them is written in place (the subgraph no longer says what the mask holds)."""
    out, stack, seen = [], [n], set()
    while stack:
        x = stack.pop()
        if x in seen or x.op not in ("call_function", "call_method") or tensor_meta(x) is None:
            continue
        if _written(x):
            return None
        seen.add(x)
        out.append(x)
        stack.extend(x.all_input_nodes)
    return out


def causal_mask(n: fx.Node, keep: bool = True) -> list[fx.Node] | None:
    """The nodes of ``n`` when it provably is the causal "may attend" mask (``keep``: 1 where
    key ≤ query) or its complement (``keep=False``: 1 where key > query); else None."""
    if not isinstance(n, fx.Node):
        return None
    x = n
    while (_call(x, ops.cast) or _meth(x, "bool", "float", "to", "type_as", "contiguous")) and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    s = _shape(x)
    if s is None or len(s) < 2 or not statically_known_true(s[-1] == s[-2]):
        return None
    if _call(x, operator.invert, torch.logical_not) or _meth(x, "logical_not", "bitwise_not"):
        return _producers(n) if causal_mask(x.args[0], not keep) is not None else None
    diag = _arg(x, 1, "diagonal", 0)
    if keep and _is(x, (torch.tril,), ("tril",)) and diag == 0 and _ones_square(x.args[0]):
        return _producers(n)
    if not keep and _is(x, (torch.triu,), ("triu",)) and diag == 1 and _ones_square(x.args[0]):
        return _producers(n)
    if keep and tensor_meta(x).dtype == torch.bool:
        form = keep_form(x, list(s))
        if form is not None and form.causal and not form.window and not form.chunk:
            return _producers(n)
    return None


# ---------------------------------------------------------------------------------------------
# The recurrence
# ---------------------------------------------------------------------------------------------
_ZEROS = (torch.zeros, torch.zeros_like)


def _is_zeros(n) -> bool:
    if isinstance(n, fx.Node) and _written(n, besides=n if _meth(n, "zero_") else None):
        return False
    if _call(n, *_ZEROS) or _meth(n, "new_zeros", "zero_"):
        return True
    if _call(n, torch.full) and len(n.args) > 1 and n.args[1] == 0:
        return True
    return False


@dataclass
class Step:
    t: int
    q: Fac
    k: Fac
    v: Fac
    gate: Fac | None
    state: fx.Node        # S_t
    prev: fx.Node         # S_{t-1}
    roles: dict           # S_t label -> role
    out_roles: list       # o_t axes as roles (None: a singleton)
    coef: Any
    nodes: list
    s_labels: tuple = ()


class _NotMine(Exception):
    pass


class _Declined(Exception):
    pass


def _read_step(o_t: fx.Node, t: int) -> Step:
    """One step from its readout ``o_t``; ``_NotMine`` if o_t is no contraction with a state,
    ``_Declined`` with a reason when it is one but not a GLA step."""
    r = Interp()(o_t)
    if r is None:
        raise _NotMine()
    slices = [f for f in r.facs if f.kind == "slice"]
    opaque = [f for f in r.facs if f.kind == "node"]
    if len(r.facs) != 2 or len(slices) != 1 or len(opaque) != 1 or len(r.summed) != 1:
        raise _NotMine()
    qf, sf = slices[0], opaque[0]
    S = sf.base
    k_label = next(iter(r.summed))
    if qf.labels[-1] != k_label or len(sf.labels) != len(qf.labels) + 1 or len(sf.labels) not in (3, 4):
        raise _NotMine()
    if not set(qf.labels) <= set(sf.labels):
        raise _NotMine()
    roles = {}
    for i, l in enumerate(qf.labels[:-1]):
        roles[l] = f"b{i}"
    roles[k_label] = "k"
    v_labels = [l for l in sf.labels if l not in roles]
    if len(v_labels) != 1:
        raise _NotMine()
    roles[v_labels[0]] = "v"
    out_roles = [roles.get(l) if l is not None else None for l in r.out]
    if any(l is not None and l not in roles for l in r.out):
        raise _NotMine()
    # from here on it is a readout q_t · S: the state update decides
    if not _call(S, operator.add):
        what = S.target if isinstance(S.target, str) else getattr(S.target, "__name__", str(S.target))
        if S.op == "call_function" or S.op == "call_method":
            raise _Declined(f"the state read at step {t} (`{S.name}`) is computed by {what}, not "
                            "S·gate + k⊗v (a nonlinearity or another update rule on S)")
        raise _NotMine()
    s_shape = _shape(S)
    interp = Interp()
    parts = [interp(x) for x in S.args]
    if any(p is None for p in parts):
        raise _Declined(f"step {t}: the state update `{S.name}` is not S·gate + k⊗v")
    upd = [p for p in parts if len(p.facs) == 2 and all(f.kind == "slice" for f in p.facs)]
    if len(upd) != 1:
        raise _Declined(f"step {t}: the state update `{S.name}` has no k⊗v outer-product term "
                        "(a delta rule or another update is not GLA)")
    upd = upd[0]
    dec = parts[1] if parts[0] is upd else parts[0]
    if upd.summed or upd.coef != 1.0 or dec.summed or dec.coef != 1.0:
        raise _Declined(f"step {t}: the state update `{S.name}` scales or contracts its terms")
    n = len(s_shape)
    if len(upd.out) != n or len(dec.out) > n:
        raise _Declined(f"step {t}: the state update changes the state's rank")
    upd_roles = {l: roles[sf.labels[i]] for i, l in enumerate(upd.out) if l is not None}
    dec_out = [None] * (n - len(dec.out)) + list(dec.out)
    dec_roles = {l: roles[sf.labels[i]] for i, l in enumerate(dec_out) if l is not None}
    kf = vf = None
    for f in upd.facs:
        rs = [upd_roles.get(l) for l in f.labels]
        nb = len(qf.labels) - 1
        if rs == [f"b{i}" for i in range(nb)] + ["k"]:
            kf = f
        elif rs == [f"b{i}" for i in range(nb)] + ["v"]:
            vf = f
    if kf is None or vf is None:
        raise _Declined(f"step {t}: the update `{S.name}` is not k_t ⊗ v_t over the state's key and value axes "
                        "with batch/head axes in the order q uses")
    states = [f for f in dec.facs if f.kind == "node" and _shape(f.base) == s_shape]
    if len(states) != 1:
        raise _Declined(f"step {t}: the update `{S.name}` does not carry a previous state of the same shape")
    prev = states[0]
    if [dec_roles.get(l) for l in prev.labels] != [roles[l] for l in sf.labels]:
        raise _Declined(f"step {t}: the previous state enters `{S.name}` with its axes permuted")
    gates = [f for f in dec.facs if f is not prev]
    gate = None
    if len(gates) > 1:
        raise _Declined(f"step {t}: the state is multiplied by {len(gates)} factors; GLA takes one gate")
    if gates:
        gate = gates[0]
        if gate.kind == "node" or gate.kind == "slice" and not _is(gate.base, (torch.exp, torch.sigmoid),
                                                                   ("exp", "sigmoid")):
            raise _Declined(f"step {t}: non-exponential gate: S is multiplied by `{gate.base.name}`, not "
                            "exp(g_t) or sigmoid(x_t); GLA needs a log gate")
        rs = [dec_roles.get(l) for l in gate.labels]
        nb = len(qf.labels) - 1
        if rs not in ([f"b{i}" for i in range(nb)] + ["k"], [f"b{i}" for i in range(nb)]):
            raise _Declined(f"step {t}: the gate's axes are {rs}; GLA gates per key channel or per head "
                            "(not over the value axis)")
    nodes = list(r.nodes) + [S] + [x for p in parts for x in p.nodes]
    return Step(t, qf, kf, vf, gate, S, prev.base, roles, out_roles, r.coef, nodes, sf.labels)


def _same_source(facs: list[Fac], name: str) -> tuple[fx.Node, int, str] | str:
    bases = {(f.base, f.t_axis, f.kind) for f in facs}
    if len(bases) != 1:
        return f"the steps read {name} from different tensors or axes"
    base, t_axis, kind = bases.pop()
    T = hint_int(_shape(base)[t_axis])
    if [f.t for f in facs] != list(range(len(facs))):
        return f"the steps read {name} at t = {[f.t for f in facs][:6]}…, not 0, 1, 2, …"
    if T != len(facs):
        return f"the loop covers {len(facs)} of the {T} time steps of {name}"
    return base, t_axis, kind


def _layout(f: Fac, base: fx.Node) -> tuple:
    axes = [i for i in range(len(_shape(base))) if i != f.t_axis]
    return (f.t_axis, tuple(axes[:-1]), axes[-1])


class RecurrenceLowering:
    """``torch.stack``/``torch.cat`` of the outputs of an unrolled GLA recurrence → one ``chunk_gla``."""

    @staticmethod
    def signature(outs, dim=0):
        """The captures this lowering takes."""

    def select(self, match: Match, config: Config) -> Selected | Decline | None:
        outs, dim = match.captures["outs"], match.captures.get("dim", 0)
        is_cat = match.root.target is torch.cat
        if not isinstance(outs, (list, tuple)) or not outs or not all(isinstance(o, fx.Node) for o in outs) \
                or not isinstance(dim, int):
            return None
        try:
            steps = []
            for t, o in enumerate(outs):
                steps.append(_read_step(o, t))
        except _NotMine:
            return None
        except _Declined as e:
            return Decline(str(e))
        T = len(steps)
        # the chain: S_{t-1} of each step is S of the one before
        for a, b in zip(steps, steps[1:]):
            if b.prev is not a.state:
                return Decline(f"step {b.t} does not update the state step {a.t} read (`{a.state.name}`)")
        if any(s.out_roles != steps[0].out_roles for s in steps) or any(s.coef != steps[0].coef for s in steps):
            return Decline("the steps read their outputs differently")
        scale = steps[0].coef
        if not isinstance(scale, (int, float)):
            return Decline("the output scale is not a constant number")
        gkinds = {(s.gate.kind if s.gate else None) for s in steps}
        if len(gkinds) != 1:
            return Decline("some steps are gated and others not")
        srcs = {}
        for name, pick in (("q", lambda s: s.q), ("k", lambda s: s.k), ("v", lambda s: s.v)) + \
                ((("g", lambda s: s.gate),) if steps[0].gate else ()):
            src = _same_source([pick(s) for s in steps], name)
            if isinstance(src, str):
                return Decline(src)
            srcs[name] = src
        # the region: every node the steps read, and the initial state if it is zeros
        h0 = steps[0].prev
        region = {n for s in steps for n in s.nodes}
        initial = None
        final = steps[-1].state
        consumed = set(region)
        if _is_zeros(h0):
            region.add(h0)  # evaluated with the region (never a random leaf); it may be shared
        else:
            initial = h0
        for n in consumed:
            outside = [u for u in n.users if u not in region and u is not match.root]
            if outside:
                if n is final:
                    return Decline(f"the final state `{final.name}` is used after the loop "
                                   f"(by `{outside[0].name}`); returning it is not supported yet")
                if n in {s.state for s in steps}:
                    return Decline(f"the intermediate state `{n.name}` is used outside the recurrence "
                                   f"(by `{outside[0].name}`): the states would have to be materialized")
                return Decline(f"`{n.name}` inside the recurrence is used outside it (by `{outside[0].name}`)")
        # layouts
        lays, args = {}, {}
        for name in srcs:
            base, t_axis, kind = srcs[name]
            f = getattr(steps[0], name if name != "g" else "gate")
            lay = _layout(f, base)
            if name == "g":
                nb = len(steps[0].q.labels) - 1
                per_channel = len(f.labels) == nb + 1
                axes = [i for i in range(len(_shape(base))) if i != t_axis]
                lay = (t_axis, tuple(axes[:nb]), axes[nb] if per_channel else None)
                if kind == "slice":  # a slice of exp(x) / sigmoid(x) computed before the loop
                    kind = "exp" if _is(base, (torch.exp,), ("exp",)) else "sigmoid"
                    base = base.args[0]
                if kind == "exp" and _call(base, F.logsigmoid):  # exp(logsigmoid(x)) = sigmoid(x): a decay
                    kind, base = "sigmoid", base.args[0]
                lays["gate"] = "sigmoid" if kind == "sigmoid" else "log"
            lays[name] = lay
            args[name] = base
        role_of_axis = [steps[-1].roles[l] for l in steps[-1].s_labels]
        kwargs = dict(q=args["q"], k=args["k"], v=args["v"], g=args.get("g"), initial_state=initial)
        if initial is not None:
            order = ["b0", "b1", "k", "v"] if "b1" in role_of_axis else ["b0", "k", "v"]
            kwargs["state_perm"] = [role_of_axis.index(r) for r in order]
        # output: o_t's axes as roles, with the time axis where the stack / cat puts it
        o_roles = list(steps[0].out_roles)
        if is_cat:
            d = dim % len(o_roles)
            if o_roles[d] is not None:
                return Decline("the per-step outputs are concatenated along a real axis, not a time axis")
            o_roles[d] = "T"
        else:
            o_roles.insert(dim % (len(o_roles) + 1), "T")
        real = [r for r in o_roles if r is not None]
        kernel_axes = ["b0", "T", "b1", "v"]
        want = kernel_axes if "b1" in role_of_axis else ["b0", "T", "v"]
        if sorted(real) != sorted(want):
            return Decline(f"the output axes {o_roles} are not the state's batch, head and value axes plus time")
        out_perm = [kernel_axes.index(r) for r in real] + ([] if "b1" in role_of_axis else [2])
        metas = {n: tensor_meta(args[n]) for n in args}
        shapes = {n: (_bthd_shape(metas[n], lays[n]), torch.float32 if n == "g" and lays["gate"] == "sigmoid"
                      else metas[n].dtype) for n in args}
        if initial is not None:
            ti = tensor_meta(initial)
            shapes["initial_state"] = ([hint_int(s) for s in ti.shape], ti.dtype)
        impl = _impl_for(config, metas["q"].device, shapes, lays.get("gate"))
        if isinstance(impl, Decline):
            return impl
        root = tensor_meta(match.root)
        kwargs.update(layout={k: lays[k] for k in ("q", "k", "v", "g") if k in lays}, gate=lays.get("gate"),
                      scale=float(scale), out_perm=out_perm, out_shape=[hint_int(s) for s in root.shape],
                      out_dtype=root.dtype, impl=impl)
        if kwargs["g"] is None:
            kwargs.pop("g")
        if initial is None:
            kwargs.pop("initial_state")
        gdesc = "no gate" if "g" not in args else \
            ("per-channel" if lays["g"][2] is not None else "per-head") + f" {lays['gate']} gate"
        extra = [n for n in region if n is not match.root]
        return Selected(gla_call, kwargs, f"gla::chunk_gla[{impl}] (recurrence, T={T}, {gdesc}"
                        + (", initial state" if initial is not None else "") + ")", extra)


class ParallelLowering:
    """``(causal(q·exp(G) (k·exp(-G))ᵀ) · c) @ v`` and its per-head and ungated forms → one ``chunk_gla``."""

    @staticmethod
    def signature(scores, v, eq=None):
        """The captures this lowering takes."""

    def select(self, match: Match, config: Config) -> Selected | Decline | None:
        A = match.captures["scores"]
        if not (_call(A, operator.mul, torch.where) or _is(A, (torch.tril,), ("tril",))):
            return None
        r = Interp()(match.root)
        if r is None:
            return None
        causal = [f for f in r.facs if f.kind == "causal"]
        tensors = [f for f in r.facs if f.kind == "node"]
        exps = [f for f in r.facs if f.kind in ("exp", "expneg")]
        if not causal or len(tensors) != 3 or len(causal) + len(tensors) + len(exps) != len(r.facs):
            if causal and any(f.kind == "node" for f in r.facs):
                return Decline("a causal q·kᵀ product times v, but not of the GLA form "
                               "(q·exp(G), k·exp(-G) or exp(G_i - G_j) decays)")
            return None
        t, s_ = causal[0].labels[-2:]
        if any(f.labels[-2:] != (t, s_) for f in causal):
            return Decline("the causal masks do not agree on the query and key axes")
        vf = next((f for f in tensors if f.base is match.captures["v"]), None)
        if vf is None or len(r.summed) != 2 or s_ not in r.summed:
            return None
        k_label = next(iter(r.summed - {s_}))
        rest = [f for f in tensors if f is not vf]
        qf = next((f for f in rest if t in f.labels and s_ not in f.labels), None)
        kf = next((f for f in rest if s_ in f.labels and t not in f.labels), None)
        if qf is None or kf is None or qf is kf:
            return None
        v_label = [l for l in vf.labels if l not in set(qf.labels) | {s_}]
        if len(v_label) != 1:
            return None
        v_label = v_label[0]
        batch = [l for l in qf.labels if l not in (t, k_label)]
        if not (1 <= len(batch) <= 2) or set(qf.labels) != set(batch) | {t, k_label} \
                or set(kf.labels) != set(batch) | {s_, k_label} or set(vf.labels) != set(batch) | {s_, v_label} \
                or set(l for l in r.out if l is not None) != set(batch) | {t, v_label} \
                or any(len(set(f.labels)) != len(f.labels) for f in (qf, kf, vf)):
            return Decline("the causal product's axes are not q [.., T, K], k [.., S, K], v [.., S, V] "
                           "with common batch/head axes")

        def lay(f, time, ch):
            return (f.labels.index(time), tuple(f.labels.index(b) for b in batch),
                    f.labels.index(ch) if ch is not None else None)

        lays = {"q": lay(qf, t, k_label), "k": lay(kf, s_, k_label), "v": lay(vf, s_, v_label)}
        args = {"q": qf.base, "k": kf.base, "v": vf.base}
        region = set(r.nodes) | {match.root}
        gdesc = "no gate"
        if exps:
            pos = [f for f in exps if f.kind == "exp"]
            neg = [f for f in exps if f.kind == "expneg"]
            if len(pos) != 1 or len(neg) != 1 or pos[0].base is not neg[0].base:
                return Decline("the decays are not exp(G) on the query side and exp(-G) on the key side "
                               "of one cumulative gate G")
            G = pos[0].base
            lp, ln = pos[0].labels, neg[0].labels
            if t not in lp or s_ in lp or [s_ if l == t else l for l in lp] != list(ln) \
                    or not set(batch) <= set(lp) or not set(lp) <= set(batch) | {t, k_label}:
                return Decline("the gate G is not laid out like q/k (per key channel or per head) on both sides")
            if not _is(G, (torch.cumsum,), ("cumsum",)) or set(G.kwargs) - {"dim"}:
                return Decline(f"the decays exp(±G) use `{G.name}`, not a cumulative sum of log gates")
            dim = _arg(G, 1, "dim")
            if not isinstance(dim, int) or dim % len(lp) != lp.index(t):
                return Decline("G is a cumulative sum over another axis than time")
            args["g"] = G.args[0]
            lays["g"] = lay(pos[0], t, k_label if k_label in lp else None)
            lays["gate"] = "log"
            if _call(args["g"], F.logsigmoid):  # cumsum(logsigmoid(x)): a decay, ≤ 0 by construction
                args["g"], lays["gate"] = args["g"].args[0], "sigmoid"
            gdesc = ("per-channel" if k_label in lp else "per-head") + " log gate"
            if all(u in region for u in G.users):
                region.add(G)
        scale = r.coef
        if not isinstance(scale, (int, float)):
            return Decline("the scale is not a constant number")
        for n in region:
            if n is match.root:
                continue
            outside = [u for u in n.users if u not in region]
            if outside:
                return Decline(f"`{n.name}` of the causal linear attention is used outside it (by `{outside[0].name}`)")
        for f in causal:
            region |= set(causal_mask(f.base, keep=True) or causal_mask(f.base, keep=False) or [])
        kernel_axes = ["b0", "T", "b1", "v"]
        roles = {batch[0]: "b0", t: "T", v_label: "v"}
        if len(batch) == 2:
            roles[batch[1]] = "b1"
        real = [roles[l] for l in r.out if l is not None]
        out_perm = [kernel_axes.index(x) for x in real] + ([] if len(batch) == 2 else [2])
        metas = {n: tensor_meta(args[n]) for n in args}
        shapes = {n: (_bthd_shape(metas[n], lays[n]), metas[n].dtype) for n in args}
        impl = _impl_for(config, metas["q"].device, shapes, lays.get("gate"))
        if isinstance(impl, Decline):
            return impl
        root = tensor_meta(match.root)
        kwargs = dict(args, layout={k: lays[k] for k in ("q", "k", "v", "g") if k in lays}, gate=lays.get("gate"),
                      scale=float(scale), out_perm=out_perm, out_shape=[hint_int(x) for x in root.shape],
                      out_dtype=root.dtype, impl=impl)
        extra = [n for n in region if n is not match.root]
        return Selected(gla_call, kwargs, f"gla::chunk_gla[{impl}] (parallel form, {gdesc})", extra)
