"""Session 11: host cost of the Gluon forward's launch (eager calls), cached vs Triton's JIT path."""
import cProfile, pstats, io
import torch, triton
from triton.testing import do_bench, do_bench_cudagraph
from gla.kernels import launch
from gla.kernels.attention import flash

print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
flash.gluon_pays = lambda *a: True
for B, H, T, D, gate in [(2, 16, 256, 128, False), (2, 16, 1024, 128, True), (1, 8, 512, 128, False),
                         (2, 16, 2048, 64, False), (2, 16, 4096, 128, False)]:
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
    q, k, v = (mk(B, T, H, D).transpose(1, 2) for _ in range(3))
    g = mk(B, T, H, D).transpose(1, 2) if gate else None
    fn = lambda: flash.attention_forward(q, k, v, g, causal=True)
    res = {}
    flash.GLUON = False
    res["triton eager"] = do_bench(fn)
    res["triton graph"] = do_bench_cudagraph(fn)
    flash.GLUON = True
    fn()
    res["gluon cached eager"] = do_bench(fn)
    res["gluon graph"] = do_bench_cudagraph(fn)
    launch.CACHED = False
    res["gluon jit eager"] = do_bench(fn)
    launch.CACHED = True
    torch.cuda.synchronize()
    import time
    t0 = time.perf_counter()
    for _ in range(200):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    print(f"B={B} H={H} T={T} D={D} gate={gate}: " + "  ".join(f"{n} {t*1e3:.1f}us" for n, t in res.items())
          + f"  host per call (cached, 200 calls) {(t1 - t0) / 200 * 1e6:.1f}us", flush=True)
launch.CACHED = False
pr = cProfile.Profile(); pr.enable()
for _ in range(100):
    fn()
pr.disable(); torch.cuda.synchronize()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(18); print(s.getvalue()[:5000])
