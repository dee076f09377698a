"""CPU: a transformers Llama with eager (hand-written) attention: backend="gla" vs
backend="inductor" vs eager, side by side in one run. ``main``: inference at T=1024
(cpu-llama-t1024.md); ``GLA_CPU_BENCH=train``: a training step (forward, loss, backward) at
T=512 (cpu-llama-train-t512.md)."""
import os
import platform
import time

import torch


def _time(fn, ids, reps=5):
    fn(ids)
    fn(ids)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(ids)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1e3


def _llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation("eager")
    return model


def train_main(out_dir: str, t: int = 512) -> str:
    """One training step (forward, cross-entropy, backward; grads set to None between steps)."""
    import transformers

    import gla

    model = _llama().train()
    ids = torch.randint(0, 1024, (1, t + 1))

    def step(fn):
        def run(ids):
            logits = fn(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            grads = [p.grad for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            return loss.detach(), grads
        return run

    fwd = lambda ids: model(ids, use_cache=False).logits  # noqa: E731
    ref_loss, ref_grads = step(fwd)(ids)
    report = gla.explain(fwd, ids[:, :-1], options={"inner": "eager"})
    eager_ms = _time(step(fwd), ids, reps=3)
    results = {}
    for backend in ("inductor", "gla"):
        torch._dynamo.reset()
        compiled = torch.compile(fwd, backend=backend)
        t0 = time.perf_counter()
        loss, grads = step(compiled)(ids)
        compile_s = time.perf_counter() - t0
        err = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads) if r is not None)
        results[backend] = (_time(step(compiled), ids, reps=3), compile_s, err, abs(loss - ref_loss).item())
    lines = [f"# CPU: transformers Llama (eager attention), 4 layers, hidden 256, B=1, T={t}, fp32, training step",
             "", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"transformers {transformers.__version__}; forward + cross-entropy + backward; medians of 3 after 2 "
             "warm-ups", "", f"gla rewrote: {report.counts}", "",
             "| backend | ms / step | vs eager | vs inductor | first step (s) | worst grad rel err | loss diff |",
             "|---|---|---|---|---|---|---|",
             f"| eager | {eager_ms:.1f} | 1.00x | {results['inductor'][0] / eager_ms:.2f}x | - | - | - |"]
    for backend, (ms, cs, err, dl) in results.items():
        lines.append(f"| {backend} | {ms:.1f} | {eager_ms / ms:.2f}x | {results['inductor'][0] / ms:.2f}x | "
                     f"{cs:.1f} | {err:.1e} | {dl:.1e} |")
    table = "\n".join(lines)
    with open(os.path.join(out_dir, f"cpu-llama-train-t{t}.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(out_dir: str) -> str:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    if os.environ.get("GLA_CPU_BENCH") == "train":
        return train_main(out_dir)
    import transformers

    import gla

    model = _llama().eval()
    ids = torch.randint(0, 1024, (1, 1024))
    fn = lambda ids: model(ids, use_cache=False).logits
    rows = []
    with torch.no_grad():
        ref = fn(ids)
        report = gla.explain(fn, ids, options={"inner": "eager"})
        eager_ms = _time(fn, ids)
        results = {}
        for backend in ("inductor", "gla"):
            torch._dynamo.reset()
            compiled = torch.compile(fn, backend=backend)
            t0 = time.perf_counter()
            out = compiled(ids)
            compile_s = time.perf_counter() - t0
            err = ((out - ref).norm() / ref.norm()).item()
            results[backend] = (_time(compiled, ids), compile_s, err)
    from torch._inductor import config as inductor_config  # noqa: F401  (versions line)

    lines = [f"# CPU: transformers Llama (eager attention), 4 layers, hidden 256, B=1, T=1024, fp32, inference",
             "", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"transformers {transformers.__version__}; medians of 5 after 2 warm-ups", "",
             f"gla rewrote: {report.counts}", "",
             "| backend | ms / forward | vs eager | vs inductor | first call (s) | rel err vs eager |",
             "|---|---|---|---|---|---|",
             f"| eager | {eager_ms:.1f} | 1.00x | {results['inductor'][0] / eager_ms:.2f}x | - | - |"]
    for backend, (ms, cs, err) in results.items():
        lines.append(f"| {backend} | {ms:.1f} | {eager_ms / ms:.2f}x | {results['inductor'][0] / ms:.2f}x | "
                     f"{cs:.1f} | {err:.1e} |")
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "cpu-llama-t1024.md"), "w") as f:
        f.write(table + "\n")
    return table
