"""Quickstart: compile a small gated-attention + SwiGLU model with backend="gla".

Prints gla's report (every rewrite with its verification figures, every near miss), the largest
error against eager, and eager vs compiled timings. Runs on a CPU in about a minute.
"""
import os
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch

import gla
from tiny_llama import TinyLlama, TinyLlamaConfig


def timed(fn, *args, reps=10):
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TinyLlamaConfig()
    model = TinyLlama(cfg).to(device).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device=device)

    with torch.no_grad():
        report = gla.explain(model, ids)
    print(report)
    print()

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="gla")   # resolves through the entry point
    with torch.no_grad():
        ref = model(ids)
        t0 = time.perf_counter()
        out = compiled(ids)
        compile_s = time.perf_counter() - t0
        err = (out - ref).abs().max().item()
        eager_ms = timed(model, ids)
        gla_ms = timed(compiled, ids)
    print(f"sites: {cfg.layers} layers -> counts {report.counts}")
    print(f"max |gla - eager| = {err:.2e}   (first call incl. compile {compile_s:.1f} s)")
    print(f"forward on {device}: eager {eager_ms:.2f} ms, gla {gla_ms:.2f} ms")


if __name__ == "__main__":
    main()
