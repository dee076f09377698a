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
  outside the chain (but the final state, which the kernel also returns), a delta-rule update or a
  nonlinearity on S is declined with the reason.
* **The parallel form**: ``((q·exp(G)) (k·exp(-G))ᵀ ⊙ causal) v`` with ``G = cumsum(g)`` (per
  channel), or ``((q kᵀ) ⊙ exp(G_i − G_j) ⊙ causal) v`` (one gate per head), or ungated
  ``((q kᵀ) ⊙ causal) v``. The causal mask must be provable from the graph (``tril``, ``tril(ones)``,
  ``triu(ones, 1)`` inverted, ``arange`` comparisons); a mask buffer is runtime data and declines.

Both lower to one ``chunk_gla`` call (the chunked form is stable where the parallel form's
``exp(-G)`` overflows). ``impl``: ``kernels="reference"`` → reference; ``"triton"`` → Triton
(declining with the kernel's reason); ``"auto"`` → Triton on CUDA, else the reference.
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
        return x

    qk, kk, vk = to_bthd(q, layout["q"]), to_bthd(k, layout["k"]), to_bthd(v, layout["v"])
    gk = None
    if g is not None:
        gk = to_bthd(g, layout["g"])
        if gate == "sigmoid":
            gk = F.logsigmoid(gk.float())
    h0 = initial_state.permute(state_perm) if initial_state is not None else None
    if h0 is not None and h0.dim() == 3:
        h0 = h0.unsqueeze(1)
    o, _ = chunk_gla(qk, kk, vk, gk, scale=scale, initial_state=h0, impl=impl)
    o = o.permute(out_perm).reshape(out_shape)
    return o if o.dtype == out_dtype else o.to(out_dtype)


def choose_impl(config: Config, q, k, v, g=None, initial_state=None) -> str | Decline:
    from ..kernels.linear_attention import triton_unsupported_reason

    if config.kernels == "reference":
        return "reference"
    reason = triton_unsupported_reason(q, k, v, g, initial_state)
    if config.kernels == "triton":
        return Decline(reason) if reason else "triton"
    return "triton" if reason is None and q.device.type == "cuda" else "reference"


def _impl_for(config: Config, device, inputs: dict) -> str | Decline:
    """``choose_impl`` on the shapes the kernel will see (``inputs``: name -> (shape, dtype) or None)."""
    from types import SimpleNamespace

    from ..kernels.linear_attention import triton_unsupported_reason

    if config.kernels == "reference":
        return "reference"
    ns = {k: (SimpleNamespace(shape=tuple(v[0]), dtype=v[1], device=device) if v is not None else None)
          for k, v in inputs.items()}
    reason = triton_unsupported_reason(ns["q"], ns["k"], ns["v"], ns.get("g"), ns.get("initial_state"))
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
        return Term([Fac("node", n, None, None, labels)], list(labels), nodes=[])

    def __call__(self, n) -> Term | None:
        if not isinstance(n, fx.Node):
            return None
        if n in self.stop:
            return self.opaque(n)
        r = self._node(n)
        if r is None:
            return self.opaque(n) if not self._interpretable(n) else None
        r.nodes = r.nodes + [n]
        return r

    @staticmethod
    def _interpretable(n: fx.Node) -> bool:
        return (_call(n, operator.getitem, torch.select, torch.unsqueeze, torch.squeeze, torch.exp, torch.sigmoid,
                      operator.mul, torch.einsum, torch.functional.einsum, torch.matmul, torch.sum, torch.transpose,
                      torch.permute, ops.cast)
                or _meth(n, "select", "unsqueeze", "squeeze", "exp", "sigmoid", "sum", "contiguous", "clone"))

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
        rank = len(_shape(x))
        idx = self._expand_ellipsis(idx, rank)
        if idx is None:
            return None
        ints = [p for p, i in enumerate(idx) if isinstance(i, int) and not isinstance(i, bool)]
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
            tx = self(a[0])
            if tx is None or len(tx.facs) != 1 or tx.summed or tx.coef != 1.0 or tx.facs[0].kind != "slice":
                return None
            f = tx.facs[0]
            kind = "exp" if _is(n, (torch.exp,), ("exp",)) else "sigmoid"
            return Term([Fac(kind, f.base, f.t_axis, f.t, f.labels)], tx.out, set(), 1.0, tx.nodes)
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
# The recurrence
# ---------------------------------------------------------------------------------------------
_ZEROS = (torch.zeros, torch.zeros_like)


def _is_zeros(n) -> bool:
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
        if _is_zeros(h0):
            if all(u in region for u in h0.users):
                region.add(h0)
        else:
            initial = h0
        final = steps[-1].state
        for n in region:
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
        impl = _impl_for(config, metas["q"].device, shapes)
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
    """Placeholder until the parallel form lands: never mine."""

    @staticmethod
    def signature(scores, v):
        """The captures this lowering takes."""

    def select(self, match: Match, config: Config):
        return None
