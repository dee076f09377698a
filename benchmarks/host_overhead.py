"""Host time of one attention training step, split into its parts (one GPU, small shapes).

    python benchmarks/host_overhead.py [out_dir]   # writes {out_dir}/host-overhead-<device>.md

At short sequences a fwd+bwd is bound by the host, not the GPU. This separates what gla's
launchers cost from what any Python autograd node costs on the machine, by timing (µs per call,
``issue`` = host time of N calls without a sync, ``wall`` = with the final sync):

* gla ``gated_attention`` fwd and fwd+bwd, and its launchers alone (no autograd), each also with
  every launch through Triton's ``JITFunction.run`` instead of the cached launcher
  (``gla.kernels.launch.triton_launches()``);
* a do-nothing ``torch.autograd.Function`` (``x * 2``, backward ``g * 2``) on CUDA and on the CPU:
  the cost of a Python backward node itself (the autograd engine runs CUDA nodes on its device
  thread, which must take the GIL);
* eager SDPA fwd+bwd (a C++ backward node) on the same shape;
* the same gla step under ``sys.setswitchinterval(1e-6)`` (whether the GIL hand-off waits);
* a cProfile of the gla step (top entries by own time).
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import threading
import time

import torch
import torch.nn.functional as F
from results_io import out_dir_arg, require_cuda, write_table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, H, T, D = 2, 16, 1024, 128
N = 300


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def _time(fn, n=N):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return 1e6 * (t1 - t0) / n, 1e6 * (t2 - t0) / n


def run(out_dir: str) -> str:
    import triton

    from gla.kernels import launch
    from gla.kernels.attention import flash, gated_attention

    mk = lambda dev="cuda": torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16,  # noqa: E731
                                        requires_grad=True)
    q, k, v = mk(), mk(), mk()
    do = torch.randn_like(q)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    o, lse = flash.attention_forward(qd, kd, vd, causal=True)
    xc, xh = torch.randn(64, device="cuda", requires_grad=True), torch.randn(64, requires_grad=True)

    def gla_step():
        gated_attention(q, k, v, causal=True).backward(do)

    def gla_fwd():
        with torch.no_grad():
            gated_attention(q, k, v, causal=True)

    def sdpa_step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

    def triton_path(fn):  # the same call with every launch through JITFunction.run
        def run():
            with launch.triton_launches():
                fn()
        return run

    rows = [
        ("gla gated_attention fwd (no grad)", gla_fwd),
        ("gla gated_attention fwd (no grad), Triton's launch path", triton_path(gla_fwd)),
        ("gla gated_attention fwd+bwd", gla_step),
        ("gla gated_attention fwd+bwd, Triton's launch path", triton_path(gla_step)),
        ("gla launchers alone: attention_forward", lambda: flash.attention_forward(
            qd, kd, vd, causal=True)),
        ("gla launchers alone: attention_backward (3 launches)", lambda: flash.attention_backward(
            do, qd, kd, vd, o, lse, causal=True)),
        ("gla launchers alone: attention_backward, Triton's launch path", triton_path(
            lambda: flash.attention_backward(do, qd, kd, vd, o, lse, causal=True))),
        ("do-nothing Python autograd.Function fwd+bwd, CUDA", lambda: _Double.apply(xc).sum()
         .backward()),
        ("do-nothing Python autograd.Function fwd+bwd, CPU", lambda: _Double.apply(xh).sum()
         .backward()),
        ("x * 2 fwd+bwd (C++ nodes only), CUDA", lambda: (xc * 2).sum().backward()),
        ("eager SDPA fwd+bwd (C++ backward)", sdpa_step),
    ]
    lines = []
    for name, fn in rows:
        issue, wall = _time(fn)
        lines.append(f"| {name} | {issue:.1f} | {wall:.1f} |")
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        issue, wall = _time(gla_step)
    finally:
        sys.setswitchinterval(old)
    lines.append(f"| gla fwd+bwd, sys.setswitchinterval(1e-6) | {issue:.1f} | {wall:.1f} |")

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        gla_step()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
    top = s.getvalue().strip().splitlines()
    top = [ln for ln in top if ln.strip()][-16:]

    name = torch.cuda.get_device_name()
    text = "\n".join([
        f"# Host time of attention calls on {name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, Python "
        f"{sys.version.split()[0]}, {os.cpu_count()} CPUs, {threading.active_count()} Python "
        f"thread(s); B={B} H={H} T={T} D={D} bf16 causal; µs per call over {N} calls "
        "(issue: no sync; wall: one sync at the end).",
        "",
        "| call | issue µs | wall µs |",
        "|---|---|---|",
        *lines,
        "",
        "cProfile of 100 gla fwd+bwd steps (own time; the profiler slows Python code):",
        "",
        "```",
        *top,
        "```",
    ]) + "\n"
    write_table(out_dir, "host-overhead", name, text)
    print(text)
    return text


def main(out_dir: str) -> str:
    require_cuda("host_overhead.py")
    return run(out_dir)


if __name__ == "__main__":
    main(out_dir_arg(sys.argv))
