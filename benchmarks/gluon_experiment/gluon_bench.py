"""Session 11 experiment: the Gluon FA3-style forward against gla's Triton forward and cuDNN.

python benchmarks/gluon_experiment/gluon_bench.py check   # correctness, every variant, small shapes
python benchmarks/gluon_experiment/gluon_bench.py bench   # timing, CUDA-graph replays
"""
import sys
import math
import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph
from torch.nn.attention import sdpa_kernel, SDPBackend

sys.path.insert(0, "benchmarks/gluon_experiment")
import gluon_fwd  # noqa: E402
from gla.kernels.attention import flash  # noqa: E402

VARIANTS = {
    128: [(128, 2, True), (128, 2, False), (64, 3, True), (128, 3, True), (64, 4, True)],
    64: [(128, 2, True), (128, 3, True), (64, 3, True), (128, 2, False), (64, 4, True)],
}


def rel_rms(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def inputs(B, H, HK, T, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, HK, T, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, HK, T, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def check():
    torch.backends.cuda.matmul.allow_tf32 = False
    for D in (128, 64):
        for (B, H, HK, T) in [(1, 2, 2, 128), (2, 4, 1, 384), (1, 3, 3, 1024)]:
            q, k, v = inputs(B, H, HK, T, D)
            kr = k.repeat_interleave(H // HK, 1).float()
            vr = v.repeat_interleave(H // HK, 1).float()
            ref = F.scaled_dot_product_attention(q.float(), kr, vr, is_causal=True)
            s = (q.float() @ kr.transpose(-1, -2)) / math.sqrt(D)
            s = s.masked_fill(torch.ones(T, T, device="cuda", dtype=torch.bool).triu(1), -float("inf"))
            lse_ref = torch.logsumexp(s, -1) / math.log(2)
            o_tri, lse_tri = flash.attention_forward(q, k, v, causal=True)
            for bn, st, pp in VARIANTS[D]:
                out, lse = gluon_fwd.attention_fwd(q, k, v, causal=True, BLOCK_N=bn, STAGES=st,
                                                   PINGPONG=pp)
                torch.cuda.synchronize()
                print(f"check D={D} B={B} H={H}/{HK} T={T} bn={bn} st={st} pp={pp}: "
                      f"out {rel_rms(out, ref):.2e} (triton {rel_rms(o_tri, ref):.2e}) "
                      f"lse max|d| {(lse - lse_ref).abs().max().item():.2e}", flush=True)


def bench():
    B, H = 2, 16
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("causal bf16 B=2 H=16, forward only, CUDA-graph replays (do_bench_cudagraph), ms; "
          "TFLOP/s = 2*B*H*T*T*D / t")
    for D in (128, 64):
        for T in (1024, 2048, 4096, 8192, 16384):
            q, k, v = inputs(B, H, H, T, D)
            flops = 2 * B * H * T * T * D

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            res = {}
            res["cudnn"] = do_bench_cudagraph(cudnn)
            res["gla-triton"] = do_bench_cudagraph(lambda: flash.attention_forward(q, k, v, causal=True))
            for bn, st, pp in VARIANTS[D]:
                name = f"gluon bn{bn} st{st} {'pp' if pp else 'nopp'}"
                res[name] = do_bench_cudagraph(lambda: gluon_fwd.attention_fwd(
                    q, k, v, causal=True, BLOCK_N=bn, STAGES=st, PINGPONG=pp))
            base = res["cudnn"]
            cells = "  ".join(f"{n} {t:.3f} ({flops / t * 1e-9:.0f}, {base / t:.2f}x)"
                              for n, t in res.items())
            print(f"D={D} T={T}: {cells}", flush=True)


if __name__ == "__main__":
    {"check": check, "bench": bench}[sys.argv[1]]()
