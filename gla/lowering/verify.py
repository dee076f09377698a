"""Prove a rewrite on numbers: the original subgraph in float64 against the replacement.

Both run on the same fresh random inputs (never zeros; boolean masks mostly True), drawn from a
private generator so the user's RNG stream is untouched. The replacement passes when its relative
RMS error against the float64 original is within the dtype's threshold, or no worse than twice
the original's own error in its own dtype. Gradients are compared the same way when the graph
needs them. A failure keeps the original subgraph and becomes a near miss with the figures.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..rewrite import Match, insert_call, ops
from ..rewrite.autocast import autocast_dtype
from ..rewrite.graph import hint_int, value_of
from ..rewrite.mutation import eliminate_dead_code
from ..testing import rel_rms_error
from .select import Decline, Selected

THRESHOLDS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_THRESHOLD = 2e-3
MAX_ELEMENTS = 1 << 25  # largest tensor the float64 check may create before shapes are shrunk

_verified: dict[Any, dict[str, Any]] = {}  # signature -> figures, for verify="once"


def threshold(dtypes: set[torch.dtype]) -> float:
    t = max((THRESHOLDS.get(d, 1e-2) for d in dtypes), default=1e-5)
    if t <= THRESHOLDS[torch.float32] and torch.float32 in dtypes and torch.get_float32_matmul_precision() != "highest":
        t = TF32_THRESHOLD
    return t


def _region(match: Match, selected: Selected) -> tuple[list[fx.Node], list[fx.Node]]:
    """The nodes to evaluate (graph order) and the leaves they read, covering both sides' inputs."""
    region = set(match.nodes) | set(selected.extra_nodes)
    repl_inputs = [v for v in selected.kwargs.values() if isinstance(v, fx.Node)]
    leaves_of = lambda nodes: {a for n in nodes for a in n.all_input_nodes if a not in nodes}
    leaves = leaves_of(region)
    # replacement inputs upstream of the original's leaves (k before repeat_heads): evaluate the path.
    # A replacement input that is also a leaf counts too (q = k = v: the original reads kᵀ as a
    # leaf, the replacement reads k; both must see the same random k).
    targets = {x for x in repl_inputs if x not in region}
    if targets - leaves or any(leaf not in targets for leaf in leaves):
        prefix: set[fx.Node] = set()

        def reaches(n: fx.Node, depth: int) -> bool:
            if n in targets:
                return True
            if depth == 0 or n.op == "placeholder":
                return False
            hit = False
            for a in n.all_input_nodes:
                if reaches(a, depth - 1):
                    hit = True
            if hit:
                prefix.add(n)
            return hit

        for leaf in list(leaves):
            if leaf not in targets:
                reaches(leaf, 8)
        region |= prefix
        leaves = leaves_of(region) | targets
    order = {n: i for i, n in enumerate(match.root.graph.nodes)}
    return sorted(region, key=order.__getitem__), sorted(leaves, key=order.__getitem__)


def _build(gm: fx.GraphModule, region: list[fx.Node], leaves: list[fx.Node], root: fx.Node,
           selected: Selected | None, float64: bool) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, leaf in enumerate(leaves):
        env[leaf] = g.placeholder(f"in{i}")
        env[leaf].meta.update({k: v for k, v in leaf.meta.items() if k in ("example_value", "val")})
    for n in region:
        if float64 and n.op == "call_function" and n.target is ops.cast and isinstance(n.args[1], torch.dtype) \
                and n.args[1].is_floating_point:
            env[n] = env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
        if float64 and getattr(n.target, "_gla_leaf", False) and "impl" in n.kwargs:
            env[n].kwargs = {**env[n].kwargs, "impl": "reference"}  # our own earlier rewrite, in float64
    if selected is None:
        g.output(env[root])
    else:
        kwargs = {k: (env[v] if isinstance(v, fx.Node) else v) for k, v in selected.kwargs.items()}
        marker = g.output(None)
        out = insert_call(g, marker, selected.fn, kwargs)
        g.erase_node(marker)
        g.output(out)
        eliminate_dead_code(g)
    return fx.GraphModule(gm, g)


def _concrete(v: Any) -> Any:
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return hint_int(v) if isinstance(v, torch.SymInt) else v.node.hint
    return v


def _random_input(meta: Any, gen: torch.Generator, sizes: dict[int, int]) -> Any:
    if not isinstance(meta, torch.Tensor):
        return _concrete(meta)
    shape = [sizes.get(hint_int(s), hint_int(s)) for s in meta.shape]
    dev = meta.device
    if meta.dtype == torch.bool:
        return torch.rand(shape, generator=gen).to(dev) > 0.2
    if meta.dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=dev, dtype=meta.dtype)
    if meta.dtype.is_complex:
        raise ValueError("complex inputs are not verified")
    return torch.randint(0, 2, shape, generator=gen).to(device=dev, dtype=meta.dtype)


