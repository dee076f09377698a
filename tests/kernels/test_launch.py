"""gla.kernels.launch.Launcher: the cached launch path must pick the kernel Triton would pick.

The key of a cached launch has to be at least as fine as Triton's specialization (a kernel
compiled for 16-byte-aligned pointers, or for a stride equal to 1, must never see another kind
of argument). On the CPU that is checked against Triton's own specializer; on the GPU, cached
launches against fresh ones, on aligned and misaligned views and inside a CUDA graph.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import gla.kernels  # noqa: F401  (selects the Triton interpreter without CUDA)
from gla.kernels.attention import attention_reference, flash, gated_attention
from gla.kernels.launch import Launcher, _arg_key
from gla.testing import rel_rms_error

try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
except ImportError:  # a Triton without the native specializer: nothing to compare with
    native_specialize_impl = None


def _triton_spec(a):
    return native_specialize_impl(BaseBackend, a, False, True, True)


@pytest.mark.skipif(native_specialize_impl is None, reason="Triton's specializer not importable")
def test_arg_key_is_at_least_as_fine_as_triton():
    """Equal keys imply equal Triton specializations, over ints at every boundary Triton draws
    (1, multiples of 16, the int32 range) and tensors of several dtypes and alignments."""
    ints = [0, 1, 2, 15, 16, 17, 32, 48, 1000, 1024, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16,
            2**40, 2**40 + 3, -1, -16, -17, -(2**31), -(2**31) - 1, -(2**31) - 16]
    base = {dt: torch.randn(64).to(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)}
    base[torch.uint8] = torch.zeros(64, dtype=torch.uint8)
    tensors = [b[off:] for b in base.values() for off in (0, 1, 2, 3, 4, 8, 16)]
    values = ints + tensors + [0.5, 1.0, True, False, None]
    for a, b in itertools.combinations(values, 2):
        if _arg_key(a) == _arg_key(b):
            assert _triton_spec(a) == _triton_spec(b), (a, b)
    # and the key does tell apart what Triton tells apart, for the arguments our kernels take
    assert _arg_key(base[torch.float16][1:]) != _arg_key(base[torch.float16][8:])
    assert _arg_key(1) != _arg_key(17) != _arg_key(16) != _arg_key(2**31 + 16)


def test_interpreter_passes_through(monkeypatch):
    """Under the interpreter the launcher is Triton's own call (nothing cached)."""
    if not flash.INTERPRETED:
        pytest.skip("compiled Triton")
    q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))
    flash.attention_forward(q, k, v, causal=True)
    assert isinstance(flash._attn_fwd, Launcher) and flash._attn_fwd._fine == {}


class _FakeCompiled:
    """Stands in for a CompiledKernel: records what its launcher is given."""
    function, packed_metadata = "fn", "meta"

    def __init__(self, runs):
        self.runs = runs

    def run(self, *args):
        self.runs.append(args)


class _FakeJIT:
    """Stands in for a JITFunction with parameters (X, Y, n, scale, BLOCK): counts the launches
    that take Triton's path."""

    class _Param:
        def __init__(self, name, default=None):
            self.name, self.default = name, default

    def __init__(self):
        self.params = [self._Param(n) for n in ("X", "Y", "n", "scale")] + [
            self._Param("BLOCK"), self._Param("FLAG", default=7)]
        self.triton_launches, self.runs = [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.triton_launches.append((grid, args, kwargs))
            return _FakeCompiled(self.runs)
        return launch


@pytest.fixture
def fake_launcher(monkeypatch):
    """A Launcher around :class:`_FakeJIT`, with CPU tensors playing CUDA device 0."""
    from gla.kernels import launch
    monkeypatch.setattr(launch, "CACHED", True)
    monkeypatch.setattr(launch, "_cuda_index", lambda t: 0)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 1234)
    fn = _FakeJIT()
    lau = Launcher(fn)
    lau.interpreted, lau._knobs = False, None
    return lau, fn


