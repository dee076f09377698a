"""Whole backward (pre + dkdv + dq | pre + dkdv_atomic + convert), causal bf16 B=2 H=16."""
import math, os, sys, time
import torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from triton.testing import do_bench
from gla.kernels.attention import flash
import attention as A
OUT = os.environ.get("OUT", "/tmp/out")
lines = []
def say(s):
    print(s, flush=True); lines.append(s)
fmt = lambda c: f"{c[0]}x{c[1]}w{c[2]}s{c[3]}"
plan = [(128, (1024, 4096, 8192)), (64, (1024, 4096, 8192)), (256, (4096,))]
for d, ts in plan:
    cands = (A.SWEEP_CANDS_D256 if d > 128 else A.SWEEP_CANDS)["dkdv_atomic"]
    for t in ts:
        q, k, v, _ = A._inputs(t, d, False)
        scale = 1 / math.sqrt(d)
        base = flash.attention_configs(d, d, torch.bfloat16, True, t, interpret=False,
                                       batch_heads=32, device=q.device)
        o, lse, _ = flash.attention_forward(q, k, v, None, None, None, scale, True, 0)
        do = torch.randn_like(o)
        bw = lambda cfg, atomic: flash.attention_backward(do, q, k, v, o, lse, None, None, None, None, scale, True, 0, config=cfg, atomic=atomic)
        ref = bw(base, False)
        sep = do_bench(lambda: bw(base, False), warmup=25, rep=100, return_mode="median")
        res = []
        for c in cands:
            cfg = dict(base); cfg["dkdv_atomic"] = dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])
            try:
                got = bw(cfg, True)
                err = max(((a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean()).sqrt().item() for a, b in zip(got[:3], ref[:3]))
                ms = do_bench(lambda: bw(cfg, True), warmup=25, rep=100, return_mode="median")
            except Exception as e:
                ms, err = float("nan"), float("nan"); print("  fail", fmt(c), type(e).__name__, str(e)[:100])
            res.append((ms, c, err))
        res.sort(key=lambda r: (not math.isfinite(r[0]), r[0]))
        flops = 2.5 * A._fwd_flops(2, 16, t, d)
        say(f"D={d} T={t} separate {sep:.3f} ms ({flops/sep*1e-9:.0f} TF/s) | atomic: " + "  ".join(f"{fmt(c)} {ms:.3f}" for ms, c, _ in res) + f" | best {sep/res[0][0]:.2f}x, max rel err vs separate {max(r[2] for r in res if math.isfinite(r[2])):.1e}")
        del q, k, v, o, lse, do
open(os.path.join(OUT, "atomic-sweep.txt"), "w").write("\n".join(lines) + "\n")
