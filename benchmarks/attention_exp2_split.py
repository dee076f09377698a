"""Forward: 1 in SHARE of the softmax's exponentials on the FMA pipe (polynomial) instead of MUFU.
gla's forward with flash.EXP2_SHARE = 0 / 4 / 2 / 1, cuDNN beside it; two alternating rounds, min.
GPU time from CUDA-graph replays (do_bench_cudagraph)."""
import torch, triton
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench_cudagraph
from gla.kernels.attention import flash

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
B, H = 2, 16


def rel(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def bench(f):
    return do_bench_cudagraph(f, rep=100)


for D, Ts in ((128, (1024, 2048, 4096, 8192, 16384)), (64, (2048, 4096, 8192))):
    for T in Ts:
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                   for _ in range(3))
        g = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        refg = ref * torch.sigmoid(g.float())

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def cudnn_gate():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True) * torch.sigmoid(g)

        def gla(share, gate=None):
            def f():
                flash.EXP2_SHARE = share
                return flash.attention_forward(q, k, v, gate=gate, causal=True)[0]
            return f

        runs = [("cudnn", cudnn, ref), ("cudnn+gate", cudnn_gate, refg)]
        for s in (0, 4, 2, 1):
            runs.append((f"gla share {s}", gla(s), ref))
        for s in (0, 4, 2):
            runs.append((f"gla gated share {s}", gla(s, g), refg))
        rows = {}
        for rnd in range(2):
            for name, f, r in runs:
                o = f()
                t = bench(f)
                rows.setdefault(name, []).append((t, rel(o, r)))
        c = min(t for t, _ in rows["cudnn"])
        cg = min(t for t, _ in rows["cudnn+gate"])
        g0 = min(t for t, _ in rows["gla share 0"])
        gg0 = min(t for t, _ in rows["gla gated share 0"])
        for name, res in rows.items():
            t = min(x for x, _ in res)
            fl = 4 * B * H * T * T * D / 2 / t / 1e9
            base = gg0 if "gated" in name or name == "cudnn+gate" else g0
            vs = cg if "gated" in name or name == "cudnn+gate" else c
            print(f"D={D} T={T} {name:20s} {t*1e3:8.1f} us {fl:5.0f} TF/s  vs cuDNN{'+gate' if vs is cg else ''} "
                  f"{vs/t:.3f}  vs share 0 {base/t:.3f}  err {res[0][1]:.1e}  "
                  f"[{', '.join(f'{x*1e3:.1f}' for x, _ in res)}]", flush=True)
        del q, k, v, g, ref, refg
flash.EXP2_SHARE = 0
