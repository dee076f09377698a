"""The attention backward on Hopper: gla's Triton backward against the Gluon one, and cuDNN's.

    python benchmarks/attention_gluon_bwd.py [--out DIR]

Per shape (bf16, B=2, H=16 unless GQA): the whole backward (``flash.attention_backward``:
preprocess, kernels, the Gluon path's dQ zeroing and cast) with the Triton kernels and with the
Gluon kernel; the Gluon kernel alone; SDPA-cuDNN's backward (``autograd.grad`` of its output).
CUDA-graph replays (``triton.testing.do_bench_cudagraph``), ms. Also the gradients of the two gla
paths against each other (relative RMS). Backward FLOPs counted as 2.5x the forward's, as FA2
does: 5 matmuls of 2·Tq·Tk·D each per head, 10·B·H·Tq·Tk·D, halved when causal. (Until session
13 this script counted half that: the TFLOP/s of session 12's table are half the true rates;
its times and ratios stand.)
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
from gla.kernels.attention import flash, hopper_bwd  # noqa: E402

SHAPES = [  # (D, T, H, HK, causal)
    (128, 1024, 16, 16, True), (128, 2048, 16, 16, True), (128, 4096, 16, 16, True),
    (128, 8192, 16, 16, True), (128, 16384, 16, 16, True), (128, 4096, 16, 16, False),
    (128, 4096, 16, 4, True), (64, 2048, 16, 16, True), (64, 4096, 16, 16, True),
    (64, 8192, 16, 16, True), (64, 16384, 16, 16, True), (64, 4096, 16, 16, False),
    (64, 4096, 16, 4, True), (64, 8192, 16, 4, True),
]


def rel(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def bench(fn):
    try:
        return do_bench_cudagraph(fn, rep=200)
    except Exception:  # noqa: BLE001  (a path that cannot be captured: plain events)
        return triton.testing.do_bench(fn, rep=200)


def main(out_dir: str | None, variants=(), head_dims=None) -> str:
    """``variants``: (name, [(module, attribute, value), ...]) timed besides the defaults.
    The gluon column is the Gluon kernel wherever it runs at all (``gluon_backward_pays``, the
    rule this table informs, is bypassed)."""
    lines = [f"# attention backward, Triton vs Gluon\n",
             f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}; bf16, B=2; CUDA-graph replays, ms "
             "(TFLOP/s at 2.5x the forward's FLOPs)\n"]
    print("\n".join(lines), flush=True)
    rule, flash.gluon_backward_pays = flash.gluon_backward_pays, lambda *a: True
    try:
        _sweep(lines, variants, head_dims)
    finally:
        flash.gluon_backward_pays = rule
    return write_text(out_dir, "attention-gluon-bwd.txt", lines)


def _sweep(lines, variants, head_dims) -> None:
    B = 2
    for D, T, H, HK, causal in SHAPES:
        if head_dims and D not in head_dims:
            continue
        g = torch.Generator(device="cuda").manual_seed(T + D)
        mk = lambda h: torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16,  # noqa
                                   generator=g).transpose(1, 2)
        q, k, v, dout = mk(H), mk(HK), mk(HK), mk(H)
        out, lse = flash.attention_forward(q, k, v, causal=causal)
        res = {}
        grads = {}
        for name, gluon in (("triton", False), ("gluon", True)):
            flash.GLUON_BACKWARD = gluon
            grads[name] = flash.attention_backward(dout, q, k, v, out, lse, causal=causal)
            res[name] = bench(lambda: flash.attention_backward(dout, q, k, v, out, lse,
                                                               causal=causal))
        for name, knobs in variants:
            saved = {n: getattr(mod, n) for mod, n, _ in knobs}
            for mod, n, val in knobs:
                setattr(mod, n, val)
            torch.testing.assert_close(  # a variant must compute the same gradients
                flash.attention_backward(dout, q, k, v, out, lse, causal=causal)[1],
                grads["gluon"][1], rtol=2e-2, atol=2e-2)
            res[name] = bench(lambda: flash.attention_backward(dout, q, k, v, out, lse,
                                                               causal=causal))
            for (mod, n, _), val in zip(knobs, saved.values()):
                setattr(mod, n, val)
        flash.GLUON_BACKWARD = True
        delta = torch.empty(B, H, T, device="cuda", dtype=torch.float32)
        delta.copy_((dout.float() * out.float()).sum(-1))
        dq_acc = torch.zeros(B, T, H, D, device="cuda", dtype=torch.float32).transpose(1, 2)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        res["gluon kernel"] = bench(lambda: hopper_bwd.attention_backward(
            q, k, v, dout, lse, delta, dq_acc, dk, dv, D ** -0.5, causal))
        kr = k.repeat_interleave(H // HK, 1).detach().requires_grad_()
        vr = v.repeat_interleave(H // HK, 1).detach().requires_grad_()
        qr = q.detach().requires_grad_()
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
        res["cudnn"] = bench(lambda: torch.autograd.grad(o, (qr, kr, vr), dout,
                                                          retain_graph=True))
        flops = 10 * B * H * T * T * D / (2 if causal else 1)
        errs = " ".join(f"{n} {rel(a, b):.1e}" for n, a, b in
                        zip(("dq", "dk", "dv"), grads["gluon"], grads["triton"]))
        cells = "  ".join(f"{n} {t:.3f} ({flops / t * 1e-9:.0f})" for n, t in res.items())
        line = (f"D={D} T={T} H={H}/{HK} {'causal' if causal else 'full'}: {cells}  | "
                f"gluon/triton {res['triton'] / res['gluon']:.2f}x, gluon/cudnn "
                f"{res['cudnn'] / res['gluon']:.2f}x | gluon vs triton grads: {errs}")
        print(line, flush=True)
        lines.append(line)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--variants", action="store_true",
                   help="also time 3 stages, GQA without the split, and head dim 64 in one "
                        "8-warp partition (A/B of the defaults)")
    p.add_argument("--head-dims", type=int, nargs="*", default=None)
    a = p.parse_args()
    main(a.out, [("gluon 3 stages", [(hopper_bwd, "STAGES", 3)]),
                 ("gluon no split", [(flash, "DKDV_SPLIT", 1)]),
                 ("gluon one partition", [(hopper_bwd, "PER_WARPGROUP_HEAD_DIMS", frozenset())])]
         if a.variants else (), a.head_dims)
