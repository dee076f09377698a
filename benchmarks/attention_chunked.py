"""GPU: Llama 4's chunked attention (causal within aligned chunks) through the kernel's chunk mask,
against the same mask as a dense bias (how gla lowered it before the chunk proof) and SDPA with the
boolean mask (what eager PyTorch runs). Plain causal attention at the same length beside them.

    python benchmarks/run.py attention_chunked   # writes results/attention-chunked-<device>.md

bf16, B=1, 16 query heads over 4 kv heads (GQA 4:1), D=128; forward and forward+backward; GPU time
from CUDA-graph replays (do_bench_cudagraph), two alternating rounds, min. Errors: relative RMS
against fp32 SDPA math with the boolean mask.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_io import out_dir_arg, require_cuda, write_table  # noqa: E402


def main(out_dir: str) -> str:
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench_cudagraph

    from gla.kernels.attention import gated_attention
    from gla.kernels.attention.naive import visible_positions
    from gla.testing import rel_rms_error

    require_cuda("attention_chunked.py")
    name = torch.cuda.get_device_name()
    B, H, HK, D = 1, 16, 4, 128
    lines = [f"# Chunked causal attention on {name}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; bf16, B={B}, {H} query heads "
             f"over {HK} kv heads, D={D}. GPU time of CUDA-graph replays, two alternating rounds, "
             "min. `kernel chunk`: gla's kernel with its chunk mask (blocks outside a row's chunk "
             "skipped); `kernel + bias`: gla's kernel with the mask as a dense [1, 1, T, T] fp32 "
             "bias; `sdpa bool mask`: F.scaled_dot_product_attention with the boolean mask; "
             "`kernel causal`: plain causal attention, no chunks. err: against fp32 SDPA math.", "",
             "| T | chunk | pass | kernel chunk ms | kernel + bias ms | sdpa bool mask ms "
             "| kernel causal ms | vs bias | vs sdpa | err (chunk / bias) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for T, chunk in ((8192, 2048), (16384, 8192), (16384, 2048)):
        mk = lambda h: torch.randn(B, T, h, D, device="cuda",  # noqa: E731
                                   dtype=torch.bfloat16).transpose(1, 2)
        q, k, v, do = mk(H), mk(HK), mk(HK), mk(H)
        vis = visible_positions(T, T, True, 0, q.device, chunk)
        bias = torch.zeros(1, 1, T, T, device="cuda").masked_fill_(~vis, float("-inf"))
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=vis,
                                                 enable_gqa=True)
        runs = {
            "chunk": lambda q, k, v: gated_attention(q, k, v, causal=True, chunk=chunk, impl="triton"),
            "bias": lambda q, k, v: gated_attention(q, k, v, bias=bias, impl="triton"),
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=vis, enable_gqa=True),
            "causal": lambda q, k, v: gated_attention(q, k, v, causal=True, impl="triton"),
        }
        errs = {}
        for n in ("chunk", "bias"):
            with torch.no_grad():
                errs[n] = rel_rms_error(runs[n](q, k, v), ref)
        for grad in (False, True):
            leaves = [x.detach().requires_grad_(grad) for x in (q, k, v)]

            def step(f):
                if not grad:
                    with torch.no_grad():
                        return f(*leaves)
                return torch.autograd.grad(f(*leaves), leaves, do)

            times: dict[str, float] = {}
            for _ in range(2):  # two rounds, alternating
                for n, f in runs.items():
                    t = do_bench_cudagraph(lambda f=f: step(f), rep=100)
                    times[n] = min(times.get(n, t), t)
            c = times["chunk"]
            lines.append(f"| {T} | {chunk} | {'fwd+bwd' if grad else 'fwd'} | {c:.3f} | {times['bias']:.3f} "
                         f"| {times['sdpa']:.3f} | {times['causal']:.3f} | {times['bias'] / c:.2f} "
                         f"| {times['sdpa'] / c:.2f} | {errs['chunk']:.1e} / {errs['bias']:.1e} |")
        del q, k, v, do, bias, vis, ref
        torch.cuda.empty_cache()
    path = write_table(out_dir, "attention-chunked", name, "\n".join(lines) + "\n")
    return "\n".join(lines) + f"\n\nwritten to {path}"


if __name__ == "__main__":
    print(main(out_dir_arg(sys.argv)))
