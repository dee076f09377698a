"""GLU benchmark (bfloat16, one GPU): the elementwise kernel, the whole SwiGLU MLP, the gate/up alone.

    main(out_dir) -> str      # prints and returns the tables, writes {out_dir}/glu-<device>.md

(1) silu(a) * b on [16384, 11008]: gla Triton vs eager vs torch.compile vs Liger-Kernel's
    LigerSiLUMulFunction (if importable), forward and forward+backward, achieved GB/s (ideal bytes:
    fwd reads a, b and writes y; bwd reads dy, a, b and writes da, db) and % of a measured device
    copy (``torch.empty_like(src).copy_(src)``) moving the same number of bytes.
(2) SwiGLU MLP, N=16384 tokens, d=4096, ffn=11008: eager (three linears), torch.compile of it,
    gla fused glu_linear (Triton) + down proj, gla cuBLAS gate_up + Triton GLU + down proj (saving
    h, and recomputing it), Liger-style (two linears + LigerSiLUMulFunction + down) if importable:
    forward (no grad) and forward+backward ms, and the peak memory above the inputs/weights.
(3) gate/up projection alone: fused Triton glu_linear vs one packed cuBLAS matmul + Triton GLU vs
    two cuBLAS matmuls (no GLU), with TFLOP/s.

All timings are triton.testing.do_bench medians. Outputs are checked against eager before timing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from results_io import out_dir_arg, require_cuda, write_table


@dataclass
class Sizes:
    rows: int = 16384  # elementwise rows
    cols: int = 11008  # elementwise cols (= ffn)
    tokens: int = 16384
    d: int = 4096
    ffn: int = 11008


def _liger():
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction  # type: ignore

        return LigerSiLUMulFunction
    except Exception:  # not installed, or an incompatible version
        return None


class _Bench:
    """do_bench on CUDA; a plain wall-clock median elsewhere (only for smoke-testing this file)."""

    def __init__(self, device: str, rep_ms: int = 100):
        self.cuda = device.startswith("cuda")
        self.rep_ms = rep_ms

    def time(self, fn: Callable[[], object], grad_to_none=None, rep_ms: int | None = None) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=rep_ms or self.rep_ms, grad_to_none=grad_to_none,
                                  return_mode="median"))
        ts = []
        for _ in range(3):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[1]

    def peak_mb(self, fn: Callable[[], object], grad_to_none=None) -> float | None:
        """Peak memory allocated while fn runs, above what was allocated before (MiB)."""
        if not self.cuda:
            return None
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        return peak / 2**20


def _err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    from gla.testing import rel_rms_error

    return rel_rms_error(actual, expected)


def _check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float, notes: list[str]) -> None:
    err = _err(actual, expected)
    status = "ok" if err <= tol else "FAILED"
    notes.append(f"- check {name}: rel RMS error {err:.2e} ({status}, tol {tol:.0e})")
    if err > tol:
        raise AssertionError(f"{name}: rel RMS error {err:.3g} > {tol:g}")


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------------
# (1) elementwise
# ---------------------------------------------------------------------------------------------


def _elementwise(sz: Sizes, device: str, bench: _Bench, notes: list[str]) -> str:
    from gla.kernels.glu import elementwise as E
    from gla.kernels.glu import glu, glu_packed

    dtype = torch.bfloat16
    numel = sz.rows * sz.cols
    es = torch.empty((), dtype=dtype).element_size()
    a = torch.randn(sz.rows, sz.cols, device=device, dtype=dtype)
    b = torch.randn(sz.rows, sz.cols, device=device, dtype=dtype)
    dy = torch.randn(sz.rows, sz.cols, device=device, dtype=dtype)

    eager = lambda a, b: F.silu(a) * b  # noqa: E731
    # the MLP's layout: one [rows, 2F] gate_up tensor, halves read by offset
    packed = torch.cat([a, b], dim=1)
    packed_g = packed.clone().requires_grad_(True)
    variants: dict[str, Callable] = {
        "gla triton": lambda a, b: glu(a, b, "silu", impl="triton"),
        "gla triton packed [N, 2F]": lambda a, b: glu_packed(packed_g if a.requires_grad else packed,
                                                             "silu", impl="triton"),
        "eager": eager,
        "torch.compile": torch.compile(eager),
    }
    liger = _liger()
    if liger is not None:
        variants["liger"] = lambda a, b: liger.apply(a, b)
    else:
        notes.append("- Liger-Kernel not importable: its rows are left out")

    expected = (F.silu(a.float()) * b.float())
    for name, fn in variants.items():
        _check(f"elementwise {name}", fn(a, b), expected, 1e-2, notes)

    # device copy over the same bytes (copy moves 2x its source)
    fwd_bytes, fb_bytes = 3 * numel * es, 8 * numel * es
    copies = {}
    for label, nbytes in (("fwd", fwd_bytes), ("fwd+bwd", fb_bytes)):
        src = torch.empty(nbytes // (2 * es), device=device, dtype=dtype).normal_()
        t = bench.time(lambda: torch.empty_like(src).copy_(src))
        copies[label] = nbytes / (t * 1e-3) / 1e9
        del src
    notes.append(f"- device copy: {copies['fwd']:.0f} GB/s at {fwd_bytes / 1e9:.2f} GB moved, "
                 f"{copies['fwd+bwd']:.0f} GB/s at {fb_bytes / 1e9:.2f} GB moved")

    ag = a.clone().requires_grad_(True)
    bg = b.clone().requires_grad_(True)
    rows = []
    base_f = base_fb = None
    for name, fn in variants.items():
        t_f = bench.time(lambda: fn(a, b))
        t_fb = bench.time(lambda: fn(ag, bg).backward(dy), grad_to_none=[ag, bg, packed_g])
        if name == "eager":
            base_f, base_fb = t_f, t_fb
        rows.append((name, t_f, t_fb))
    out = []
    for name, t_f, t_fb in rows:
        gbs_f = fwd_bytes / (t_f * 1e-3) / 1e9
        gbs_fb = fb_bytes / (t_fb * 1e-3) / 1e9
        out.append([name, f"{t_f:.3f}", f"{gbs_f:.0f}", f"{100 * gbs_f / copies['fwd']:.1f}%",
                    f"{t_f / base_f:.2f}x", f"{t_fb:.3f}", f"{gbs_fb:.0f}",
                    f"{100 * gbs_fb / copies['fwd+bwd']:.1f}%", f"{t_fb / base_fb:.2f}x"])
    main_table = _table(["impl", "fwd ms", "fwd GB/s", "fwd % copy", "fwd vs eager",
                         "fwd+bwd ms", "fwd+bwd GB/s", "fwd+bwd % copy", "fwd+bwd vs eager"], out)

    # launch-config sweep of the gla kernels (flat separate tensors; 2-D packed), to tune defaults
    sweep = []
    saved = (E._NUM_WARPS, E._VECTORS_PER_THREAD)
    try:
        for warps in (4, 8):
            for vecs in (2, 4, 8):
                E._NUM_WARPS, E._VECTORS_PER_THREAD = warps, vecs
                t_f = bench.time(lambda: glu(a, b, "silu", impl="triton"))
                t_p = bench.time(lambda: glu_packed(packed, "silu", impl="triton"))
                t_b = bench.time(lambda: E.glu_bwd(dy, a, b, "silu"))
                default = " (default)" if (warps, vecs) == saved else ""
                sweep.append([f"{warps} warps x {vecs} vec/thread{default}",
                              f"{100 * fwd_bytes / (t_f * 1e-3) / 1e9 / copies['fwd']:.1f}%",
                              f"{100 * fwd_bytes / (t_p * 1e-3) / 1e9 / copies['fwd']:.1f}%",
                              f"{100 * 5 * numel * es / (t_b * 1e-3) / 1e9 / copies['fwd+bwd']:.1f}%"])
    finally:
        E._NUM_WARPS, E._VECTORS_PER_THREAD = saved
    del a, b, dy, ag, bg, packed, packed_g
    return (f"### (1) silu(a) * b, [{sz.rows}, {sz.cols}] bf16\n\n" + main_table
            + "\n\nLaunch-config sweep of the gla kernels (% of device copy bandwidth):\n\n"
            + _table(["config", "fwd flat", "fwd packed 2-D", "bwd flat"], sweep))


# ---------------------------------------------------------------------------------------------
# (2) whole MLP
# ---------------------------------------------------------------------------------------------


def _mlp(sz: Sizes, device: str, bench: _Bench, notes: list[str]) -> str:
    from gla.backend import gla_backend
    from gla.kernels.glu import glu, glu_linear

    dtype = torch.bfloat16
    N, d, Fh = sz.tokens, sz.d, sz.ffn
    gen = lambda *s, scale=1.0: (torch.randn(*s, device=device, dtype=torch.float32) * scale).to(dtype)  # noqa: E731
    x0 = gen(N, d)
    w_gu = gen(2 * Fh, d, scale=d**-0.5).requires_grad_(True)
    w_g = w_gu.detach()[:Fh].clone().requires_grad_(True)
    w_u = w_gu.detach()[Fh:].clone().requires_grad_(True)
    w_d = gen(d, Fh, scale=Fh**-0.5).requires_grad_(True)
    dout = gen(N, d)
    params = [w_gu, w_g, w_u, w_d]

    def eager(x):
        return F.linear(F.silu(F.linear(x, w_g)) * F.linear(x, w_u), w_d)

    def gla_fused(x):
        return F.linear(glu_linear(x, w_gu, None, "silu", impl="triton"), w_d)

    def gla_cublas(x):
        return F.linear(glu_linear(x, w_gu, None, "silu", impl="cublas"), w_d)

    def gla_cublas_recompute(x):
        return F.linear(glu_linear(x, w_gu, None, "silu", impl="cublas", recompute=True), w_d)

    def gla_fused_recompute(x):
        return F.linear(glu_linear(x, w_gu, None, "silu", impl="triton", recompute=True), w_d)

    def gla_two_cublas(x):  # what the GLU lowering emits for two projections
        return F.linear(glu(F.linear(x, w_g), F.linear(x, w_u), "silu", impl="triton"), w_d)

    variants: dict[str, Callable] = {
        "eager (3 linears)": eager,
        "torch.compile": torch.compile(eager),
        "torch.compile(backend='gla')": torch.compile(eager, backend=gla_backend),
        "gla 2 cuBLAS + glu + down (the lowering)": gla_two_cublas,
        "gla fused glu_linear + down": gla_fused,
        "gla fused, recompute h": gla_fused_recompute,
        "gla cuBLAS gate_up + glu + down": gla_cublas,
        "gla cuBLAS, recompute h": gla_cublas_recompute,
    }
    liger = _liger()
    if liger is not None:
        variants["liger-style"] = lambda x: F.linear(liger.apply(F.linear(x, w_g), F.linear(x, w_u)), w_d)

    t0 = time.perf_counter()
    with torch.no_grad():
        glu_linear(x0[:256], w_gu, None, "silu", impl="triton")
    if bench.cuda:
        torch.cuda.synchronize()
    notes.append(f"- first call of the fused glu_linear (compile included): {time.perf_counter() - t0:.1f} s")

    with torch.no_grad():
        expected = eager(x0)
        for name, fn in variants.items():
            _check(f"MLP {name}", fn(x0), expected, 2e-2, notes)
    del expected

    x = x0.clone().requires_grad_(True)
    grads_to_none = [x, *params]
    # gradient check of gla against eager once (x and down weight)
    eager(x).backward(dout)
    ref_dx, ref_dwd = x.grad.clone(), w_d.grad.clone()
    for name in ("gla fused glu_linear + down", "gla cuBLAS gate_up + glu + down"):
        for t in grads_to_none:
            t.grad = None
        variants[name](x).backward(dout)
        _check(f"MLP grad x {name}", x.grad, ref_dx, 3e-2, notes)
        _check(f"MLP grad w_down {name}", w_d.grad, ref_dwd, 3e-2, notes)
    del ref_dx, ref_dwd
    for t in grads_to_none:
        t.grad = None

    rows = []
    for name, fn in variants.items():
        with torch.no_grad():
            t_f = bench.time(lambda: fn(x0), rep_ms=200)
            m_f = bench.peak_mb(lambda: fn(x0))
        step = lambda: fn(x).backward(dout)  # noqa: E731
        t_fb = bench.time(step, grad_to_none=grads_to_none, rep_ms=300)
        m_fb = bench.peak_mb(step, grad_to_none=grads_to_none)
        rows.append((name, t_f, m_f, t_fb, m_fb))
    base = rows[0]
    out = []
    for name, t_f, m_f, t_fb, m_fb in rows:
        out.append([name, f"{t_f:.3f}", f"{t_f / base[1]:.2f}x", _fmt(m_f, ".0f"),
                    f"{t_fb:.3f}", f"{t_fb / base[3]:.2f}x", _fmt(m_fb, ".0f"),
                    "–" if m_fb is None or base[4] is None else f"{m_fb / base[4]:.2f}x"])
    del x, x0, dout, params, w_gu, w_g, w_u, w_d
    return (f"### (2) SwiGLU MLP, N={N}, d={d}, ffn={Fh}, bf16 (peak = MiB above inputs/weights)\n\n"
            + _table(["impl", "fwd ms", "fwd vs eager", "fwd peak MiB", "fwd+bwd ms",
                      "fwd+bwd vs eager", "fwd+bwd peak MiB", "peak vs eager"], out))


# ---------------------------------------------------------------------------------------------
# (3) gate/up projection alone
# ---------------------------------------------------------------------------------------------


def _gate_up(sz: Sizes, device: str, bench: _Bench, notes: list[str]) -> str:
    from dataclasses import replace

    from gla.kernels.glu import glu_linear
    from gla.kernels.glu.elementwise import interpreting
    from gla.kernels.glu.matmul import MatmulConfig, default_config, glu_linear_fwd

    dtype = torch.bfloat16
    N, d, Fh = sz.tokens, sz.d, sz.ffn
    x = torch.randn(N, d, device=device, dtype=dtype)
    w_gu = (torch.randn(2 * Fh, d, device=device) * d**-0.5).to(dtype)
    w_g, w_u = w_gu[:Fh].contiguous(), w_gu[Fh:].contiguous()
    cfg = default_config(N, Fh, d, dtype, interpreting() or not bench.cuda)
    configs = [cfg, replace(cfg, persistent=True)]
    if bench.cuda:
        configs += [replace(cfg, num_stages=4), MatmulConfig(128, 64, 64, 8, 4, 4),
                    MatmulConfig(64, 128, 64, 8, 4, 4)]

    def label(c):
        return (f"gla fused {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
                + (" persistent" if c.persistent else "") + (" (default)" if c == cfg else ""))

    variants: dict[str, Callable] = {
        "two cuBLAS matmuls (no GLU)": lambda: (x @ w_g.t(), x @ w_u.t()),
        "cuBLAS packed gate_up (no GLU)": lambda: x @ w_gu.t(),
        "cuBLAS gate_up + gla GLU (impl='cublas')": lambda: glu_linear(x, w_gu, None, "silu", impl="cublas"),
    }
    for c in configs:
        variants[label(c)] = (lambda c=c: glu_linear_fwd(x, w_gu, None, "silu", config=c)[0])
    expected = glu_linear(x, w_gu, None, "silu", impl="reference")
    for c in configs:
        _check(label(c), variants[label(c)](), expected, 2e-2, notes)
    flops = 2.0 * N * d * 2 * Fh
    rows = []
    times = {}
    base = None
    for name, fn in variants.items():
        t = bench.time(fn)
        times[name] = t
        base = base or t
        rows.append([name, f"{t:.3f}", f"{flops / (t * 1e-3) / 1e12:.0f}", f"{t / base:.2f}x"])
    best = min((n for n in times if n.startswith("gla fused")), key=times.get)
    split = times["cuBLAS gate_up + gla GLU (impl='cublas')"]
    notes.append(f"- gate/up: best fused config '{best}' {times[best]:.3f} ms vs cuBLAS + gla GLU "
                 f"{split:.3f} ms ({split / times[best]:.2f}x): "
                 + ("the fused kernel wins here; choose_glu_linear_impl could return 'triton' at this shape"
                    if times[best] < split else "keep choose_glu_linear_impl -> 'cublas'"))
    del x, w_gu, w_g, w_u, expected
    return (f"### (3) gate/up projection alone, N={N}, d={d}, 2F={2 * Fh}, bf16\n\n"
            + _table(["impl", "ms", "TFLOP/s", "vs two cuBLAS"], rows))


# ---------------------------------------------------------------------------------------------


def run(out_dir: str, device: str = "cuda", sizes: Sizes | None = None) -> str:
    import triton

    sz = sizes or Sizes()
    bench = _Bench(device)
    name = torch.cuda.get_device_name() if bench.cuda else "cpu"
    notes: list[str] = []
    t0 = time.perf_counter()
    sections = []
    for part in (_elementwise, _mlp, _gate_up):
        sections.append(part(sz, device, bench, notes))
        if bench.cuda:
            torch.cuda.empty_cache()
    from gla.kernels.glu import choose_glu_linear_impl

    probe = torch.empty(2, 8, device=device, dtype=torch.bfloat16)
    auto = choose_glu_linear_impl(probe, torch.empty(8, 8, device=device, dtype=torch.bfloat16), None, "silu")
    head = (f"## GLU benchmark on {name}\n\n"
            f"torch {torch.__version__}, triton {triton.__version__}, bf16, "
            f"{'triton.testing.do_bench medians' if bench.cuda else 'CPU wall-clock medians'} (ms); "
            f"ratios are vs eager (lower is better). glu_linear impl='auto' here runs {auto!r} "
            f"(choose_glu_linear_impl).\n")
    text = "\n\n".join([head, *sections, "Checks and notes:\n\n" + "\n".join(notes),
                        f"total benchmark time {time.perf_counter() - t0:.0f} s"]) + "\n"
    write_table(out_dir, "glu", name, text)
    print(text)
    return text


def main(out_dir: str) -> str:
    require_cuda("glu.py")
    return run(out_dir, "cuda")


if __name__ == "__main__":
    import sys

    main(out_dir_arg(sys.argv))
