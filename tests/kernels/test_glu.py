"""GLU kernels against float64 references: act(a)*b, packed, and the fused gate/up projection.

On a machine without CUDA the Triton kernels run in the interpreter (fp32 and fp16 here); the
``gpu`` tests repeat the important cases in bfloat16 on CUDA at realistic sizes.
"""
from __future__ import annotations

import os

import pytest
import torch

from gla.kernels import glu as G
from gla.kernels.glu import elementwise as E
from gla.testing import rel_rms_error
from nan_poison import nan_empty

ACTS = G.ACTIVATIONS
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
CPU_DTYPES = (torch.float32, torch.float16)


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN (and NaN follows them), so an element the kernel forgets to
    write, or a read past an output's end, fails the test."""

    allocated = []

    def alloc(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        if t.is_floating_point() and t.is_contiguous():   # NaN in the buffer and past its end
            t = nan_empty(t.shape, t.dtype, t.device)
        elif t.is_floating_point():
            t.fill_(float("nan"))
        allocated.append(t.shape)
        return t

    monkeypatch.setattr(E, "_alloc", alloc)
    return allocated


def _leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _check(actual, expected, dtype, what):
    err = rel_rms_error(actual, expected)
    assert err <= TOL[dtype], f"{what}: rel RMS error {err:.3g} > {TOL[dtype]:.1g}"


def _randn(*shape, dtype=torch.float32, device="cpu", scale=2.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# glu(a, b)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(3, 1000), (1, 64), (2, 7, 129)], ids=str)
def test_glu(poisoned, impl, dtype, act, shape):
    a, b = _leaf(_randn(*shape, dtype=dtype)), _leaf(_randn(*shape, dtype=dtype))
    a64, b64 = _leaf(a, torch.float64), _leaf(b, torch.float64)
    y = G.glu(a, b, act, impl=impl)
    ref = G.glu_reference(a64, b64, act)
    assert y.dtype == dtype and y.shape == ref.shape
    assert bool(poisoned) == (impl == "triton")
    _check(y, ref, dtype, "forward")
    dy = _randn(*shape, dtype=torch.float64, scale=1.0)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    _check(a.grad, a64.grad, dtype, "d a")
    _check(b.grad, b64.grad, dtype, "d b")


def test_glu_noncontiguous_inputs_and_grads(poisoned):
    a_store = _leaf(_randn(66, 40))
    b_store = _leaf(_randn(66, 40))
    c_store = _leaf(_randn(40, 2 * 66))
    a = a_store.t()  # column-major [40, 66]: copied once
    for other, store in ((b_store.t(), b_store), (c_store[:, 66:], c_store)):  # transposed; row-strided slice
        a_store.grad = None
        a64, s64 = _leaf(a_store, torch.float64), _leaf(store, torch.float64)
        other64 = s64.t() if store is b_store else s64[:, 66:]
        y = G.glu(a, other, "silu", impl="triton")
        ref = G.glu_reference(a64.t(), other64, "silu")
        _check(y, ref, torch.float32, "forward")
        y.sum().backward()  # expanded (stride-0) incoming gradient
        ref.sum().backward()
        _check(a_store.grad, a64.grad, torch.float32, "d a")
        _check(store.grad, s64.grad, torch.float32, "d other")


@pytest.mark.parametrize("act", ACTS)
def test_glu_extreme_inputs(act):
    a = torch.tensor([-1e4, -100.0, -20.0, -1e-6, 0.0, 1e-6, 20.0, 100.0, 1e4])
    b = torch.linspace(-2, 2, a.numel())
    dy = torch.ones_like(a)
    y = G.glu(a, b, act, impl="triton")
    da, db = torch.ops.gla.glu_backward(dy, a, b, act, "triton")
    ra, rb = G.glu_backward_reference(dy.double(), a.double(), b.double(), act)
    torch.testing.assert_close(y.double(), G.glu_reference(a.double(), b.double(), act), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(da.double(), ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db.double(), rb, rtol=1e-6, atol=1e-6)


def test_kernels_work_when_triton_was_imported_first():
    """triton.language's own @jit helpers (tl.sigmoid, tl.cdiv, ...) are fixed at triton's import;
    torch._dynamo imports triton, so our kernels must not depend on them under the interpreter."""
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("interpreter-only concern")
    code = ("import torch._dynamo, torch\n"
            "from gla.kernels.glu import glu_linear, ACTIVATIONS\n"
            "x = torch.randn(5, 16, requires_grad=True); w = torch.randn(8, 16)\n"
            "for act in ACTIVATIONS: glu_linear(x, w, None, act, impl='triton').sum().backward()\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_glu_scalar_and_empty():
    a, b = torch.tensor(0.7), torch.tensor(-1.3)
    torch.testing.assert_close(G.glu(a, b, impl="triton"), G.glu_reference(a, b))
    e = torch.empty(0, 5)
    assert G.glu(e, e, impl="triton").shape == (0, 5)
    assert G.glu_packed(torch.empty(3, 0), impl="triton").shape == (3, 0)


# ---------------------------------------------------------------------------------------------
# glu_packed(x)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gate_first", [True, False], ids=["gate_first", "value_first"])
@pytest.mark.parametrize("shape", [(3, 2000), (1, 128), (2, 7, 258), (32, 512)], ids=str)
def test_glu_packed(poisoned, impl, dtype, act, gate_first, shape):
    x = _leaf(_randn(*shape, dtype=dtype))
    x64 = _leaf(x, torch.float64)
    y = G.glu_packed(x, act, gate_first=gate_first, impl=impl)
    ref = G.glu_packed_reference(x64, act, gate_first)
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype
    _check(y, ref, dtype, "forward")
    dy = _randn(*ref.shape, dtype=torch.float64, scale=1.0)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    _check(x.grad, x64.grad, dtype, "d x")
    assert len(poisoned) == (2 if impl == "triton" else 0)  # y and dx came from the kernels


def test_glu_packed_orders_match_torch():
    x = _randn(4, 6, 50)
    first, second = x.chunk(2, -1)
    torch.testing.assert_close(G.glu_packed(x, "sigmoid", gate_first=False, impl="triton"),
                               torch.nn.functional.glu(x, -1))
    torch.testing.assert_close(G.glu_packed(x, "silu", impl="triton"),
                               torch.nn.functional.silu(first) * second)


def test_glu_packed_noncontiguous(poisoned):
    # a [B, 2F, T] tensor viewed as [B, T, 2F]: last dimension not unit-stride -> one copy
    x = _leaf(_randn(2, 60, 5)).transpose(1, 2)
    x64 = _leaf(x, torch.float64)
    y = G.glu_packed(x, "gelu", impl="triton")
    ref = G.glu_packed_reference(x64, "gelu")
    _check(y, ref, torch.float32, "forward")
    y.sum().backward()
    ref.sum().backward()
    # a row slice of a wider buffer: strided rows, no copy needed
    w = _randn(9, 100)[:, 10:70]
    _check(G.glu_packed(w, "relu", impl="triton"), G.glu_packed_reference(w.double(), "relu"),
           torch.float32, "strided rows")


def test_glu_packed_backward_in_place():
    x = _randn(5, 2 * 77)
    dy = _randn(5, 77)
    expected = G.glu_packed_backward_reference(dy.double(), x.double(), "gelu_tanh")
    buf = x.clone()
    out = E.glu_packed_bwd(dy, buf, "gelu_tanh", out=buf)
    assert out.data_ptr() == buf.data_ptr()
    _check(out, expected, torch.float32, "in-place backward")


def test_backward_references_match_autograd():
    for act in ACTS:
        a = _leaf(_randn(300, dtype=torch.float64))
        b = _leaf(_randn(300, dtype=torch.float64))
        dy = _randn(300, dtype=torch.float64)
        G.glu_reference(a, b, act).backward(dy)
        da, db = G.glu_backward_reference(dy, a.detach(), b.detach(), act)
        torch.testing.assert_close(da, a.grad)
        torch.testing.assert_close(db, b.grad)


# ---------------------------------------------------------------------------------------------
# glu_linear(x, weight, bias)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["triton", "cublas", "reference"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("recompute", [False, True], ids=["save_h", "recompute"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu_linear(poisoned, impl, dtype, bias, recompute, act):
    d, F, N = 40, 72, 33
    x = _leaf(_randn(N, d, dtype=dtype, scale=1.0))
    w = _leaf(_randn(2 * F, d, dtype=dtype, scale=d**-0.5))
    b = _leaf(_randn(2 * F, dtype=dtype, scale=0.5)) if bias else None
    x64, w64 = _leaf(x, torch.float64), _leaf(w, torch.float64)
    b64 = _leaf(b, torch.float64) if bias else None
    y = G.glu_linear(x, w, b, act, impl=impl, recompute=recompute)
    ref = G.glu_linear_reference(x64, w64, b64, act)
    assert y.shape == (N, F) and y.dtype == dtype
    assert bool(poisoned) == (impl != "reference")
    _check(y, ref, dtype, "forward")
    dy = _randn(N, F, dtype=torch.float64, scale=1.0)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    _check(x.grad, x64.grad, dtype, "d x")
    _check(w.grad, w64.grad, dtype, "d weight")
    if bias:
        _check(b.grad, b64.grad, dtype, "d bias")


@pytest.mark.parametrize("act", ACTS)
def test_glu_linear_fused_activations_3d(poisoned, act):
    x = _randn(2, 7, 24, scale=1.0)
    w = _randn(2 * 20, 24, scale=0.3)
    b = _randn(2 * 20, scale=0.5)
    _check(G.glu_linear(x, w, b, act, impl="triton"),
           G.glu_linear_reference(x.double(), w.double(), b.double(), act), torch.float32, act)


def test_glu_linear_one_token_and_partial_grads(poisoned):
    x = _randn(1, 40)
    w = _leaf(_randn(2 * 72, 40, scale=0.2))
    y = G.glu_linear(x, w, None, "silu", impl="triton")  # x needs no gradient
    w64 = _leaf(w, torch.float64)
    ref = G.glu_linear_reference(x.double(), w64, None, "silu")
    _check(y, ref, torch.float32, "forward")
    y.sum().backward()
    ref.sum().backward()
    _check(w.grad, w64.grad, torch.float32, "d weight")


def test_glu_linear_saves_preactivation_only_when_needed():
    x = _randn(6, 16)
    w = _randn(2 * 8, 16)
    y, h = torch.ops.gla.glu_linear(x, w, None, "silu", "triton", False)
    torch.testing.assert_close(h, x @ w.t())
    _, h = torch.ops.gla.glu_linear(x, w, None, "silu", "triton", True)
    assert h.numel() == 0


# ---------------------------------------------------------------------------------------------
# Support checks, impl resolution, errors
# ---------------------------------------------------------------------------------------------


def test_triton_unsupported_reason(monkeypatch):
    x = torch.randn(4, 8)
    assert G.triton_unsupported_reason(x, None, act="silu") is None  # interpreter on
    assert "swish2" in G.triton_unsupported_reason(x, act="swish2")
    assert "float64" in G.triton_unsupported_reason(x.double(), act="silu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(4, 8, dtype=torch.float16)
        assert G.triton_unsupported_reason(fake, act="gelu") is None
        assert "float64" in G.triton_unsupported_reason(fake.double(), act="gelu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "cpu" in G.triton_unsupported_reason(x, act="silu")
    assert "meta" in G.triton_unsupported_reason(torch.empty(2, device="meta"), act="silu")


def test_auto_and_errors():
    x = _randn(3, 10)
    if not torch.cuda.is_available():  # auto on CPU runs the reference
        torch.testing.assert_close(G.glu_packed(x), G.glu_packed_reference(x))
        assert G.choose_glu_linear_impl(x, _randn(4, 10), None, "silu") == "reference"
    # float64 works everywhere except forced Triton
    G.glu_packed(x.double(), impl="auto")
    with pytest.raises(ValueError, match="float64"):
        G.glu_packed(x.double(), impl="triton")
    with pytest.raises(ValueError, match="unknown"):
        G.glu_packed(x, "swish2")
    with pytest.raises(ValueError, match="impl"):
        G.glu_packed(x, impl="cuda")
    with pytest.raises(ValueError, match="even"):
        G.glu_packed(_randn(3, 9))
    with pytest.raises(ValueError, match="same shape"):
        G.glu(x, x[:, :5])
    with pytest.raises(ValueError, match="weight"):
        G.glu_linear(x, _randn(5, 10))
    with pytest.raises(ValueError, match="last dimension"):
        G.glu_linear(x, _randn(4, 9))
    with pytest.raises(ValueError, match="one dtype"):
        G.glu_linear(x, _randn(4, 10).half())


def test_float64_reference_gradcheck():
    a = _leaf(_randn(3, 5, dtype=torch.float64))
    b = _leaf(_randn(3, 5, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: G.glu(a, b, "gelu"), (a, b))
    x = _leaf(_randn(2, 6, dtype=torch.float64))
    w = _leaf(_randn(8, 6, dtype=torch.float64))
    bias = _leaf(_randn(8, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x, w, b: G.glu_linear(x, w, b, "gelu_tanh"), (x, w, bias))


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("op, args", [
    ("glu", lambda impl: (torch.randn(3, 8), torch.randn(3, 8), "silu", impl)),
    ("glu_packed", lambda impl: (torch.randn(3, 8), "gelu", False, impl)),
    ("glu_linear", lambda impl: (torch.randn(3, 6), torch.randn(8, 6), torch.randn(8), "silu", impl, False)),
    ("glu_linear", lambda impl: (torch.randn(3, 6), torch.randn(8, 6), None, "relu", impl, True)),
])
def test_opcheck(op, args, impl):
    args = args(impl)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.gla, op).default, args)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def _compiled_matches(fn, *inputs, tol=1e-6):
    eager_inputs = [_leaf(t) for t in inputs]
    comp_inputs = [_leaf(t) for t in inputs]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y_eager = fn(*eager_inputs)
    y_comp = compiled(*comp_inputs)
    assert rel_rms_error(y_comp, y_eager) <= tol
    dy = torch.randn_like(y_eager)
    y_eager.backward(dy)
    y_comp.backward(dy)
    for e, c in zip(eager_inputs, comp_inputs):
        assert rel_rms_error(c.grad, e.grad) <= tol


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_compile_aot_eager(impl):
    _compiled_matches(lambda a, b: G.glu(a, b, "gelu", impl=impl) * 2, _randn(5, 12), _randn(5, 12))
    _compiled_matches(lambda x: G.glu_packed(x, "silu", gate_first=False, impl=impl).sin(), _randn(2, 3, 16))
    _compiled_matches(lambda x, w, b: G.glu_linear(x, w, b, "silu", impl=impl), _randn(7, 12),
                      _randn(2 * 10, 12, scale=0.3), _randn(2 * 10))
    _compiled_matches(lambda x, w: G.glu_linear(x, w, None, "relu", impl=impl, recompute=True),
                      _randn(7, 12), _randn(2 * 10, 12, scale=0.3))


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_compile_keeps_ops_opaque():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w: G.glu_linear(x, w, None, "silu", impl="reference"),
                       backend=backend, fullgraph=True)
    x, w = _leaf(_randn(4, 6)), _leaf(_randn(8, 6))
    fn(x, w).sum().backward()
    fw = "\n".join(g.code for g in backend.fw_graphs)
    bw = "\n".join(g.code for g in backend.bw_graphs)
    assert "gla.glu_linear.default" in fw
    assert "gla.glu_linear_backward.default" in bw


# ---------------------------------------------------------------------------------------------
# GPU (bfloat16, realistic sizes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_gpu_glu_bf16(act):
    dtype, dev = torch.bfloat16, "cuda"
    a, b = _leaf(_randn(1000, 1376, dtype=dtype, device=dev)), _leaf(_randn(1000, 1376, dtype=dtype, device=dev))
    a64, b64 = _leaf(a, torch.float64), _leaf(b, torch.float64)
    y = G.glu(a, b, act)  # auto -> Triton on CUDA
    ref = G.glu_reference(a64, b64, act)
    _check(y, ref, dtype, "forward")
    dy = _randn(1000, 1376, dtype=torch.float64, device=dev)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    _check(a.grad, a64.grad, dtype, "d a")
    _check(b.grad, b64.grad, dtype, "d b")
    for gate_first in (True, False):
        x = _leaf(_randn(3, 333, 2 * 1000, dtype=dtype, device=dev))
        x64 = _leaf(x, torch.float64)
        y = G.glu_packed(x, act, gate_first=gate_first)
        ref = G.glu_packed_reference(x64, act, gate_first)
        _check(y, ref, dtype, "packed forward")
        y.backward(torch.ones_like(y))
        ref.backward(torch.ones_like(ref))
        _check(x.grad, x64.grad, dtype, "packed d x")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cublas", "auto"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("recompute", [False, True], ids=["save_h", "recompute"])
def test_gpu_glu_linear_bf16(impl, bias, recompute):
    d, F, N, dtype, dev = 512, 1376, 1000, torch.bfloat16, "cuda"
    x = _leaf(_randn(N, d, dtype=dtype, device=dev, scale=1.0))
    w = _leaf(_randn(2 * F, d, dtype=dtype, device=dev, scale=d**-0.5))
    b = _leaf(_randn(2 * F, dtype=dtype, device=dev, scale=0.5)) if bias else None
    x64, w64 = _leaf(x, torch.float64), _leaf(w, torch.float64)
    b64 = _leaf(b, torch.float64) if bias else None
    y = G.glu_linear(x, w, b, "silu", impl=impl, recompute=recompute)
    ref = G.glu_linear_reference(x64, w64, b64, "silu")
    _check(y, ref, dtype, "forward")
    dy = _randn(N, F, dtype=torch.float64, device=dev, scale=1.0)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    _check(x.grad, x64.grad, dtype, "d x")
    _check(w.grad, w64.grad, dtype, "d weight")
    if bias:
        _check(b.grad, b64.grad, dtype, "d bias")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 17, 64, 300, 4096])
def test_gpu_glu_linear_fused_shapes(M):
    from gla.kernels.glu.matmul import glu_linear_fwd

    d, F = 4096 if M == 4096 else 520, 1000
    x = _randn(M, d, dtype=torch.bfloat16, device="cuda", scale=1.0)
    w = _randn(2 * F, d, dtype=torch.bfloat16, device="cuda", scale=d**-0.5)
    ref = G.glu_linear_reference(x.double(), w.double(), None, "gelu")
    y, h = glu_linear_fwd(x, w, None, "gelu", store_h=True)
    _check(y, ref, torch.bfloat16, "fused forward")
    _check(h, x.double() @ w.double().t(), torch.bfloat16, "stored h")


@pytest.mark.gpu
def test_gpu_compile_inductor():
    x = _leaf(_randn(64, 128, dtype=torch.bfloat16, device="cuda", scale=1.0))
    w = _leaf(_randn(2 * 96, 128, dtype=torch.bfloat16, device="cuda", scale=0.1))
    fn = torch.compile(lambda x, w: G.glu_linear(x, w, None, "silu").float().sum(), fullgraph=True)
    fn(x, w).backward()
    x64, w64 = _leaf(x, torch.float64), _leaf(w, torch.float64)
    G.glu_linear_reference(x64, w64, None, "silu").sum().backward()
    _check(x.grad, x64.grad, torch.bfloat16, "d x")
    _check(w.grad, w64.grad, torch.bfloat16, "d weight")
