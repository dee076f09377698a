"""Host cost of one gla GLA call, with every Triton launch stubbed out (runs on a CPU).

    python benchmarks/linear_attention_host.py        # prints µs per call

At short sequences the GPU finishes a GLA call before the host has issued it (T=1024 on the
H100: 93 µs of forward kernels, 215 µs per call in do_bench), so the host's own time is the thing
to cut. This times the Python/dispatcher work of ``chunk_gla`` (no grad; forward+backward) and of a
no-grad ``fused_recurrent_gla`` decode step on tiny CPU tensors, with the kernels replaced by
no-ops, so no tensor arithmetic is counted. ``GLA_EAGER_OP=1`` forces the torch.library op path.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> str:
    from gla.kernels.linear_attention import (chunk, chunk_gla, chunk_parallel, fused_recurrent,
                                              fused_recurrent_gla)

    for mod in (chunk, chunk_parallel, fused_recurrent):
        for name in dir(mod):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(mod, name, _NoLaunch())
    B, T, H, D = 1, 16, 1, 16
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, D)) / 16
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    h0 = torch.zeros(B, H, D, D)

    def fwd():
        with torch.no_grad():
            chunk_gla(q, k, v, g, impl="triton")

    def fwd_bwd():
        o, _ = chunk_gla(*leaves, impl="triton")
        o.sum().backward()

    def decode():
        with torch.no_grad():
            fused_recurrent_gla(q[:, :1], k[:, :1], v[:, :1], g[:, :1], initial_state=h0,
                                output_final_state=True, impl="triton")

    lines = []
    for name, fn in (("chunk_gla forward", fwd), ("chunk_gla forward+backward", fwd_bwd),
                     ("fused_recurrent_gla decode step", decode)):
        for _ in range(20):
            fn()
        n = 300
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        lines.append(f"{name}: {(time.perf_counter() - t0) / n * 1e6:.0f} µs of host time per call")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
