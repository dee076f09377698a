"""Attention benchmark (bfloat16, one GPU): gla's Triton flash attention side by side with SDPA.

    main(out_dir) -> str      # prints and returns the table, writes {out_dir}/attention-<device>.md

(1) causal attention, B=2, H=16, D in (128, 64), T in 1024..16384 (D=64 stops at 8192), forward
    and forward+backward: gla Triton, SDPA flash backend, SDPA cuDNN backend, SDPA default,
    FlexAttention (torch.compile'd, causal block mask). TFLOP/s with causal FLOPs
    4·B·H·T²·D/2 (forward) and 3.5× that (forward+backward); ratios are speed ratios (their
    time / gla's time, > 1 means gla is faster) against cuDNN and Flex.
(2) the same at T ≤ 2048 with every call replayed from a CUDA graph: GPU time without the host
    (eager calls there are bound by the host's launch and autograd overhead).
(3) causal GQA (16 query / 4 kv heads), forward+backward, T ≤ 8192: the same backends (SDPA and
    Flex with ``enable_gqa``), and gla with one dK/dV program per GQA group (unsplit) beside it.
(4) gated attention (elementwise gate [B, H, T, D]), T ≤ 8192: gla (gate fused in the epilogue)
    vs SDPA default followed by ``* sigmoid(g)``, eager and under torch.compile.

All timings are triton.testing.do_bench medians (warmup 25 ms, rep 100 ms). gla is checked
against an fp32 SDPA (math) reference at one shape before anything is timed.

``python benchmarks/attention.py --sweep`` instead times candidate block configs of every kernel
(forward, dK/dV, dQ) at T=1024 and 4096, D=128 and 64 (causal, bf16), one compact line per
(D, T, kernel), and prints the best per (D, kernel) in ``flash.attention_configs`` form.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from cuda_graphs import capture
from results_io import require_cuda, write_table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, H = 2, 16
# GLA_BENCH_D / GLA_BENCH_T (comma lists) pick other head dims / lengths, e.g. GLA_BENCH_D=256
T_LIST = tuple(int(x) for x in os.environ.get("GLA_BENCH_T", "1024,2048,4096,8192,16384").split(","))
D_LIST = tuple(int(x) for x in os.environ.get("GLA_BENCH_D", "128,64").split(","))
GATED_T_MAX = 8192
GQA_KV = 4  # kv heads of the GQA rows (16 query heads: groups of 4, as in Llama 3 8B)
GRAPH_T_LIST = tuple(t for t in T_LIST if t <= 2048)  # where eager calls are host-bound
DTYPE = torch.bfloat16


def _bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    try:
        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                              return_mode="median"))
    except Exception as e:  # a backend that refuses the shape: report, keep going
        print(f"  ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
        return float("nan")


def _fwd_flops(b, h, t, d, causal=True) -> float:
    f = 4.0 * b * h * t * t * d
    return f / 2 if causal else f


def _inputs(t, d, grad, gate=False, hk=H):
    gen = torch.Generator(device="cuda").manual_seed(t * 1000 + d)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=DTYPE, generator=gen)  # noqa: E731
    q, k, v = mk(B, H, t, d), mk(B, hk, t, d), mk(B, hk, t, d)
    g = mk(B, H, t, d) if gate else None
    ts = [x for x in (q, k, v, g) if x is not None]
    for x in ts:
        x.requires_grad_(grad)
    return q, k, v, g


def _impls():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from gla.kernels.attention import gated_attention

    flex = torch.compile(flex_attention)
    masks = {}

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def flex_fn(q, k, v):
        t = q.shape[2]
        if t not in masks:
            masks[t] = create_block_mask(causal_mod, None, None, t, t, device="cuda")
        return flex(q, k, v, block_mask=masks[t], enable_gqa=q.shape[1] != k.shape[1])

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def sdpa_with(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v)
        return fn

    return {
        "gla": lambda q, k, v: gated_attention(q, k, v, causal=True, impl="triton"),
        "sdpa-flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
        "sdpa-default": sdpa,
        "flex": flex_fn,
    }


@contextlib.contextmanager
def _one_dkdv_program_per_group():
    """gla's backward with every GQA group in one dK/dV program (as before the split). Held
    around the whole timed step: the backward reads the setting when it launches."""
    from gla.kernels.attention import flash

    before, flash.DKDV_SPLIT = flash.DKDV_SPLIT, 1
    try:
        yield
    finally:
        flash.DKDV_SPLIT = before


def _time_impl(fn, q, k, v, backward: bool) -> float:
    if not backward:
        with torch.no_grad():
            return _bench(lambda: fn(q, k, v))
    do = torch.randn_like(q)

    def step():
        fn(q, k, v).backward(do)
    return _bench(step, grad_to_none=[q, k, v])


def _graphed(step):
    """``step`` captured in a CUDA graph; returns the replay, or None where the backend cannot
    be captured."""
    try:
        return capture(step).replay
    except Exception as e:  # report, keep going
        print(f"  (capture failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})",
              flush=True)
        return None


def _time_graphed(fn, q, k, v, backward: bool, also=()) -> float:
    """do_bench of a CUDA-graph replay of ``fn(q, k, v)`` (and its gradients in q, k, v and the
    tensors ``also``)."""
    if backward:
        do = torch.randn_like(q)
        replay = _graphed(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v, *also), do))
    else:
        def fwd():
            with torch.no_grad():
                fn(q, k, v)
        replay = _graphed(fwd)
    return _bench(replay) if replay is not None else float("nan")


def _check(lines) -> None:
    """gla vs an fp32 SDPA (math) reference, forward and backward, at one shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gla.kernels.attention import gated_attention
    from gla.testing import rel_rms_error

    t, d = 1024, 128
    q, k, v, g = _inputs(t, d, True, gate=True)
    do = torch.randn_like(q)
    out = gated_attention(q, k, v, gate=g, causal=True, impl="triton")
    grads = torch.autograd.grad(out, (q, k, v, g), do)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v, g)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(*ref_in[:3], is_causal=True) * torch.sigmoid(ref_in[3])
    ref_grads = torch.autograd.grad(ref, ref_in, do.float())
    errs = [rel_rms_error(out, ref)] + [rel_rms_error(a, e) for a, e in zip(grads, ref_grads)]
    names = ["out", "dq", "dk", "dv", "dgate"]
    lines.append(f"correctness (gated, causal, T={t}, D={d}, bf16 vs fp32 SDPA math): "
                 + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)))
    if not all(e < 2e-2 for e in errs):
        raise RuntimeError("gla attention disagrees with the fp32 reference: " + lines[-1])


