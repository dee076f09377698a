"""What the cached Triton launcher (``gla.kernels.launch.Launcher``) saves, in one GPU run.

    python benchmarks/launch_cache.py [out_dir]   # writes {out_dir}/launch-cache-<device>.md

At short sequences a call is bound by the host: every launch through ``JITFunction.run``
re-specializes ~40 arguments and rebuilds Triton's cache key. Each row times the same call twice,
side by side: with the cached launcher (the default) and with every launch through Triton's own
path (``launch.triton_launches()``, what ``GLA_LAUNCH_CACHE=0`` selects), alternating three times
after an unmeasured round (the first timing in a process runs slow). ``do_bench`` medians in ms
(what the kernel tables report; gradients set to None between calls) and, for the decode step,
host µs per call without a sync. Shapes: attention B=2 H=16 D=128 causal bf16; GLA B=2 H=16
K=V=128 bf16 (chunked forward, forward+backward, and one decode step against a 128x128 state).
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from results_io import out_dir_arg, require_cuda, write_table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, H, D = 2, 16, 128
T_LIST = (1024, 2048)


def _bench(fn, grads=None) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median"))


def _host_us(fn, grads=None, n=300) -> float:  # (grads: the do_bench signature; unused)
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * dt / n


def _rows():
    from gla.kernels import launch
    from gla.kernels.attention import gated_attention
    from gla.kernels.linear_attention import chunk_gla, fused_recurrent_gla

    def uncached(fn):
        def run():
            with launch.triton_launches():
                return fn()
        return run

    def pair(name, fn, grads=None, unit="ms", timer=_bench):
        """Both ways, alternating three times after one unmeasured round; medians."""
        ways = (fn, uncached(fn))
        for way in ways:
            timer(way, grads)
        times = ([], [])
        for _ in range(3):
            for way, ts in zip(ways, times):
                ts.append(timer(way, grads))
        a, b = (sorted(ts)[1] for ts in times)
        return f"| {name} | {unit} | {a:.4g} | {b:.4g} | {b / a:.2f} |"

    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    for t in T_LIST:
        q, k, v = (mk(B, H, t, D).requires_grad_() for _ in range(3))
        do = torch.randn_like(q)

        def attn_fwd():
            with torch.no_grad():
                gated_attention(q, k, v, causal=True)

        yield pair(f"attention fwd, T={t}", attn_fwd)
        yield pair(f"attention fwd+bwd, T={t}",
                   lambda: gated_attention(q, k, v, causal=True).backward(do), [q, k, v])
    for t in T_LIST:
        q, k, v = mk(B, t, H, D), mk(B, t, H, D), mk(B, t, H, D)
        g = (F.logsigmoid(mk(B, t, H, D).float()) / 16).to(torch.bfloat16)
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
        do = torch.randn_like(q)

        def gla_fwd():
            with torch.no_grad():
                chunk_gla(q, k, v, g, impl="triton")

        def gla_fwd_bwd():
            o, _ = chunk_gla(*leaves, impl="triton")
            o.backward(do)

        yield pair(f"chunk_gla fwd, T={t}", gla_fwd)
        yield pair(f"chunk_gla fwd+bwd, T={t}", gla_fwd_bwd, leaves)
    h0 = torch.randn(B, H, D, D, device="cuda")
    x1 = [mk(B, 1, H, D) for _ in range(3)]
    g1 = (F.logsigmoid(torch.randn(B, 1, H, D, device="cuda")) / 16).to(torch.bfloat16)

    def decode():
        with torch.no_grad():
            fused_recurrent_gla(*x1, g1, initial_state=h0, output_final_state=True,
                                impl="triton")

    yield pair("fused_recurrent_gla decode step", decode)
    yield pair("fused_recurrent_gla decode step, host time", decode, unit="µs/call",
               timer=_host_us)


def run(out_dir: str) -> str:
    import triton
    name = torch.cuda.get_device_name()
    lines = [f"# Cached Triton launches vs Triton's launch path on {name}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, bf16. Same run, same "
             "inputs; `ratio` = Triton's path / cached (> 1: the cache is faster).", "",
             "| call | unit | cached launcher | Triton's launch path | ratio |",
             "|---|---|---|---|---|"]
    for row in _rows():
        lines.append(row)
        print(row, flush=True)
    text = "\n".join(lines) + "\n"
    write_table(out_dir, "launch-cache", name, text)
    return text


def main(out_dir: str) -> str:
    require_cuda("launch_cache.py")
    return run(out_dir)


if __name__ == "__main__":
    main(out_dir_arg(sys.argv))
