"""Where the time of one gla attention call goes (GPU only): host overhead vs kernels.

    main(out_dir) -> str   # prints a compact table, writes {out_dir}/attention-profile-<device>.md
    python benchmarks/attention_profile.py [OUT_DIR] [--op]    # --op: force the torch.library ops

For T in (1024, 2048, 4096), D in (64, 128), bf16, B=2, H=16, causal, ungated and gated
(elementwise gate), forward (no grad) and forward+backward:

* ``wall``: host wall time per call, synchronized only once after N back-to-back calls, so it is
  the steady-state time per call when the host and GPU overlap (what do_bench sees when the host
  is the bottleneck); ``cpu``: host time to *issue* one call (perf_counter around the call, no
  sync), i.e. the Python + launch overhead;
* ``gpu``: summed device time of the call's kernels (torch.profiler, CUDA activity), with the
  number of kernel launches per call; ``gap`` = wall − gpu (idle GPU time per call);
* ``graph``: time per call when the same call is replayed from a CUDA graph (no host work: the
  floor the kernels alone can reach);
* ``first``: the first call at a new shape in this process (Triton JIT compile or cache load).

Per-kernel GPU time and counts go to the markdown file. Runtime about a minute.
"""
from __future__ import annotations

import os
import re
import sys
import time

import torch
from cuda_graphs import capture
from results_io import write_table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, H = 2, 16
T_LIST = (1024, 2048, 4096)
D_LIST = (64, 128)
DTYPE = torch.bfloat16
N_PROF = 20


def _inputs(t, d, gated, grad):
    gen = torch.Generator(device="cuda").manual_seed(t + d)
    mk = lambda: torch.randn(B, H, t, d, device="cuda", dtype=DTYPE,  # noqa: E731
                             generator=gen).requires_grad_(grad)
    q, k, v = mk(), mk(), mk()
    g = mk() if gated else None
    return q, k, v, g


def _step_fn(q, k, v, g, backward):
    from gla.kernels.attention import gated_attention

    leaves = [x for x in (q, k, v, g) if x is not None]
    if not backward:
        def fwd():
            with torch.no_grad():
                return gated_attention(q, k, v, gate=g, causal=True, impl="triton")
        return fwd
    do = torch.randn(B, H, q.shape[2], v.shape[3], device="cuda", dtype=DTYPE)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        out = gated_attention(q, k, v, gate=g, causal=True, impl="triton")
        out.backward(do)
    return fwd_bwd


def _time_first(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _time_wall_and_issue(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    issue = []
    t0 = time.perf_counter()
    for _ in range(n):
        a = time.perf_counter()
        fn()
        issue.append(time.perf_counter() - a)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e3
    issue.sort()
    return wall, issue[len(issue) // 2] * 1e3


def _profile(fn):
    """(gpu ms per call, launches per call, {kernel: (ms per call, count per call)})."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(N_PROF):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        dev = getattr(e, "device_type", None)
        if dev is None or "CUDA" not in str(dev):
            continue
        name = e.name
        us = e.time_range.elapsed_us()  # a device event: its own duration
        k = kernels.setdefault(name, [0.0, 0])
        k[0] += us / 1e3
        k[1] += 1
    per = {n: (ms / N_PROF, c / N_PROF) for n, (ms, c) in kernels.items()}
    gpu = sum(ms for ms, _ in per.values())
    launches = sum(c for _, c in per.values())
    return gpu, launches, per


def _time_graph(fn, n=50) -> float:
    """Per-call time when `fn` is captured once and replayed (nan if it cannot be captured)."""
    try:
        graph = capture(fn)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n
    except Exception as e:  # report, keep going
        print(f"  (cuda graph: {type(e).__name__}: {str(e).splitlines()[0][:100]})", flush=True)
        return float("nan")


def _short(name: str) -> str:
    m = re.search(r"(_attn_\w+|_attn\w*|[A-Za-z_]*memset\w*|[A-Za-z_]*copy\w*|\w+Kernel\w*)", name)
    return (m.group(1) if m else name)[:40]


def run(out_dir: str) -> str:
    import triton

    t_start = time.time()
    name = torch.cuda.get_device_name()
    path = "torch.library ops (GLA_EAGER_OP=1)" if os.environ.get(
        "GLA_EAGER_OP") == "1" else "eager fast path (autograd.Function)"
    cfg = os.environ.get("GLA_ATTN_CONFIG", "")
    head = [f"# gla attention profile on {name}", "",
            f"torch {torch.__version__}, triton {triton.__version__}, bf16, B={B}, H={H}, causal; "
            f"call path: {path}; GLA_ATTN_CONFIG={cfg or '(default)'}.", "",
            "ms per call. wall: steady-state per call (one sync after 50 calls); issue: host time "
            "to issue one call (median, no sync); gpu: summed kernel time (torch.profiler); "
            "gap = wall − gpu; graph: CUDA-graph replay per call; first: first call at this "
            "shape (JIT).", ""]
    hdr = ("| D | T | gate | pass | wall | issue | gpu | launches | gap | graph | first |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|")
    rows, details = [], []
    print(hdr, flush=True)
    for d in D_LIST:
        for t in T_LIST:
            for gated in (False, True):
                for backward in (False, True):
                    q, k, v, g = _inputs(t, d, gated, backward)
                    fn = _step_fn(q, k, v, g, backward)
                    first = _time_first(fn)
                    wall, issue = _time_wall_and_issue(fn)
                    gpu, launches, per = _profile(fn)
                    graph = _time_graph(fn) if not backward else _time_graph_bwd(q, k, v, g)
                    row = (f"| {d} | {t} | {'yes' if gated else 'no'} | "
                           f"{'fwd+bwd' if backward else 'fwd'} | {wall:.3f} | {issue:.3f} | "
                           f"{gpu:.3f} | {launches:.1f} | {wall - gpu:.3f} | {graph:.3f} | "
                           f"{first:.0f} |")
                    rows.append(row)
                    print(row, flush=True)
                    details.append(f"- D={d} T={t} gate={gated} {'fwd+bwd' if backward else 'fwd'}: "
                                   + ", ".join(f"{_short(n)} {ms * 1e3:.1f} µs ×{c:g}"
                                               for n, (ms, c) in sorted(per.items(),
                                                                        key=lambda x: -x[1][0])))
                    del q, k, v, g, fn
    text = "\n".join(head + [hdr] + rows + ["", "## Kernels per call (GPU µs × count)", ""]
                     + details + ["", f"total {time.time() - t_start:.0f} s"]) + "\n"
    out = write_table(out_dir, "attention-profile", name, text)
    print(f"wrote {out}")
    return text


def _time_graph_bwd(q, k, v, g) -> float:
    """fwd+bwd in a CUDA graph: torch.autograd.grad (no .grad accumulation) on static inputs."""
    from gla.kernels.attention import gated_attention

    leaves = [x for x in (q, k, v, g) if x is not None]
    do = torch.randn(B, H, q.shape[2], v.shape[3], device="cuda", dtype=DTYPE)

    def step():
        out = gated_attention(q, k, v, gate=g, causal=True, impl="triton")
        return torch.autograd.grad(out, leaves, do)
    return _time_graph(step)


def main(out_dir: str) -> str:
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks/attention_profile.py needs a CUDA GPU")
    return run(out_dir)


if __name__ == "__main__":
    if "--op" in sys.argv:
        os.environ["GLA_EAGER_OP"] = "1"
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
