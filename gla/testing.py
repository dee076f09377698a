"""What users import in their tests: error figures, rewrite assertions, pattern isolation.

* :func:`rel_rms_error` — the error figure every check in gla uses.
* :func:`assert_rewrites` — compile a model with ``backend="gla"``, check what was rewritten and
  that outputs (and gradients) match eager.
* :func:`check_equivalence` — a search function and its replacement compute the same thing.
* ``gla_isolation`` — a pytest fixture: Dynamo reset, gla counters cleared, user patterns scoped::

      from gla.testing import gla_isolation          # noqa: F401  (pytest finds it by name)

      def test_my_model(gla_isolation):
          ...

pytest is imported only when ``gla_isolation`` is first used; gla itself never needs it.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from typing import Any, Callable, Iterator

import torch

# (``gla_isolation`` is left out of __all__: a star import must not import pytest)
__all__ = ["rel_rms_error", "default_tolerance", "assert_rewrites", "check_equivalence", "isolated"]

_FAST = {"inner": "aot_eager"}


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂, computed in float64. NaN or Inf anywhere gives inf."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm()
    num = (a - e).norm()
    if denom == 0:
        return float(num)
    return float(num / denom)


def default_tolerance(*dtypes: torch.dtype) -> float:
    """The relative RMS tolerance gla's verification uses for these dtypes.

    float64 1e-10, float32 1e-5 (2e-3 when TF32 matmuls are allowed), float16/bfloat16 1e-2;
    the loosest dtype wins.
    """
    from .lowering.verify import threshold

    return threshold({d for d in dtypes if d.is_floating_point} or {torch.float32})


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _float_tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in _tensors(tree) if t.dtype.is_floating_point]


def _compare(actual: torch.Tensor, expected: torch.Tensor, tol: float, base: float = 0.0) -> tuple[float, bool]:
    """(rel RMS error, ok). NaN/Inf where eager has the same NaN/Inf is not an error."""
    if actual.shape != expected.shape:
        return float("inf"), False
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    bad_a, bad_e = ~torch.isfinite(a), ~torch.isfinite(e)
    if bad_a.any() or bad_e.any():
        same = all(torch.equal(f(a), f(e)) for f in (torch.isnan, torch.isposinf, torch.isneginf))
        if not same:
            return float("inf"), False
        a, e = a[~bad_a], e[~bad_e]
    err = rel_rms_error(a, e)
    return err, math.isfinite(err) and (err <= tol or err <= 2 * base + 1e-12)


def _vs_float64(x: torch.Tensor, ref: torch.Tensor, tol: float, scale: float,
                base: float = 0.0) -> tuple[float, bool]:
    """(error, ok) of ``x`` against its float64 result ``ref``; ``base`` is eager's own error
    (0 when judging eager itself), ``scale`` the largest gradient's norm (0 for outputs).

    ``x`` passes within ``tol``, or no worse than twice eager's error, or within the band eager is
    allowed (10 · tol) where the dtype cannot do better: eager itself is off by more than tol / 10
    (cancelling sums), or the gradient is small beside the largest one and its error is within
    ``tol · scale``. A gradient that is zero at the dtype's resolution (``‖ref‖ ≤ tol · scale``)
    is measured against ``scale``, as verification's ``gradient_error`` does."""
    from .lowering.verify import gradient_error

    r = ref.detach().double()
    usable = scale > 0 and x.shape == r.shape and bool(torch.isfinite(r).all())
    if usable and float(r.norm()) <= tol * scale:
        err = gradient_error(x.detach(), r, scale, tol)
        return err, math.isfinite(err) and (err <= tol or err <= 2 * base + 1e-12)
    err, ok = _compare(x, r, tol, base=base)
    if not ok and math.isfinite(err) and err <= 10 * tol:
        small = usable and float((x.detach().double() - r).norm()) <= tol * scale
        ok = base > tol / 10 or small
    return err, ok


