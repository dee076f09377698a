"""GPU check, one fresh process: transformers' Llama (SDPA attention, benchmarks/model_gpu.py's
widths) — each path's bf16 training gradients against the same model in fp32 with SDPA's math
kernel, same weights and tokens; eager under each SDPA backend, then inductor, gla, gla's kernel.

    python benchmarks/hf_llama_grads.py     # prints one line per path
"""
import copy, sys, time, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
import model_gpu as mg
from torch.nn.attention import SDPBackend, sdpa_kernel
for knob in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, knob): setattr(torch._dynamo.config, knob, 256)
model, vocab = mg.hf_llama()
ref_model = copy.deepcopy(model).float()
ids = torch.randint(0, vocab, (mg.B, mg.T + 1), device="cuda")
x, y = ids[:, :-1], ids[:, 1:]
def grads_of(fn, params):
    loss = F.cross_entropy(fn(x).flatten(0, 1).float(), y.flatten())
    loss.backward()
    g = [p.grad.detach().float().clone() for p in params]
    for p in params: p.grad = None
    return loss.item(), g
with sdpa_kernel([SDPBackend.MATH]):
    ref_loss, ref = grads_of(ref_model, list(ref_model.parameters()))
names = [n for n, _ in model.named_parameters()]
params = list(model.parameters())
def rel(a, b): return ((a - b).norm() / b.norm()).item()
def report(tag, loss, g):
    allr = rel(torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in ref]))
    per = sorted(((rel(a, b), n) for a, b, n in zip(g, ref, names)), reverse=True)[:3]
    print(f"{tag:28s} loss {loss:.5f} (fp32 {ref_loss:.5f})  grads rel err all {allr:.2e}  worst {[(f'{e:.2e}', n) for e, n in per]}", flush=True)
report("eager bf16", *grads_of(model, params))
for be in ("eager-math", "eager-efficient", "eager-cudnn", "eager-flash"):
    b = {"eager-math": SDPBackend.MATH, "eager-efficient": SDPBackend.EFFICIENT_ATTENTION, "eager-cudnn": SDPBackend.CUDNN_ATTENTION, "eager-flash": SDPBackend.FLASH_ATTENTION}[be]
    try:
        with sdpa_kernel([b]):
            report(be + " bf16", *grads_of(model, params))
    except Exception as e:
        print(be, "not runnable:", str(e).splitlines()[0][:120])
for tag, spec in [("inductor", ("inductor", None)), ("gla", ("gla", None)), ("gla kernels=triton", ("gla", {"kernels": "triton"}))]:
    t0 = time.perf_counter()
    fn = torch.compile(model, backend=spec[0], options=spec[1])
    report(tag, *grads_of(fn, params))
    print("   ", round(time.perf_counter() - t0, 1), "s", flush=True)
