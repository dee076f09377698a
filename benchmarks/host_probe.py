"""Host-time probe (session 4): where a gla attention fwd+bwd step spends its host time.

    OUT=dir python benchmarks/host_probe.py      # from the repository root; writes $OUT/probe2.md

One-off investigation kept with its output (results/host-probe-nvidia-h200.md): launcher costs
with and without the cached launcher, the same with the kernels stubbed out (Python only), a
do-nothing autograd.Function with our signature, the host timeline of one step (when each launch
is entered), Flex/SDPA host time, and do_bench of attention / GLA calls both ways.
B=2 H=16 T=1024 D=128 bf16 causal unless a row says otherwise."""
import os, sys, time, statistics
import torch
sys.path.insert(0, os.getcwd())
from gla.kernels import launch
from gla.kernels.attention import flash, gated_attention
from gla.kernels.attention.op import _TritonAttention

B, H, T, D = 2, 16, 1024, 128
N = 300
OUT = os.environ.get("OUT", "/tmp/out")
lines = []
def say(s):
    print(s); lines.append(s)

def timeit(fn, n=N):
    for _ in range(20): fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    t1 = time.perf_counter(); torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / n

mk = lambda: torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
q, k, v = mk(), mk(), mk()
do = torch.randn_like(q)
qd, kd, vd = q.detach(), k.detach(), v.detach()
o, lse, _ = flash.attention_forward(qd, kd, vd, causal=True)

def uncached(fn):
    def f():
        launch.CACHED = False
        try: fn()
        finally: launch.CACHED = True
    return f

def step():
    gated_attention(q, k, v, causal=True).backward(do)
def step_clear():
    q.grad = k.grad = v.grad = None
    gated_attention(q, k, v, causal=True).backward(do)
def step_grad():
    torch.autograd.grad(gated_attention(q, k, v, causal=True), (q, k, v), do)
def step_apply():
    torch.autograd.grad(_TritonAttention.apply(q, k, v, None, None, None, 0.088, True, 0), (q, k, v), do)
fwd = lambda: flash.attention_forward(qd, kd, vd, None, None, None, 0.088, True, 0)
bwd = lambda: flash.attention_backward(do, qd, kd, vd, o, lse, None, None, None, None, 0.088, True, 0)

class Nop9(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, bias, km, scale, causal, window):
        ctx.save_for_backward(q, k, v, q, q, gate, bias, km)
        ctx.args = (scale, causal, window)
        ctx.set_materialize_grads(False)
        return torch.empty_like(q)
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, o, lse, gate, bias, km = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None, None, None, None, None
def nop9():
    torch.autograd.grad(Nop9.apply(q, k, v, None, None, None, 0.088, True, 0), (q, k, v), do)

rows = [("attention_forward (1 launch)", fwd), ("attention_forward, Triton path", uncached(fwd)),
        ("attention_backward (3 launches)", bwd), ("attention_backward, Triton path", uncached(bwd)),
        ("step .backward (grads accumulate)", step), ("step .backward, Triton path", uncached(step)),
        ("step .backward, grads cleared", step_clear), ("step autograd.grad", step_grad),
        ("step autograd.grad via _TritonAttention.apply", step_apply),
        ("Nop9 autograd.Function (same shape as ours), autograd.grad", nop9)]
say("| call | µs (issue, no sync) |\n|---|---|")
for name, fn in rows:
    say(f"| {name} | {timeit(fn):.1f} |")

# Python-only cost: kernels stubbed out
class _Stub:
    def __getitem__(self, grid): return lambda *a, **k: None
