"""Which tiles a window- or chunk-only mask should take: the 'extras' tiles (as for a bias or key
mask) or the plain ones. gla's launchers with config= forced, CUDA-graph replays, 2 rounds, min."""
import torch, triton
from triton.testing import do_bench_cudagraph
from gla.kernels.attention import flash
from gla.testing import rel_rms_error
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
B, H, HK = 1, 16, 4
for D in (128, 64):
    for T, window, chunk in ((8192, 0, 2048), (16384, 0, 8192), (8192, 4096, 0), (16384, 4096, 0)):
        mk = lambda h: torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        q, k, v, do = mk(H), mk(HK), mk(HK), mk(H)
        sc = D ** -0.5
        res = {}
        outs = {}
        for rnd in range(2):
            for extras in (True, False):
                cfg = flash._configs(D, D, q.dtype, True, T, extras, batch_heads=B * H, device=q.device)
                args = (None, None, None, sc, True, window, chunk)
                fwd = lambda: flash.attention_forward(q, k, v, *args, config=cfg)
                o, lse = fwd()
                bwd = lambda: flash.attention_backward(do, q, k, v, o, lse, *args, config=cfg)
                outs[extras] = (o, bwd())
                tf, tb = do_bench_cudagraph(fwd, rep=100), do_bench_cudagraph(bwd, rep=100)
                old = res.get(extras, (1e9, 1e9))
                res[extras] = (min(old[0], tf), min(old[1], tb))
        diff = [rel_rms_error(a, b) for a, b in zip([outs[False][0], *outs[False][1][:3]], [outs[True][0], *outs[True][1][:3]])]
        (ef, eb), (pf, pb) = res[True], res[False]
        print(f"D={D} T={T} window={window} chunk={chunk}: extras tiles fwd {ef*1e3:.1f} us bwd {eb*1e3:.1f} us | "
              f"plain tiles fwd {pf*1e3:.1f} us bwd {pb*1e3:.1f} us | plain/extras speed fwd {ef/pf:.2f}x bwd {eb/pb:.2f}x "
              f"| diff {max(diff):.1e}", flush=True)
        del q, k, v, do