def test_launcher_caches_per_triton_specialization(fake_launcher):
    """Only a new specialization takes Triton's path; the cached launcher gets the grid, the
    current stream, then every argument in signature order with constexpr defaults filled in."""
    lau, fn = fake_launcher
    buf = torch.zeros(64, dtype=torch.float16)
    x, y = buf[:32], buf[8:40]  # both 16-byte aligned
    lau[(3, 2)](x, y, 48, 0.5, BLOCK=16)
    assert len(fn.triton_launches) == 1 and fn.runs == []
    lau[(3, 2)](x, y, 48, 0.5, BLOCK=16)  # exact hit
    lau[(5,)](y, x, 64, 0.25, BLOCK=16)  # other values, same specialization: fine hit
    assert len(fn.triton_launches) == 1
    assert fn.runs[0] == (3, 2, 1, 1234, "fn", "meta", None, None, None, x, y, 48, 0.5, 16, 7)
    assert fn.runs[1][:3] == (5, 1, 1) and fn.runs[1][9:] == (y, x, 64, 0.25, 16, 7)
    for args, kwargs in [((buf[1:33], y, 48, 0.5), {}),  # misaligned pointer
                         ((x, y, 47, 0.5), {}),  # not a multiple of 16
                         ((x, y, 1, 0.5), {}),  # equal to 1
                         ((x, y, 2**31 + 16, 0.5), {}),  # an int64
                         ((x, y, 48, 0.5), {"BLOCK": 32}),  # another constexpr
                         ((x, y, 48, 0.5), {"BLOCK": 16, "num_warps": 8}),  # another option
                         ((x.float(), y, 48, 0.5), {})]:  # another dtype
        kwargs = {"BLOCK": 16, **kwargs}
        before = len(fn.triton_launches)
        lau[(1,)](*args, **kwargs)
        assert len(fn.triton_launches) == before + 1, (args, kwargs)
    # 1, True and 1.0 are equal as dict keys; Triton specializes them differently, as scalars
    # and as constexprs
    for args, kwargs in [((x, y, True, 0.5), {"BLOCK": 16}),
                         ((x, y, 48, 0.5), {"BLOCK": 16, "FLAG": 1}),
                         ((x, y, 48, 0.5), {"BLOCK": 16, "FLAG": True})]:
        before = len(fn.triton_launches)
        lau[(1,)](*args, **kwargs)
        assert len(fn.triton_launches) == before + 1, (args, kwargs)


def test_launcher_falls_back_on_unexpected_arguments(fake_launcher):
    """A scalar where a pointer was, a callable grid or an unhashable keyword goes through
    Triton every time."""
    lau, fn = fake_launcher
    x = torch.zeros(32, dtype=torch.float16)
    lau[(1,)](x, x, 16, 0.5, BLOCK=16)
    for _ in range(2):
        lau[(1,)](x, 3, 16, 0.5, BLOCK=16)
        lau[lambda meta: (1,)](x, x, 16, 0.5, BLOCK=16)
        lau[(1,)](x, x, 16, 0.5, BLOCK=[16])  # an unhashable keyword
    assert len(fn.triton_launches) == 7 and fn.runs == []


def test_triton_launches_block_bypasses_and_restores(fake_launcher):
    """Inside ``triton_launches()`` a cached kernel still goes through Triton; after it, the
    cache is used again."""
    from gla.kernels import launch
    lau, fn = fake_launcher
    x = torch.zeros(32, dtype=torch.float16)
    lau[(1,)](x, x, 16, 0.5, BLOCK=16)
    with launch.triton_launches():
        lau[(1,)](x, x, 16, 0.5, BLOCK=16)
    assert len(fn.triton_launches) == 2 and fn.runs == []
    lau[(1,)](x, x, 16, 0.5, BLOCK=16)
    assert len(fn.triton_launches) == 2 and len(fn.runs) == 1


def test_bound_launch_calls_the_c_launch_where_laid_out_as_triton36(fake_launcher, monkeypatch):
    """A bound launch's first call goes through the launcher; later ones call the compiled
    kernel's C launch with Triton 3.6's 13 leading arguments, then the call's arguments and the
    constexprs, where the launcher is laid out so. A launcher with scratch buffers, a Python
    ``launch`` (tensor descriptors) or another driver layout keeps ``kernel.run``."""
    import types

    from gla.kernels import launch
    lau, fn = fake_launcher
    c_calls = []

    class CLaunch:  # (not a Python function, as the compiled C launch is not)
        def __call__(self, *args):
            c_calls.append(args)

    def compiled(**attrs):
        run = types.SimpleNamespace(**{**dict(launch=CLaunch(), global_scratch_size=0,
                                              profile_scratch_size=0,
                                              launch_cooperative_grid=False, launch_pdl=True),
                                       **attrs})
        return types.SimpleNamespace(run=run, function="fn", packed_metadata="meta")

    driver36 = types.SimpleNamespace(_BASE_ARGS_FORMAT_LEN=13)
    assert launch.c_launch(compiled(), driver36) is not None
    assert launch.c_launch(compiled(global_scratch_size=64), driver36) is None
    assert launch.c_launch(compiled(profile_scratch_size=8), driver36) is None
    assert launch.c_launch(compiled(launch=lambda *a: None), driver36) is None
    assert launch.c_launch(compiled(), types.SimpleNamespace(_BASE_ARGS_FORMAT_LEN=12)) is None
    real = launch.launch_leading_args
    monkeypatch.setattr(launch, "launch_leading_args",
                        lambda kernel, driver=None: real(kernel, driver36))
    monkeypatch.setattr(_FakeJIT, "__getitem__", lambda self, grid: (
        lambda *a, **k: (self.triton_launches.append(a), compiled())[1]))
    x = torch.zeros(32, dtype=torch.float16)
    bound = lau.bind((3, 2), dict(BLOCK=16))
    for n in (48, 48):
        bound(x, x, n, 0.5)
    assert len(fn.triton_launches) == 1 and len(c_calls) == 1
    assert c_calls[0] == (3, 2, 1, 1234, "fn", False, True, None, None, "meta", None, None,
                          None, x, x, 48, 0.5, 16, 7)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