saved = {n: getattr(flash, n) for n in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")}
for n in saved: setattr(flash, n, _Stub())
say(f"| attention_forward, kernels stubbed (Python only) | {timeit(fwd):.1f} |")
say(f"| attention_backward, kernels stubbed (Python only) | {timeit(bwd):.1f} |")
for n, f in saved.items(): setattr(flash, n, f)

# one launch in isolation: the preprocess kernel with fixed args
args = dict()
# host timeline of one step: time of each launch relative to the step start
orig = launch.Launcher.launch
marks = []
def traced(self, grid, a, kw):
    marks.append((getattr(self.fn, "__name__", "kernel"), time.perf_counter()))
    return orig(self, grid, a, kw)
launch.Launcher.launch = traced
tl = {}
for i in range(200):
    marks.clear()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step_grad()
    t1 = time.perf_counter()
    if i >= 50:
        for n, t in marks: tl.setdefault(n, []).append(1e6 * (t - t0))
        tl.setdefault("end", []).append(1e6 * (t1 - t0))
launch.Launcher.launch = orig
say("\nhost timeline of one autograd.grad step (median µs after its start, launch entered):")
for n, ts in tl.items():
    say(f"- {n}: {statistics.median(ts):.1f}")

# Flex reference host cost
try:
    from torch.nn.attention.flex_attention import flex_attention, create_block_mask
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cuda")
    flex = torch.compile(flex_attention)
    def flex_step():
        torch.autograd.grad(flex(q, k, v, block_mask=bm), (q, k, v), do)
    say(f"| flex compiled, autograd.grad | {timeit(flex_step):.1f} |")
    def sdpa_step():
        torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do)
    say(f"| sdpa, autograd.grad | {timeit(sdpa_step):.1f} |")
except Exception as e:
    say(f"flex failed: {e!r}")
open(os.path.join(OUT, "probe2.md"), "w").write("\n".join(lines) + "\n")

# --- same-run effect of the cached launcher on do_bench figures (what the tables report)
from triton.testing import do_bench
import torch.nn.functional as F
from gla.kernels.linear_attention import chunk_gla, fused_recurrent_gla
def bench(fn, grads=None):
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")
say("\n| do_bench ms | cached launcher | Triton's launch path | ratio |\n|---|---|---|---|")
for t in (1024, 2048):
    qq, kk, vv = (torch.randn(B, H, t, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dd = torch.randn_like(qq)
    st = lambda: gated_attention(qq, kk, vv, causal=True).backward(dd)
    a, b = bench(st, [qq, kk, vv]), bench(uncached(st), [qq, kk, vv])
    say(f"| attention fwd+bwd D=128 T={t} | {a:.3f} | {b:.3f} | {b/a:.2f} |")
    with torch.no_grad():
        f = lambda: gated_attention(qq, kk, vv, causal=True)
        a, b = bench(f), bench(uncached(f))
    say(f"| attention fwd D=128 T={t} | {a:.3f} | {b:.3f} | {b/a:.2f} |")
    del qq, kk, vv, dd
for t in (1024, 2048):
    mkg = lambda: torch.randn(2, t, 16, 128, device="cuda", dtype=torch.bfloat16)
    gq, gk, gv = mkg(), mkg(), mkg()
    gg = (F.logsigmoid(mkg().float()) / 16).to(torch.bfloat16)
    leaves = [x.clone().requires_grad_() for x in (gq, gk, gv, gg)]
    do_ = torch.randn_like(gq)
    def gf():
        with torch.no_grad(): chunk_gla(gq, gk, gv, gg, impl="triton")
    def gfb():
        o, _ = chunk_gla(*leaves, impl="triton"); o.backward(do_)
    for name, fn, gr in (("chunk_gla fwd", gf, None), ("chunk_gla fwd+bwd", gfb, leaves)):
        a, b = bench(fn, gr), bench(uncached(fn), gr)
        say(f"| {name} B=2 H=16 K=V=128 T={t} | {a:.3f} | {b:.3f} | {b/a:.2f} |")
h0 = torch.randn(2, 16, 128, 128, device="cuda", dtype=torch.float32)
x1 = [torch.randn(2, 1, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
g1 = (F.logsigmoid(torch.randn(2, 1, 16, 128, device="cuda")) / 16).to(torch.bfloat16)
def dec():
    with torch.no_grad():
        fused_recurrent_gla(*x1, g1, initial_state=h0, output_final_state=True, impl="triton")
a, b = bench(dec), bench(uncached(dec))
say(f"| fused_recurrent_gla decode step (host-bound) | {a:.4f} | {b:.4f} | {b/a:.2f} |")
a, b = timeit(dec), timeit(uncached(dec))
say(f"| decode step, host µs per call | {a:.1f} | {b:.1f} | {b/a:.2f} |")
open(os.path.join(OUT, "probe2.md"), "w").write("\n".join(lines) + "\n")
