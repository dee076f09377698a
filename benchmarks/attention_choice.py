"""GPU: does ``kernels="auto"`` pick the faster attention kernel inside a compiled graph?

    python benchmarks/attention_choice.py [out_dir]   # writes {out_dir}/attention-choice-<device>.md

For each case (causal, bf16, B=2, MHA 16/16 and GQA 16/4 heads, D=64/128, with and without an
elementwise sigmoid output gate, T=2k/8k) the same function — SDPA (``enable_gqa``), then the
gate — is compiled twice with ``backend="gla"``: ``kernels="triton"`` (gla's fused kernel, the
gate in its epilogue) and ``kernels="pytorch"`` (SDPA, whichever kernel PyTorch picks, and the
gate as PyTorch ops that Inductor fuses). Both are timed in the same run, forward (no grad) and
forward+backward (``autograd.grad`` of q, k, v, g), do_bench medians. ``auto`` is what the
lowering's rule (``gla.lowering.attention.choose_impl``) picks for those tensors as Dynamo sees
them (without grad for the forward row, requiring grad for forward+backward); ``auto / best`` is
the best variant's time over auto's (1.00 = auto picked the faster one).

q, k, v and the gate are ``transpose(1, 2)`` views of [B, T, H, D] tensors, the layout a
model's projections give.
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

B = 2
CASES = [(d, h, hkv, gated, t) for d in (128, 64) for (h, hkv) in ((16, 16), (16, 4))
         for gated in (False, True) for t in (2048, 8192)]


def _fn(gated: bool, gqa: bool):
    def attention(q, k, v, g):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return o * torch.sigmoid(g) if gated else o
    return attention


def _inputs(d, h, hkv, t, grad):
    def bthd(heads):
        x = torch.randn(B, t, heads, d, device="cuda", dtype=torch.bfloat16)
        return x.transpose(1, 2).requires_grad_(grad)
    return [bthd(h), bthd(hkv), bthd(hkv), bthd(h)]


def run(out_dir: str) -> str:
    import triton
    from triton.testing import do_bench

    from torch._subclasses.fake_tensor import FakeTensorMode

    from gla.config import Config
    from gla.kernels.attention import sdpa_backend
    from gla.lowering.attention import choose_impl
    from gla.report import collect

    bench = lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))  # noqa: E731
    t_start = time.perf_counter()
    rows = []
    for d, h, hkv, gated, t in CASES:
        torch.manual_seed(0)
        args = _inputs(d, h, hkv, t, grad=True)
        dout = torch.randn_like(args[0])
        backend = sdpa_backend(*args[:3], causal=True, enable_gqa=h != hkv)
        picks = {}
        for name, inputs in (("fwd", [a.detach() for a in args[:3]]), ("fwd+bwd", args[:3])):
            with FakeTensorMode() as mode:  # what the lowering sees under Dynamo (grad or not)
                impl = choose_impl(Config(), *[mode.from_tensor(a) for a in inputs], causal=True)
            picks[name] = {"sdpa": "pytorch", "triton": "triton"}[impl]
        fn = _fn(gated, h != hkv)
        times = {}
        for kernels in ("triton", "pytorch"):
            torch._dynamo.reset()
            compiled = torch.compile(fn, backend="gla", options={"kernels": kernels}, dynamic=False)
            with collect() as report:
                compiled(*args)
            assert report.counts.get("gated_attention" if gated else "attention") == 1, str(report)
            with torch.no_grad():
                fwd = bench(lambda: compiled(*args))
            wrt = args if gated else args[:3]
            both = bench(lambda: torch.autograd.grad(compiled(*args), wrt, dout))
            times[kernels] = (fwd, both)
        for i, name in enumerate(("fwd", "fwd+bwd")):
            tri, sd = times["triton"][i], times["pytorch"][i]
            best = min(tri, sd)
            auto = picks[name]
            rows.append((d, f"{h}/{hkv}", "yes" if gated else "no", t, name, backend, tri, sd, auto,
                         best / times[auto][i]))
            print(rows[-1], flush=True)
    hits = sum(r[-1] >= 0.995 for r in rows)
    worst = min(r[-1] for r in rows)
    name = torch.cuda.get_device_name()
    lines = [f"# Attention kernel choice inside compiled graphs on {name}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, bf16, B={B}, causal; "
             "`backend=\"gla\"` with kernels=\"triton\" vs kernels=\"pytorch\" (SDPA + the gate fused by "
             "Inductor), do_bench medians in ms; `auto` = what the lowering picks; `auto / best` = "
             "the faster variant's time over auto's.", "",
             f"auto picked the faster variant (within 0.5%) in {hits} of {len(rows)} rows; its worst "
             f"row is {worst:.2f} of the best.", "",
             "| D | heads q/kv | gate | T | pass | SDPA runs | triton ms | pytorch ms | auto | auto / best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d, heads, gated, t, p, backend, tri, sd, auto, ratio in rows:
        lines.append(f"| {d} | {heads} | {gated} | {t} | {p} | {backend} | {tri:.3f} | {sd:.3f} | "
                     f"{auto} | {ratio:.2f} |")
    lines += ["", f"total benchmark time {time.perf_counter() - t_start:.0f} s"]
    text = "\n".join(lines) + "\n"
    write_table(out_dir, "attention-choice", name, text)
    return text


def main(out_dir: str) -> str:
    require_cuda("attention_choice.py")
    return run(out_dir)


if __name__ == "__main__":
    print(main(out_dir_arg(sys.argv)))