def run(out_dir: str) -> str:
    import triton

    torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.time()
    name = torch.cuda.get_device_name()
    lines = [f"# Attention: gla Triton vs SDPA / FlexAttention on {name}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, bf16, B={B}, H={H}, causal. "
             "TFLOP/s use causal FLOPs (4·B·H·T²·D/2 fwd, ×3.5 fwd+bwd); ms are do_bench "
             "medians; `vs X` = X's time / gla's time (> 1: gla faster).", ""]
    _check(lines)
    lines.append("")
    impls = _impls()
    cols = list(impls)
    hdr = ("| D | T | pass | " + " | ".join(f"{c} ms (TFLOP/s)" for c in cols)
           + " | vs cuDNN | vs Flex |")
    lines += ["## Causal attention", "", hdr, "|" + "---|" * (len(cols) + 5)]

    def causal_rows(ts, timer, tag=""):
        for d in D_LIST:
            for t in ts:
                if d == 64 and t > 8192:
                    continue
                for backward in (False, True):
                    q, k, v, _ = _inputs(t, d, backward)
                    flops = _fwd_flops(B, H, t, d) * (3.5 if backward else 1.0)
                    ms = {c: timer(impls[c], q, k, v, backward) for c in cols}
                    cells = [f"{ms[c]:.3f} ({flops / ms[c] * 1e-9:.0f})" if math.isfinite(ms[c])
                             else "n/a" for c in cols]
                    ratio = lambda c: ms[c] / ms["gla"]  # noqa: E731
                    row = (f"| {d} | {t} | {'fwd+bwd' if backward else 'fwd'}{tag} | "
                           + " | ".join(cells)
                           + f" | {ratio('sdpa-cudnn'):.2f} | {ratio('flex'):.2f} |")
                    lines.append(row)
                    print(row, flush=True)
                    del q, k, v

    causal_rows(T_LIST, _time_impl)
    lines += ["", "## Causal attention, host-bound lengths, each call replayed from a CUDA graph",
              "", "GPU time without the host: every backend's step (forward, or forward and "
              "`autograd.grad`) captured once and replayed.", "", hdr,
              "|" + "---|" * (len(cols) + 5)]
    causal_rows(GRAPH_T_LIST, _time_graphed, " (graph)")

    # GQA, as in most current decoders: the dK/dV kernel's grid has B·Hkv·(T/64) programs, few
    # at these lengths, so the group is split over programs; "gla one program per group" is the
    # unsplit backward, same run (the split does not change the forward).
    gqa_cols = ["gla", "gla one program per group", "sdpa-flash", "sdpa-cudnn", "flex"]

    def gqa_time(c, q, k, v):
        if c != "gla one program per group":
            return _time_impl(impls[c], q, k, v, True)
        with _one_dkdv_program_per_group():
            return _time_impl(impls["gla"], q, k, v, True)
    lines += ["", f"## Causal GQA attention ({H} query / {GQA_KV} kv heads), forward+backward", "",
              "| D | T | " + " | ".join(f"{c} ms (TFLOP/s)" for c in gqa_cols)
              + " | vs unsplit | vs cuDNN | vs Flex |", "|" + "---|" * (len(gqa_cols) + 5)]
    for d in D_LIST:
        for t in (x for x in T_LIST if x <= 8192):
            q, k, v, _ = _inputs(t, d, True, hk=GQA_KV)
            flops = _fwd_flops(B, H, t, d) * 3.5
            ms = {c: gqa_time(c, q, k, v) for c in gqa_cols}
            cells = [f"{ms[c]:.3f} ({flops / ms[c] * 1e-9:.0f})" if math.isfinite(ms[c])
                     else "n/a" for c in gqa_cols]
            ratio = lambda c: ms[c] / ms["gla"]  # noqa: E731
            row = (f"| {d} | {t} | " + " | ".join(cells)
                   + f" | {ratio('gla one program per group'):.2f} | {ratio('sdpa-cudnn'):.2f} | "
                   f"{ratio('flex'):.2f} |")
            lines.append(row)
            print(row, flush=True)
            del q, k, v
    lines += ["", "## Gated attention (elementwise gate [B, H, T, D])", "",
              "| D | T | pass | gla ms (TFLOP/s) | SDPA + sigmoid eager ms | SDPA + sigmoid "
              "compiled ms | vs eager | vs compiled |", "|---|---|---|---|---|---|---|---|"]

    def sdpa_gated(q, k, v, g):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * torch.sigmoid(g)

    from gla.kernels.attention import gated_attention
    gated = {
        "gla": lambda q, k, v, g: gated_attention(q, k, v, gate=g, causal=True, impl="triton"),
        "eager": sdpa_gated,
        "compiled": torch.compile(sdpa_gated),
    }
    for d in D_LIST:
        for t in T_LIST:
            if t > GATED_T_MAX:
                continue
            for backward in (False, True):
                q, k, v, g = _inputs(t, d, backward, gate=True)
                flops = _fwd_flops(B, H, t, d) * (3.5 if backward else 1.0)
                ms = {}
                for c, fn in gated.items():
                    if backward:
                        do = torch.randn_like(q)
                        ms[c] = _bench(lambda fn=fn: fn(q, k, v, g).backward(do),
                                       grad_to_none=[q, k, v, g])
                    else:
                        with torch.no_grad():
                            ms[c] = _bench(lambda fn=fn: fn(q, k, v, g))
                rows = [("", ms)]
                if t in GRAPH_T_LIST:  # and replayed from CUDA graphs (GPU time only)
                    three = lambda fn: lambda q, k, v: fn(q, k, v, g)  # noqa: E731
                    rows.append((" (graph)", {c: _time_graphed(three(fn), q, k, v, backward,
                                                               also=(g,) if backward else ())
                                              for c, fn in gated.items()}))
                for tag, m in rows:
                    row = (f"| {d} | {t} | {'fwd+bwd' if backward else 'fwd'}{tag} | "
                           f"{m['gla']:.3f} ({flops / m['gla'] * 1e-9:.0f}) | {m['eager']:.3f} | "
                           f"{m['compiled']:.3f} | {m['eager'] / m['gla']:.2f} | "
                           f"{m['compiled'] / m['gla']:.2f} |")
                    lines.append(row)
                    print(row, flush=True)
                del q, k, v, g
    lines += ["", f"total benchmark time {time.time() - t_start:.0f} s"]
    text = "\n".join(lines) + "\n"
    write_table(out_dir, "attention", name, text)
    print(text)
    return text


