"""A/B of the Gluon kernels' program order (``hopper._schedule``) and the backward's lse/delta staging.

    python benchmarks/attention_schedule.py [--out DIR] [--non-causal]

Per shape (bf16, B=2, H=16 unless GQA): gla's forward (``flash.attention_forward``) and whole
backward (``flash.attention_backward``) under each variant of ``VARIANTS``, and cuDNN's forward
and backward (SDPA) for scale. CUDA-graph replays, ms (cuDNN's backward: plain events); each
variant timed twice, in alternating order (ABC ABC), and the two medians averaged.
``vs first`` = the first variant's time / this one's.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from results_io import write_text
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gla.kernels.attention import flash, hopper, hopper_bwd  # noqa: E402

SHAPES = [  # (D, T, H, HK, causal)
    (128, 2048, 16, 16, True), (128, 4096, 16, 16, True), (128, 8192, 16, 16, True),
    (128, 16384, 16, 16, True), (128, 4096, 16, 16, False), (128, 8192, 16, 4, True),
    (64, 4096, 16, 16, True), (64, 8192, 16, 16, True), (64, 16384, 16, 16, True),
    (64, 8192, 16, 4, True), (64, 4096, 16, 16, False),
]
# name: [(module, attribute, value)]; the first is the reference of the ratios
VARIANTS = {
    "before": [(hopper, "L2_BUDGET", 0), (hopper_bwd, "LSE_IN_SMEM", False)],
    "lse in smem": [(hopper, "L2_BUDGET", 0)],
    "+ heads by L2 (default)": [],
    "+ all heads": [(hopper, "L2_BUDGET", None)],
}


def _bench(fn):
    return do_bench_cudagraph(fn, rep=100)


def _with(knobs, fn):
    saved = [(mod, n, getattr(mod, n)) for mod, n, _ in knobs]
    for mod, n, val in knobs:
        setattr(mod, n, val)
    try:
        return fn()
    finally:
        for mod, n, val in saved:
            setattr(mod, n, val)


def main(out_dir: str | None, variants=VARIANTS, causal_only=None) -> str:
    """``causal_only``: None, every shape; True / False: only the causal / non-causal ones."""
    lines = [f"# Gluon attention kernels: program order and launch knobs\n",
             f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}; bf16, B=2; CUDA-graph replays, ms (mean of two "
             f"medians, variants alternated); vs first = first variant's time / this one's\n"]
    print("\n".join(lines), flush=True)
    B = 2
    for D, T, H, HK, causal in SHAPES:
        if causal_only is not None and causal != causal_only:
            continue
        g = torch.Generator(device="cuda").manual_seed(T + D)
        mk = lambda h: torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16,  # noqa
                                   generator=g).transpose(1, 2)
        q, k, v, dout = mk(H), mk(HK), mk(HK), mk(H)
        out, lse = flash.attention_forward(q, k, v, causal=causal)
        steps = {
            "fwd": lambda: flash.attention_forward(q, k, v, causal=causal),
            "bwd": lambda: flash.attention_backward(dout, q, k, v, out, lse, causal=causal),
        }
        ref = {name: _with([], step)[0] for name, step in steps.items()}
        times = {(p, n): [] for p in steps for n in variants}
        for rnd in range(2):
            for name, knobs in variants.items():
                for p, step in steps.items():
                    got = _with(knobs, step)[0]  # the variant computes what the default does
                    torch.testing.assert_close(got, ref[p], rtol=2e-2, atol=2e-2)
                    times[p, name].append(_with(knobs, lambda: _bench(step)))
        kr = k.repeat_interleave(H // HK, 1).detach().requires_grad_()
        vr = v.repeat_interleave(H // HK, 1).detach().requires_grad_()
        qr = q.detach().requires_grad_()
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_fwd = _bench(lambda: F.scaled_dot_product_attention(q, kr, vr,
                                                                      is_causal=causal))
            o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
        # (plain events: capturing cuDNN's autograd.grad failed here on torch 2.11)
        cudnn_bwd = triton.testing.do_bench(
            lambda: torch.autograd.grad(o, (qr, kr, vr), dout, retain_graph=True), rep=100)
        first = next(iter(variants))
        for p, cudnn in (("fwd", cudnn_fwd), ("bwd", cudnn_bwd)):
            ms = {n: sum(times[p, n]) / 2 for n in variants}
            cells = "  ".join(f"{n} {t:.3f} ({ms[first] / t:.3f}x, {cudnn / t:.2f}x cuDNN)"
                              for n, t in ms.items())
            line = (f"D={D} T={T} H={H}/{HK} {'causal' if causal else 'full'} {p}: cudnn "
                    f"{cudnn:.3f}  {cells}")
            print(line, flush=True)
            lines.append(line)
            write_text(out_dir, "attention-schedule.txt", lines)  # as it goes: a cut run keeps its rows
    return write_text(out_dir, "attention-schedule.txt", lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--non-causal", action="store_true", help="only the non-causal shapes")
    a = p.parse_args()
    main(a.out, causal_only=False if a.non_causal else None)
