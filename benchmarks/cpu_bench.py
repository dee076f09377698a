"""CPU: a transformers Llama with eager (hand-written) attention, T=1024, inference:
backend="gla" vs backend="inductor" vs eager, side by side in one run."""
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


def main(out_dir: str) -> str:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import transformers

    import gla

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
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