def _misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """The same values in a buffer whose data pointer is ``offset`` elements past alignment."""
    flat = torch.empty(t.numel() + 64, dtype=t.dtype, device=t.device)
    view = flat[offset:offset + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _fwd_bwd(q, k, v, g, dout):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, g)]
    out = gated_attention(*leaves[:3], gate=leaves[3], causal=True, impl="triton")
    return (out, *torch.autograd.grad(out, leaves, dout))


@pytest.mark.gpu
def test_gpu_cached_launch_matches_first_and_respecializes():
    """A cached launch gives bit-identical results to the first (Triton-path) launch; a
    misaligned input compiles a new entry instead of reusing an aligned kernel,
    and still matches float64."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, T, D = 2, 4, 257, 64
    q, k, v, g, dout = (torch.randn(B, H, T, D, device="cuda", generator=gen,
                                    dtype=torch.bfloat16) for _ in range(5))
    first = _fwd_bwd(q, k, v, g, dout)
    n_entries = len(flash._attn_fwd._fine)
    assert n_entries > 0  # the first launch was cached
    again = _fwd_bwd(q, k, v, g, dout)
    assert len(flash._attn_fwd._fine) == n_entries  # a hit
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    odd = [_misaligned(t, 3) for t in (q, k, v, g, dout)]
    shifted = _fwd_bwd(*odd)
    assert len(flash._attn_fwd._fine) > n_entries
    ref = [t.double().requires_grad_() for t in (q, k, v, g)]
    out = attention_reference(*ref[:3], gate=ref[3], causal=True)
    expect = (out, *torch.autograd.grad(out, ref, dout.double()))
    for name, a, e in zip(["out", "dq", "dk", "dv", "dg"], shifted, expect):
        assert rel_rms_error(a, e) <= 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["assigned", "added"])
def test_gpu_launch_hook_takes_triton_path(how):
    """With a Triton launch hook installed (profilers), every launch goes through Triton, whether
    the hook replaces ``knobs.runtime.launch_enter_hook`` or is added to its chain."""
    import triton
    seen = []
    hook = lambda meta: seen.append(meta)  # noqa: E731
    q, k, v = (torch.randn(1, 2, 100, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    gated_attention(q, k, v, causal=True, impl="triton")  # a cached entry exists
    assert len(flash._attn_fwd._fine) > 0
    runtime = triton.knobs.runtime
    old = runtime.launch_enter_hook
    if how == "assigned":
        runtime.launch_enter_hook = hook
    else:
        runtime.launch_enter_hook.add(hook)
    try:
        gated_attention(q, k, v, causal=True, impl="triton")
    finally:
        if how == "assigned":
            runtime.launch_enter_hook = old
        else:
            runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 1


@pytest.mark.gpu
def test_gpu_cached_launch_in_cuda_graph():
    """Cached launches capture into a CUDA graph; replays follow new input values."""
    B, H, T, D = 1, 4, 300, 128
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = 1 / math.sqrt(D)
    gated_attention(q, k, v, causal=True, impl="triton")  # compile + cache outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gated_attention(q, k, v, causal=True, impl="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gated_attention(q, k, v, causal=True, impl="triton")
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        ref = attention_reference(q.double(), k.double(), v.double(), causal=True, scale=scale)
        assert rel_rms_error(out, ref) <= 1e-2