SWEEP_CANDS = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
            (128, 32, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4),
            (64, 128, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 128, 8, 4)],
    "dkdv": [(32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2), (64, 128, 8, 2),
             (32, 128, 4, 2), (32, 64, 4, 3), (32, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2),
             (32, 64, 4, 4), (32, 64, 4, 2), (16, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3),
             (32, 32, 4, 3), (64, 64, 4, 2)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
           (64, 128, 8, 2), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 4), (64, 64, 4, 2),
           (128, 32, 8, 4), (64, 32, 4, 4), (32, 64, 4, 3)],
}


# Head dim 256 (Gemma, Qwen3-Next): the tiles above mostly run out of shared memory or registers.
SWEEP_CANDS_D256 = {
    "fwd": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3),
            (128, 32, 8, 3), (64, 64, 8, 2)],
    "dkdv": [(16, 32, 8, 2), (32, 64, 8, 2), (16, 64, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2),
             (32, 64, 4, 2), (16, 64, 4, 2)],
    "dq": [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2),
           (32, 32, 4, 2), (64, 64, 4, 2)],
}


def sweep(ts=(1024, 4096), ds=D_LIST, kernels=None) -> str:
    """Time candidate block configs of each kernel (causal, bf16, D in D_LIST, T in ``ts``) and
    print one compact line per (D, T, kernel): configs fastest first, ``*`` = current default.
    Ends with the best config per (D, kernel) summed over ``ts``, in attention_configs form."""
    require_cuda("attention.py")
    from gla.kernels.attention import flash

    lines, best = [], {}
    fmt = lambda c: f"{c[0]}x{c[1]}w{c[2]}s{c[3]}"  # noqa: E731
    for d in ds:
        totals: dict[tuple, float] = {}
        for t in ts:
            q, k, v, _ = _inputs(t, d, False)
            base = flash.attention_configs(d, d, DTYPE, True, t, interpret=False,
                                           batch_heads=B * H, device=q.device)
            scale = 1 / math.sqrt(d)
            o, lse = flash.attention_forward(q, k, v, None, None, None, scale, True, 0)
            do = torch.randn_like(o)
            fwd_flops = _fwd_flops(B, H, t, d)
            for kern, lst in (SWEEP_CANDS_D256 if d > 128 else SWEEP_CANDS).items():
                if kernels and kern not in kernels:
                    continue
                cur = base[kern]
                cur_t = (cur["BLOCK_M"], cur["BLOCK_N"], cur["num_warps"], cur["num_stages"])
                res = []
                for cand in ([cur_t] + [c for c in lst if c != cur_t]):
                    cfg = dict(base)
                    cfg[kern] = dict(BLOCK_M=cand[0], BLOCK_N=cand[1], num_warps=cand[2],
                                     num_stages=cand[3])
                    if kern == "fwd":
                        fn = lambda cfg=cfg: flash.attention_forward(  # noqa: E731
                            q, k, v, None, None, None, scale, True, 0, config=cfg)
                        flops = fwd_flops
                    else:
                        fn = lambda cfg=cfg: flash.attention_backward(  # noqa: E731
                            do, q, k, v, o, lse, None, None, None, scale, True, 0,
                            config=cfg)
                        flops = 2.5 * fwd_flops  # (the whole backward: pre + dkdv + dq)
                    ms = _bench(fn)
                    res.append((ms, cand))
                    totals[(kern, cand)] = totals.get((kern, cand), 0.0) + ms
                res.sort(key=lambda r: (not math.isfinite(r[0]), r[0]))
                what = "fwd" if kern == "fwd" else f"bwd[{kern}]"
                line = (f"D={d:3d} T={t:5d} {what:10s} " + "  ".join(
                    f"{fmt(c)}{'*' if c == cur_t else ''} {ms:.3f}" for ms, c in res)
                    + f"   (best {flops / res[0][0] * 1e-9:.0f} TFLOP/s)")
                print(line, flush=True)
                lines.append(line)
            del q, k, v, o, lse, do
        for kern in SWEEP_CANDS:
            cands = [(ms, c) for (kk, c), ms in totals.items() if kk == kern and math.isfinite(ms)]
            if cands:
                best[(d, kern)] = min(cands)
    lines.append(f"best over T={ts} (summed ms):")
    for (d, kern), (ms, c) in sorted(best.items()):
        lines.append(f"  D={d} {kern} = dict(BLOCK_M={c[0]}, BLOCK_N={c[1]}, num_warps={c[2]}, "
                     f"num_stages={c[3]})  # {ms:.3f} ms; GLA_ATTN_CONFIG='{kern}@{d}="
                     f"{c[0]},{c[1]},{c[2]},{c[3]}'")
    print("\n".join(lines[-len(best) - 1:]), flush=True)
    return "\n".join(lines)


def main(out_dir: str) -> str:
    require_cuda("attention.py")
    return run(out_dir)


if __name__ == "__main__":
    if "--sweep" in sys.argv:  # [--d 128,64] [--t 1024,4096] [--kernels fwd,dq,dkdv]
        def _opt(flag, default):
            if flag not in sys.argv:
                return default
            return tuple(sys.argv[sys.argv.index(flag) + 1].split(","))
        sweep(ts=tuple(map(int, _opt("--t", (1024, 4096)))),
              ds=tuple(map(int, _opt("--d", D_LIST))), kernels=_opt("--kernels", None))
    else:
        args = [a for a in sys.argv[1:] if not a.startswith("--")]
        main(args[0] if args else os.path.join(os.path.dirname(__file__), "results"))
