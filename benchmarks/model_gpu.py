"""GPU, model level: a Llama-style decoder under backend="gla" vs backend="inductor" vs eager.

    python benchmarks/model_gpu.py [out_dir]   # writes {out_dir}/model-<device>.md

The model is ``examples/tiny_llama.py`` (hand-written attention the way model code writes it:
RoPE, ``repeat_kv`` GQA, an ``arange`` causal mask added as finfo.min, fp32-upcast softmax, a
sigmoid output gate from extra ``q_proj`` columns, SwiGLU) at Llama-1B-like widths: hidden 2048,
16 query / 4 kv heads of 128, FFN 5632, 4 layers, vocabulary 8192; bf16, B=2, T=2048
(``GLA_MODEL_T`` / ``GLA_MODEL_LAYERS`` change them). Side by side in one run: inference
(no grad) and a training step (forward, cross-entropy, backward; grads set to None between
steps), do_bench medians; first call includes compilation; errors are relative to eager bf16.
gla's report of the compiled graph gives what it rewrote. ``gla kernels=pytorch``: the same
rewrites lowered without Triton (SDPA for the attention, the gate and GLU as PyTorch ops that
Inductor fuses), which isolates what gla's Triton kernels add.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from results_io import out_dir_arg, require_cuda, write_table

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

B = 2
T = int(os.environ.get("GLA_MODEL_T", "2048"))
LAYERS = int(os.environ.get("GLA_MODEL_LAYERS", "4"))
DEVICE = "cuda"


def _model(device, dtype):
    from tiny_llama import TinyLlama, TinyLlamaConfig
    torch.manual_seed(0)
    cfg = TinyLlamaConfig(vocab_size=8192, hidden=2048, layers=LAYERS, heads=16, kv_heads=4,
                          ffn=5632, gated_attention=True)
    return TinyLlama(cfg).to(device=device, dtype=dtype), cfg


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(out_dir: str) -> str:
    import triton
    from triton.testing import do_bench

    from gla.report import collect

    bench = lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))  # noqa: E731
    model, cfg = _model(DEVICE, torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=DEVICE)
    x, y = ids[:, :-1], ids[:, 1:]

    def train_step(fn):
        def step():
            logits = fn(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            grads = [p.grad for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            return loss.detach(), grads
        return step

    rows, counts = [], {}
    with torch.no_grad():
        ref = model(x)
    ref_loss, ref_grads = train_step(model)()
    for backend in ("eager", "inductor", "gla", "gla kernels=pytorch"):
        torch._dynamo.reset()
        if backend == "eager":
            fn = model
        elif backend == "gla kernels=pytorch":  # the same rewrites, lowered to SDPA / PyTorch
            fn = torch.compile(model, backend="gla", options={"kernels": "pytorch"})
        else:
            fn = torch.compile(model, backend=backend)
        with torch.no_grad():
            t0 = time.perf_counter()
            with collect() as report:
                out = fn(x)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            if backend == "gla":
                counts["infer"] = report.counts
            infer_ms = bench(lambda: fn(x))
        step = train_step(fn)
        t0 = time.perf_counter()
        with collect() as report:
            loss, grads = step()
        torch.cuda.synchronize()
        first_train = time.perf_counter() - t0
        if backend == "gla":
            counts["train"] = report.counts
        train_ms = bench(step)
        gerr = max(_rel(g, r) for g, r in zip(grads, ref_grads) if r is not None)
        rows.append((backend, infer_ms, first, _rel(out, ref), train_ms, first_train, gerr,
                     abs(loss - ref_loss).item()))
        print(rows[-1], flush=True)
        del fn
    by = {r[0]: r for r in rows}
    eager, ind = by["eager"], by["inductor"]
    name = torch.cuda.get_device_name()
    lines = [f"# Model level on {name}: Llama-style decoder, backend gla vs inductor vs eager", "",
             f"torch {torch.__version__}, triton {triton.__version__}; examples/tiny_llama.py at "
             f"hidden 2048, 16/4 heads of 128, FFN 5632, {LAYERS} layers, vocab 8192, gated "
             f"attention; bf16, B={B}, T={T}; do_bench medians. `vs X` = X's time / this one's.",
             "", f"gla rewrote (inference graph): {counts.get('infer')}; (training graph): "
             f"{counts.get('train')}", "",
             "| backend | inference ms | vs eager | vs inductor | first call s | logits rel err "
             "| train step ms | vs eager | vs inductor | first step s | worst grad rel err "
             "| loss diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b, ims, fs, err, tms, fts, gerr, dl in rows:
        lines.append(f"| {b} | {ims:.2f} | {eager[1] / ims:.2f}x | {ind[1] / ims:.2f}x | "
                     f"{fs:.1f} | {err:.1e} | {tms:.2f} | {eager[4] / tms:.2f}x | "
                     f"{ind[4] / tms:.2f}x | {fts:.1f} | {gerr:.1e} | {dl:.1e} |")
    text = "\n".join(lines) + "\n"
    write_table(out_dir, "model", name, text)
    print(text)
    return text


def main(out_dir: str) -> str:
    require_cuda("model_gpu.py")
    return run(out_dir)


if __name__ == "__main__":
    main(out_dir_arg(sys.argv))
