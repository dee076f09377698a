"""What the output gate costs: gla's gated attention against its ungated self, and SDPA's.

    python benchmarks/attention_gate_cost.py [--out DIR]

bf16, B=2, H=16, causal, elementwise gate [B, H, T, D] (a [B, T, H, D] tensor's transposed view,
as models hold it). CUDA-graph replays, ms. Per shape: gla forward and forward+backward with and
without the gate; SDPA (default backend) the same, its gate a separate ``o * sigmoid(g)``; and
the floor of the gate's own traffic, its bytes over this run's copy bandwidth (the forward reads
the gate once; the backward's preprocess reads the gate once more and writes dgate and the
attention's own dO, which an ungated backward does not).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from results_io import write_text
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gla.kernels.attention import gated_attention  # noqa: E402


def _copy_bandwidth() -> float:
    """Bytes per ms of a device-to-device copy of 1 GiB (read + write)."""
    x = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = do_bench_cudagraph(lambda: y.copy_(x), rep=100)
    return 2 * x.numel() * x.element_size() / ms


def _step(fn, args, grad):
    if grad is None:
        return lambda: fn(*args)
    leaves = [a for a in args if a is not None]
    return lambda: torch.autograd.grad(fn(*args), leaves, grad)


def main(out_dir: str | None) -> str:
    bw = _copy_bandwidth()
    lines = [f"# the output gate's cost, gla vs SDPA + sigmoid gate\n",
             f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
             f"{triton.__version__}; bf16, B=2, H=16, causal, elementwise gate; CUDA-graph "
             f"replays, ms; copy bandwidth {bw * 1e-9:.2f} TB/s\n"]
    print("\n".join(lines), flush=True)
    gla = lambda q, k, v, g: gated_attention(q, k, v, gate=g, causal=True)  # noqa: E731
    sdpa = lambda q, k, v, g: (F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa
                               if g is None else
                               F.scaled_dot_product_attention(q, k, v, is_causal=True)
                               * torch.sigmoid(g))
    for d in (128, 64):
        for t in (2048, 4096, 8192, 16384):
            gen = torch.Generator(device="cuda").manual_seed(t + d)
            mk = lambda: torch.randn(2, t, 16, d, device="cuda", dtype=torch.bfloat16,  # noqa
                                     generator=gen).transpose(1, 2).requires_grad_()
            q, k, v, g, dout = mk(), mk(), mk(), mk(), mk().detach()
            gate_bytes = g.numel() * g.element_size()
            floor = {"fwd": gate_bytes / bw, "fwd+bwd": 4 * gate_bytes / bw}
            cells = []
            for name, fn in (("gla", gla), ("sdpa", sdpa)):
                for pass_, grad in (("fwd", None), ("fwd+bwd", dout)):
                    with torch.no_grad() if grad is None else torch.enable_grad():
                        plain = do_bench_cudagraph(_step(fn, (q, k, v, None), grad), rep=100)
                        gated = do_bench_cudagraph(_step(fn, (q, k, v, g), grad), rep=100)
                    cells.append(f"{name} {pass_} {plain:.3f} -> {gated:.3f} "
                                 f"(+{(gated - plain) * 1e3:.0f} us)")
            line = (f"D={d} T={t}: " + "; ".join(cells)
                    + f"; gate traffic floor fwd {floor['fwd'] * 1e3:.0f} us, fwd+bwd "
                      f"{floor['fwd+bwd'] * 1e3:.0f} us")
            print(line, flush=True)
            lines.append(line)
    return write_text(out_dir, "attention-gate-cost.txt", lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    main(p.parse_args().out)