def _shrink_map(region: list[fx.Node], leaves: list[fx.Node]) -> dict[int, int]:
    """Map large sizes to small ones when the region bakes no sizes into its arguments."""
    biggest = 0
    sizes: set[int] = set()
    for n in region + leaves:
        t = value_of(n)
        if isinstance(t, torch.Tensor):
            shape = [hint_int(s) for s in t.shape]
            biggest = max(biggest, math.prod(shape))
            sizes |= {s for s in shape if s > 64}
    if biggest <= MAX_ELEMENTS:
        return {}
    literal_ints = set()
    for n in region:
        for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs)):
            if isinstance(a, int):
                literal_ints.add(a)
    if sizes & literal_ints:
        return {}
    small = [61, 67, 71, 73, 79, 83, 89, 97, 101, 103]
    return {s: small[i % len(small)] for i, s in enumerate(sorted(sizes))}


def _structure(region: list[fx.Node], leaves: list[fx.Node]) -> tuple[tuple, list[fx.Node]]:
    """The original subgraph as data, and its leaves in first-use order: each node's op, target
    and arguments, with nodes named by first use, so that two sites share a verification only
    if they compute alike (a repeated layer), whatever the graph's order of their inputs."""
    names: dict[fx.Node, int] = {}
    known = set(region) | set(leaves)

    def ref(a: fx.Node):
        if a not in names and a in known:
            names[a] = len(names)
        return ("node", names.get(a, -1))

    rows = []
    for n in region:
        args, kwargs = fx.node.map_arg(n.args, ref), fx.node.map_arg(n.kwargs, ref)
        ref(n)
        rows.append((n.op, repr(n.target), repr(args), repr(sorted(kwargs.items()))))
    ordered = sorted(leaves, key=lambda x: names.get(x, len(names)))
    return tuple(rows), ordered


def signature(match: Match, selected: Selected, leaves: list[fx.Node],
              region: list[fx.Node] = ()) -> tuple:
    structure, leaves = _structure(list(region), leaves)
    metas = []
    for leaf in leaves:
        t = value_of(leaf)
        metas.append((tuple(hint_int(s) for s in t.shape), t.dtype, str(t.device), t.requires_grad)
                     if isinstance(t, torch.Tensor) else type(t).__name__)
    consts = tuple(sorted((k, repr(v)) for k, v in selected.kwargs.items() if not isinstance(v, fx.Node)))
    # the Pattern object itself (hashed by identity), not only its name: a pattern re-registered
    # under the same name with another replacement (pattern_scope in tests) must be verified anew
    return (match.pattern, match.pattern.name, match.alternative, selected.kernel, consts, tuple(metas),
            structure)


def verify(gm: fx.GraphModule, match: Match, selected: Selected, mode: str) -> dict[str, Any] | Decline:
    """Figures for the report, or a Decline carrying them. ``mode`` is the ``verify`` option."""
    if mode == "off":
        return {"summary": "not verified (verify='off')"}
    region, leaves = _region(match, selected)
    key = signature(match, selected, leaves, region)
    if mode == "once" and key in _verified:
        return dict(_verified[key], summary=_verified[key]["summary"] + " (cached)")
    with unset_fake_temporarily(), torch.random.fork_rng(devices=[]):
        try:
            figures = _compare(gm, match, selected, region, leaves)
        except Exception as e:  # a replacement that cannot run on these inputs is not proven
            return Decline(f"verification could not run the replacement: {type(e).__name__}: {str(e)[:200]}")
    if isinstance(figures, Decline):
        return figures
    _verified[key] = figures
    return figures


def _single_tensor(out: Any) -> torch.Tensor:
    """The one tensor a subgraph computes; ``(out, None)`` (need_weights=False) counts as one."""
    if isinstance(out, (tuple, list)):
        tensors = [o for o in out if isinstance(o, torch.Tensor)]
        if len(tensors) != 1 or any(o is not None and not isinstance(o, torch.Tensor) for o in out):
            raise ValueError(f"cannot verify a subgraph with {len(tensors)} tensor outputs")
        return tensors[0]
    return out


def gradient_error(grad: torch.Tensor, ref: torch.Tensor, scale: float, tol: float) -> float:
    """Error of one input's gradient against its float64 reference: relative RMS, except for a
    gradient that is zero at the dtype's resolution (‖ref‖ ≤ tol · ``scale``, the largest input
    gradient's norm; e.g. dq and dk of attention over a single key). No computation in that dtype
    can match zero relatively, so its rounding noise is measured against ``scale`` instead."""
    if scale > 0 and float(ref.norm()) <= tol * scale:
        if not torch.isfinite(grad).all():
            return math.inf
        return float((grad.to(torch.float64) - ref).norm()) / scale
    return rel_rms_error(grad, ref)


def _autocast_of(match: Match, metas) -> tuple[str, torch.dtype] | None:
    """(device type, dtype) of the autocast the match runs under, if any: the original and the
    replacement are run under it (the float64 reference is not: autocast leaves float64 alone)."""
    devices = {m.device.type for m in metas if isinstance(m, torch.Tensor)}
    for device in devices:
        amp = autocast_dtype(match.nodes, device)
        if isinstance(amp, torch.dtype):
            return device, amp
    return None