def _cotangent_grads(outs: list[torch.Tensor], cotangents: list[torch.Tensor], wrt: list[torch.Tensor],
                     dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Gradients of ``Σ ⟨out, c⟩`` (computed in ``dtype``) with respect to ``wrt``."""
    loss = sum(((o.to(dtype) * c.to(dtype)).sum() for o, c in zip(outs, cotangents)),
               torch.zeros((), dtype=dtype))
    if not wrt or not loss.requires_grad:
        return [None] * len(wrt)
    return list(torch.autograd.grad(loss, wrt, allow_unused=True))


def _float64_run(model: Callable, inputs: Any, kwargs: dict, grad: bool, n_params: int,
                 cotangents: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The model in float64 (a copy of a module; floating inputs upcast): its outputs, then (with
    ``grad``) the gradients of its floating inputs and trainable parameters for the same
    cotangents, in :func:`assert_rewrites`' order. None if it cannot run in float64."""
    import copy

    def up(x):
        if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
            return x.detach().to(torch.float64).requires_grad_(grad)
        return x

    try:
        m64 = copy.deepcopy(model).double() if isinstance(model, torch.nn.Module) else model
        inputs64 = torch.utils._pytree.tree_map(up, inputs)
        kwargs64 = torch.utils._pytree.tree_map(up, kwargs)
        with torch.set_grad_enabled(grad):
            outs = _tensors(m64(*inputs64, **kwargs64))
            if not grad:
                return outs
            params = [p for p in m64.parameters() if p.requires_grad][:n_params] \
                if isinstance(m64, torch.nn.Module) else []
            wrt = _float_tensors(inputs64) + params
            diff = [o for o in outs if o.requires_grad and o.dtype.is_floating_point]
            return outs + _cotangent_grads(diff, cotangents, wrt, torch.float64)
    except Exception:  # a model that only runs in its own dtypes: no float64 arbiter
        return None


def _fmt_err(err: float) -> str:
    return "inf (NaN/Inf or shape differs)" if not math.isfinite(err) else f"{err:.2e}"


# ------------------------------------------------------------------------------------------------
# assert_rewrites
# ------------------------------------------------------------------------------------------------
def assert_rewrites(model: Callable, *inputs: Any, expect: dict[str, int], rtol: float | None = None,
                    grad: bool = False, options: dict[str, Any] | None = None, seed: int = 0,
                    **kwargs: Any):
    """Compile ``model`` with ``backend="gla"``, check the rewrite counts and the numbers; return the report.

    Args:
        model: a module or function; called as ``model(*inputs, **kwargs)``.
        expect: ``{kind: count}`` for the kinds to check (``attention``, ``gated_attention``,
            ``glu``, ``gate``, ``linear_attention``, ``custom``); kinds not given are not checked.
        rtol: the largest relative RMS error allowed between compiled and eager results (outputs
            and gradients). Default: :func:`default_tolerance` of the dtypes involved. A tensor
            beyond it still passes when a float64 run of the model (a copy, inputs upcast) shows
            the compiled result no worse than twice eager's own error, eager being within 10×
            the tolerance of float64 (eager rounds too: bf16, cancelling gradients), or within
            that 10× band where the dtype cannot do better (eager itself off by more than a
            tenth of the tolerance; a gradient small beside the largest one): see ``_vs_float64``.
        grad: also compare gradients of every floating-point input (detached copies are made that
            require grad) and of every parameter of ``model`` that requires grad, for the loss
            ``Σ ⟨out, c⟩`` with fixed random cotangents ``c`` (seeded by ``seed``).
            Without ``grad`` everything runs under ``torch.no_grad()``.
        options: the gla options; ``inner`` defaults to ``"aot_eager"`` here (fast, and the
            rewrites are the same as under Inductor).

    Dynamo is reset first, then the model is compiled once: the report describes exactly the
    compiled model whose results are compared. NaN/Inf are allowed where eager has them too.

    Raises:
        AssertionError: listing the expected and actual counts, the gla report table (rewrites
            with their verification figures, near misses with their reasons) and the error of
            every compared tensor.
    """
    from .report import collect

    opts = dict(_FAST, **(options or {}))
    inputs_e, inputs_c, wrt_e, wrt_c = inputs, inputs, [], []
    params = [p for p in model.parameters() if p.requires_grad and p.dtype.is_floating_point] \
        if grad and isinstance(model, torch.nn.Module) else []
    if grad:
        def copy(x):
            if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
                return x.detach().clone().requires_grad_(True)
            return x
        inputs_e = torch.utils._pytree.tree_map(copy, inputs)
        inputs_c = torch.utils._pytree.tree_map(copy, inputs)
        wrt_e, wrt_c = _float_tensors(inputs_e), _float_tensors(inputs_c)

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        with collect() as report:
            compiled = torch.compile(model, backend="gla", options=opts)
            out_c = compiled(*inputs_c, **kwargs)
        out_e = model(*inputs_e, **kwargs)

    compared: list[tuple[str, Any, Any]] = []  # (name, compiled, eager): outputs, then gradients
    outs_c, outs_e = _tensors(out_c), _tensors(out_e)
    dtypes = {t.dtype for t in _float_tensors((inputs, outs_e))} | {p.dtype for p in params}
    tol = rtol if rtol is not None else default_tolerance(*dtypes)
    problems = []
    if len(outs_c) != len(outs_e):
        problems.append(f"compiled model returned {len(outs_c)} tensors, eager {len(outs_e)}")
    for i, (c, e) in enumerate(zip(outs_c, outs_e)):
        compared.append((f"output {i} {tuple(e.shape)} {str(e.dtype).replace('torch.', '')}", c, e))
    n_outputs = len(compared)
    cots: list[torch.Tensor] = []
    if grad and not problems:
        gen = torch.Generator().manual_seed(seed)
        pairs = [(c, e) for c, e in zip(outs_c, outs_e) if e.requires_grad and e.dtype.is_floating_point]
        cots = [torch.randn(e.shape, generator=gen, dtype=torch.float32).to(e.device) for _, e in pairs]

        if pairs:
            g_c = _cotangent_grads([c for c, _ in pairs], cots, wrt_c + params, torch.float32)
            g_e = _cotangent_grads([e for _, e in pairs], cots, wrt_e + params, torch.float32)
            names = [f"grad of input {i}" for i in range(len(wrt_c))]
            names += [f"grad of {n}" for n, p in model.named_parameters() if any(p is q for q in params)] \
                if params else []
            compared += [(f"{name} {tuple(ge.shape) if ge is not None else ''}", gc, ge)
                         for name, gc, ge in zip(names, g_c, g_e)]

    def judge(c, e) -> tuple[float, bool]:
        if not e.dtype.is_floating_point:
            same = torch.equal(c, e)
            return (0.0 if same else float("inf")), same
        return _compare(c, e, tol)

    rows: list[tuple[str, float, float, bool] | None] = []  # None: neither side has a gradient
    for name, c, e in compared:
        if c is None and e is None:
            rows.append(None)
        elif c is None or e is None:
            rows.append((f"{name}: {'compiled' if c is None else 'eager'} has none", float("inf"), tol, False))
        else:
            err, ok = judge(c, e)
            rows.append((name, err, tol, ok))
    if not problems and not all(r is None or r[3] for r in rows):
        # Eager is no reference either: it rounds in its own dtype. A row that misses the tolerance
        # passes if the compiled result is no worse than twice eager's own error against float64
        # (the rule gla's verification applies), as long as eager itself is near float64 (within
        # 10x the tolerance: a model that is not deterministic, e.g. dropout, gets no such pass).
        # Where the dtype cannot do better (cancelling sums, small gradients) see _vs_float64.
        ref = _float64_run(model, inputs, kwargs, grad and bool(cots), len(params), cots)
        if ref is not None and len(ref) == len(compared):
            scale = max((float(r.double().norm()) for r in ref[n_outputs:]
                         if r is not None and bool(torch.isfinite(r).all())), default=0.0)
            for i, ((name, c, e), r) in enumerate(zip(compared, ref)):
                if rows[i] is None or rows[i][3] or r is None or c is None or e is None \
                        or not e.dtype.is_floating_point:
                    continue
                against = scale if i >= n_outputs else 0.0
                err_e = _vs_float64(e, r, tol, against)[0]
                if not err_e <= 10 * tol:
                    continue
                err_c, ok_c = _vs_float64(c, r, tol, against, base=err_e)
                rows[i] = (f"{name} [vs float64: compiled {_fmt_err(err_c)}, eager {_fmt_err(err_e)}]",
                           rows[i][1], tol, ok_c)
    rows = [r for r in rows if r is not None]

    counts = report.counts
    wrong_counts = {k: (n, counts.get(k, 0)) for k, n in expect.items() if counts.get(k, 0) != n}
    if wrong_counts or problems or not all(ok for *_, ok in rows):
        lines = ["gla.testing.assert_rewrites failed"]
        if wrong_counts:
            lines.append("rewrite counts differ (kind: expected → got): " +
                         ", ".join(f"{k}: {e} → {g}" for k, (e, g) in wrong_counts.items()))
        lines.append(f"expected {dict(expect)}, got {{{', '.join(f'{k}: {v}' for k, v in counts.items() if v)}}}")
        lines += problems
        if rows:
            lines.append("compiled vs eager (relative RMS error):")
            lines += [f"  {'ok  ' if ok else 'FAIL'} {name}: {_fmt_err(err)} (tolerance {t:.0e})"
                      for name, err, t, ok in rows]
        lines.append(str(report))
        raise AssertionError("\n".join(lines))
    return report


# ------------------------------------------------------------------------------------------------
# check_equivalence
# ------------------------------------------------------------------------------------------------
def _fresh(x: Any, gen: torch.Generator) -> Any:
    """A random tensor like ``x`` (floats: normal; bools: mostly True); anything else as given."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.dtype == torch.bool:
        return (torch.rand(x.shape, generator=gen) > 0.2).to(x.device)
    if x.dtype.is_floating_point:
        return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    return x  # integer tensors are often indices: keep them


def check_equivalence(search: Callable, replacement: Callable, *example_inputs: Any, grad: bool = True,
                      rtol: float | None = None, trials: int = 2, seed: int = 0) -> dict[str, Any]:
    """Check that ``replacement(*args)`` computes ``search(*args)``; return the error figures.

    The reference is ``search`` evaluated on float64 copies of the floating-point arguments.
    ``replacement`` (and ``search`` itself, for its own rounding error) run in the arguments'
    dtypes, on ``example_inputs`` and on ``trials`` sets of fresh random tensors of the same
    shapes and dtypes (floats normal, bools mostly True, integer tensors as given). With ``grad``
    the gradients for a random cotangent are compared too, for every floating-point argument.
    A result passes when its relative RMS error is within ``rtol`` (default: the dtype's
    threshold, see :func:`default_tolerance`) or at most twice the error of ``search`` itself.

    Returns ``{"rel_rms", "rel_rms_original", "grad_rel_rms" (with grad), "threshold",
    "trials"}``: worst figures over all input sets, and ``trials`` with each set's figures.

    Raises:
        AssertionError: with the figures, when any output or gradient differs (or the shapes,
            dtypes, or NaN/Inf positions do).
    """
    gen = torch.Generator().manual_seed(seed)
    sets = [example_inputs] + [tuple(_fresh(x, gen) for x in example_inputs) for _ in range(trials)]
    dtypes = {x.dtype for x in _float_tensors(example_inputs)}
    tol = rtol if rtol is not None else default_tolerance(*dtypes)
    result: dict[str, Any] = {"rel_rms": 0.0, "rel_rms_original": 0.0, "threshold": tol, "trials": []}
    if grad:
        result["grad_rel_rms"] = 0.0
    failures: list[str] = []

    def run(fn, args, cast64, want_grad):
        leaves = []

        def prep(x):
            if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
                x = x.detach().to(torch.float64) if cast64 else x.detach().clone()
                if want_grad:
                    x.requires_grad_(True)
                    leaves.append(x)
            return x
        args = [prep(x) for x in args]
        with torch.set_grad_enabled(want_grad):
            out = fn(*args)
        return out, leaves

    for t, args in enumerate(sets):
        label = "example inputs" if t == 0 else f"random inputs #{t}"
        want_grad = grad and bool(_float_tensors(args))
        ref, ref_leaves = run(search, args, True, want_grad)
        orig, orig_leaves = run(search, args, False, want_grad)
        new, new_leaves = run(replacement, args, False, want_grad)
        refs, origs, news = _tensors(ref), _tensors(orig), _tensors(new)
        fig: dict[str, Any] = {"inputs": label}
        result["trials"].append(fig)
        if len(news) != len(refs):
            failures.append(f"{label}: replacement returned {len(news)} tensors, search {len(refs)}")
            continue
        for i, (r, o, n) in enumerate(zip(refs, origs, news)):
            if n.shape != o.shape or n.dtype != o.dtype:
                failures.append(f"{label}: output {i} is {tuple(n.shape)} {n.dtype}, search gives "
                                f"{tuple(o.shape)} {o.dtype}")
                continue
            base = _compare(o, r, math.inf)[0]
            err, ok = _compare(n, r, tol, base if math.isfinite(base) else 0.0)
            fig[f"rel_rms[{i}]"], fig[f"rel_rms_original[{i}]"] = err, base
            result["rel_rms"] = max(result["rel_rms"], err)
            result["rel_rms_original"] = max(result["rel_rms_original"], base)
            if not ok:
                failures.append(f"{label}: output {i} rel RMS {_fmt_err(err)} > {tol:.0e} "
                                f"(search's own error {_fmt_err(base)})")
        if not want_grad or failures:
            continue
        pairs = [(r, o, n) for r, o, n in zip(refs, origs, news) if r.requires_grad]
        if not pairs:
            continue
        cots = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(r.device) for r, _, _ in pairs]

        def grads(outs, leaves):
            outs_ok = [(x, c) for x, c in zip(outs, cots) if x.requires_grad]
            if not outs_ok:
                return [None] * len(leaves)
            return torch.autograd.grad([x for x, _ in outs_ok], leaves, [c.to(x.dtype) for x, c in outs_ok],
                                       allow_unused=True)

        g_ref = grads([p[0] for p in pairs], ref_leaves)
        g_orig = grads([p[1] for p in pairs], orig_leaves)
        g_new = grads([p[2] for p in pairs], new_leaves)
        for i, (gr, go, gn) in enumerate(zip(g_ref, g_orig, g_new)):
            if gr is None and gn is None:
                continue
            if gr is None or gn is None:
                failures.append(f"{label}: gradient of argument {i}: "
                                f"{'replacement' if gn is None else 'search'} gives none")
                continue
            base = _compare(go, gr, math.inf)[0] if go is not None else 0.0
            err, ok = _compare(gn, gr, tol, base if math.isfinite(base) else 0.0)
            fig[f"grad_rel_rms[{i}]"] = err
            result["grad_rel_rms"] = max(result["grad_rel_rms"], err)
            if not ok:
                failures.append(f"{label}: gradient of argument {i} rel RMS {_fmt_err(err)} > {tol:.0e} "
                                f"(search's own error {_fmt_err(base)})")
    if failures:
        figures = "\n".join(f"  {', '.join(f'{k}={v:.2e}' if isinstance(v, float) else f'{k}={v}' for k, v in f.items())}"
                            for f in result["trials"])
        raise AssertionError("gla.testing.check_equivalence: the replacement differs from the search function\n"
                             + "\n".join(failures) + f"\nfigures (threshold {tol:.0e}):\n{figures}")
    return result


# ------------------------------------------------------------------------------------------------
# isolation
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Dynamo reset, ``counters["gla"]`` cleared, verification cache cleared, and user patterns
    registered inside the block removed after it (``gla.pattern_scope()``). Dynamo is reset again
    on exit. The body of the ``gla_isolation`` pytest fixture; usable without pytest."""
    from torch._dynamo.utils import counters

    from .patterns.registry import pattern_scope

    verify_mod = importlib.import_module("gla.lowering.verify")
    torch._dynamo.reset()
    counters["gla"].clear()
    verify_mod._verified.clear()
    try:
        with pattern_scope():
            yield
    finally:
        torch._dynamo.reset()


_fixture = None


def _make_fixture():
    import pytest

    @pytest.fixture
    def gla_isolation():
        """Each test starts with Dynamo's caches and gla's counters empty, and leaves no user
        pattern behind (``torch._dynamo.reset()``, ``counters["gla"].clear()``,
        ``gla.pattern_scope()``)."""
        with isolated():
            yield

    return gla_isolation


def __getattr__(name: str) -> Any:
    # the fixture is built on first access, so importing gla.testing never imports pytest
    global _fixture
    if name == "gla_isolation":
        if _fixture is None:
            _fixture = _make_fixture()
        return _fixture
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
