"""Hardware counters of gla's Hopper attention kernels and cuDNN's, under Nsight Compute.

    python benchmarks/attention_ncu.py CASE            # runs CASE's launches (no timing)
    bash benchmarks/attention_ncu.sh OUT_DIR [CASE...] # ncu over each CASE, reports to OUT_DIR

A CASE is a kernel at one shape, bf16, B=2, H=16, causal (``CASES``). The script warms the kernel
up (JIT compile, cuDNN's plan) and then marks the launches to profile with
``cudaProfilerStart/Stop``, so ``ncu --profile-from-start off`` sees only those. ncu needs the
hardware counters: Firecracker machines have them, gVisor ones do not
(/work/.library/device/KINDS.md).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gla.kernels.attention import flash  # noqa: E402

CASES = {  # name: (pass, D, T, gated)
    "bwd-d128-t4096": ("bwd", 128, 4096, False),
    "bwd-d64-t8192": ("bwd", 64, 8192, False),
    "fwd-d128-t8192": ("fwd", 128, 8192, False),
    "fwd-d128-t8192-gated": ("fwd", 128, 8192, True),
    "cudnn-bwd-d128-t4096": ("cudnn-bwd", 128, 4096, False),
    "cudnn-fwd-d128-t8192": ("cudnn-fwd", 128, 8192, False),
}


def _inputs(d: int, t: int, gated: bool, b: int = 2, h: int = 16):
    g = torch.Generator(device="cuda").manual_seed(t + d)
    mk = lambda: torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                             generator=g).transpose(1, 2)
    return mk(), mk(), mk(), mk(), (mk() if gated else None)


def step(case: str):
    """The function whose launches ncu profiles, after its warm-up."""
    kind, d, t, gated = CASES[case]
    q, k, v, dout, gate = _inputs(d, t, gated)
    if kind == "fwd":
        return lambda: flash.attention_forward(q, k, v, gate, causal=True)
    if kind == "bwd":
        out, lse = flash.attention_forward(q, k, v, gate, causal=True)
        return lambda: flash.attention_backward(dout, q, k, v, out, lse, gate, causal=True)
    qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
    if kind == "cudnn-fwd":
        def fwd():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fwd
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
    return lambda: torch.autograd.grad(o, (qr, kr, vr), dout, retain_graph=True)


def main(case: str, warmup: int = 3, profiled: int = 1) -> None:
    fn = step(case)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(profiled):
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main(sys.argv[1])