def _compare(gm, match, selected, region, leaves) -> dict[str, Any] | Decline:
    gen = torch.Generator().manual_seed(len(_verified) + 1234)
    sizes = _shrink_map(region, leaves)
    metas = [value_of(leaf) for leaf in leaves]
    inputs = [_random_input(m, gen, sizes) for m in metas]
    need_grad = [isinstance(m, torch.Tensor) and m.requires_grad and m.dtype.is_floating_point for m in metas]
    want_grad = any(need_grad) and torch.is_grad_enabled()

    original = _build(gm, region, leaves, match.root, None, float64=False)
    reference = _build(gm, region, leaves, match.root, None, float64=True)
    replacement = _build(gm, region, leaves, match.root, selected, float64=False)

    amp = _autocast_of(match, metas)

    def run(module, cast64: bool, inputs):
        args = []
        for x, g in zip(inputs, need_grad):
            if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
                x = x.detach().to(torch.float64) if cast64 else x.detach().clone()
                x.requires_grad_(g and want_grad)
            args.append(x)
        # the original and the replacement as the graph runs them: under the same autocast
        same_autocast = torch.autocast(amp[0], dtype=amp[1]) if amp and not cast64 else contextlib.nullcontext()
        with torch.enable_grad() if want_grad else torch.no_grad(), same_autocast:
            out = _single_tensor(module(*args))
        return out, args

    ref, ref_args = run(reference, True, inputs)
    if not torch.isfinite(ref).all() and any(isinstance(x, torch.Tensor) and x.dtype == torch.bool for x in inputs):
        # Boolean masks are drawn mostly True; a "masked out" mask (masked_fill(mask, -inf)) then
        # hides whole rows, and their NaN reaches every gradient. Draw the masks mostly False.
        flipped = [~x if isinstance(x, torch.Tensor) and x.dtype == torch.bool else x for x in inputs]
        ref_f, ref_args_f = run(reference, True, flipped)
        if int((~torch.isfinite(ref_f)).sum()) < int((~torch.isfinite(ref)).sum()):
            inputs, ref, ref_args = flipped, ref_f, ref_args_f
    orig, orig_args = run(original, False, inputs)
    new, new_args = run(replacement, False, inputs)
    dtypes = {x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.dtype.is_floating_point} | {orig.dtype}
    tol = threshold(dtypes)
    figures: dict[str, Any] = {}
    undefined = ~torch.isfinite(ref) & ~torch.isfinite(orig)
    if undefined.any() and not want_grad:
        # Where eager itself is NaN in float64 and in its own dtype (a query row whose every key is
        # masked with -inf), the kernels return 0, as SDPA does. Compare everywhere else, say so.
        keep = ~undefined
        figures["undefined_in_original"] = int(undefined.sum())
        ref, orig, new = ref[keep], orig[keep], torch.where(keep, new, 0)[keep]
    err_new, err_orig = rel_rms_error(new, ref), rel_rms_error(orig, ref)
    figures.update({"rel_rms": err_new, "rel_rms_original": err_orig, "threshold": tol})
    if sizes:
        figures["shrunk"] = sizes

    def ok(err, base):
        return math.isfinite(err) and (err <= tol or err <= 2 * base + 1e-12)

    if not torch.isfinite(new).all() and torch.isfinite(orig).all():
        return Decline(f"replacement produced NaN/Inf where the original did not ({_fmt(figures)})")
    if not ok(err_new, err_orig):
        return Decline(f"replacement differs from the original: rel RMS {err_new:.2e} > {tol:.0e} "
                       f"(original's own error {err_orig:.2e})")
    if want_grad:
        cot = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref.device)
        idx = [i for i, g in enumerate(need_grad) if g]
        grads = lambda out, args: torch.autograd.grad(out, [args[i] for i in idx], cot.to(out.dtype), allow_unused=True)
        g_ref, g_orig, g_new = grads(ref, ref_args), grads(orig, orig_args), grads(new, new_args)
        scale = max((float(gr.norm()) for gr in g_ref if gr is not None), default=0.0)
        worst = 0.0
        for i, gr, go, gn in zip(idx, g_ref, g_orig, g_new):
            if gr is None:
                continue
            if gn is None:
                return Decline(f"replacement has no gradient for input {i}")
            e_new = gradient_error(gn, gr, scale, tol)
            e_orig = gradient_error(go, gr, scale, tol) if go is not None else 0.0
            worst = max(worst, e_new)
            if not ok(e_new, e_orig):
                return Decline(f"replacement gradient differs: rel RMS {e_new:.2e} > {tol:.0e} for input {i} "
                               f"(original's own error {e_orig:.2e})")
        figures["grad_rel_rms"] = worst
    summary = f"fwd {err_new:.1e}" + (f", bwd {figures['grad_rel_rms']:.1e}" if want_grad else "") + f" ≤ {tol:.0e}"
    figures["summary"] = summary
    return figures


def _fmt(figures: dict) -> str:
    return ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
