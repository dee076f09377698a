"""Where an eager attention training step spends its host time, at the lengths where the host
bounds it (T <= 2048), gla against SDPA (+ a separate gate).

    python benchmarks/attention_step_host.py [out_dir]   # writes {out_dir}/attention-step-host-<device>.md

Per case (B=2, H=16, bf16, causal; D and T per row; gated or not): the step as the attention
table times it (``fn(...).backward(do)`` with the gradients set to None first) by do_bench and
by host time (µs per call without a sync, ``host_overhead._time``); the same for SDPA (+ the
sigmoid gate as a separate multiply) and for a do-nothing ``autograd.Function`` of our
signature; the step with ``torch.autograd.set_multithreading_enabled(False)`` (the backward in
the calling thread: what the hand-off to the autograd engine's device thread costs); the host
timeline of one step (median µs after the step's start at which each part is entered and left, the backward on the device thread and in the calling thread);
and a cProfile of the gla step.
"""
from __future__ import annotations

import cProfile
import functools
import io
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from host_overhead import _time
from results_io import out_dir_arg, require_cuda, write_table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, H = 2, 16
CASES = [(128, 1024, False), (128, 1024, True), (128, 2048, False), (128, 2048, True),
         (64, 2048, False), (64, 2048, True)]


class _Nop(torch.autograd.Function):
    """gla's eager autograd.Function signature (7 inputs, 8 saved tensors), doing nothing."""

    @staticmethod
    def forward(ctx, q, k, v, gate, bias, km, plan):
        ctx.save_for_backward(q, k, v, q, q, gate, bias, km)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return torch.empty_like(q)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, _, _, gate, _, _ = ctx.saved_tensors
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                None if gate is None else torch.empty_like(gate), None, None, None)


def _marked(marks: list, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        marks.append((name + " {", time.perf_counter()))
        try:
            return fn(*args, **kwargs)
        finally:
            marks.append((name + " }", time.perf_counter()))
    return wrapper


def _timeline(step, n=200, skip=50) -> list[tuple[str, float]]:
    """Median µs after the step's start at which each instrumented function is entered ``{``
    and left ``}`` (in call order of the last step)."""
    from gla.kernels import launch
    from gla.kernels.attention import flash, hopper, hopper_bwd, op

    marks: list = []
    targets = [(op, "_check_args"), (op, "resolve_impl"), (op, "eager_ok"),
               (flash, "attention_forward"), (flash._ForwardPlan, "__call__"),
               (flash._ForwardPlan, "backward"), (flash._BackwardPlan, "__call__"),
               (flash._GluonBackward, "__call__"), (hopper.BoundGluonLaunch, "__call__"),
               (hopper.GluonLaunch, "__call__"), (hopper._EncodedLaunch, "__call__"),
               (launch.BoundLaunch, "__call__"), (launch.Launcher, "launch")]
    saved = [(obj, name, obj.__dict__[name]) for obj, name in targets]
    fwd, bwd = op._TritonAttention.forward, op._TritonAttention.backward
    for obj, name, fn in saved:
        label = f"{getattr(obj, '__name__', '')}.{name}"
        setattr(obj, name, _marked(marks, label, fn))
    op._TritonAttention.forward = staticmethod(_marked(marks, "Function.forward", fwd))
    op._TritonAttention.backward = staticmethod(_marked(marks, "Function.backward", bwd))
    seen: dict = {}
    order: list = []
    try:
        for i in range(n):
            marks.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            if i >= skip:
                labels = []
                for name, t in marks + [("end", t1)]:
                    k = name
                    while k in labels:  # a function entered twice in one step
                        k += "'"
                    labels.append(k)
                    seen.setdefault(k, []).append(1e6 * (t - t0))
                order = labels
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        op._TritonAttention.forward, op._TritonAttention.backward = fwd, bwd
    return [(k, statistics.median(seen[k])) for k in order]


def _profile(step, n=300, top=28) -> str:
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def _do_bench(fn, grads) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median"))


def _event_loop(step, n=200, flush=True) -> tuple[float, float]:
    """do_bench's timed loop by hand: median GPU ms between events around ``step`` and median
    host µs of the call, with or without the L2 flush before each call."""
    cache = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda")
    for _ in range(20):
        step()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    host = []
    torch.cuda.synchronize()
    for i in range(n):
        if flush:
            cache.zero_()
        starts[i].record()
        t0 = time.perf_counter()
        step()
        host.append(1e6 * (time.perf_counter() - t0))
        ends[i].record()
    torch.cuda.synchronize()
    return (statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)),
            statistics.median(host))


def _handoff_rows(gla_step, sdpa_step, nop_step, single_thread) -> list[str]:
    """Where the hand-off to the autograd device thread costs: the timed loop with and without
    the flush, and with gla's backward launching nothing (its outputs allocated only)."""
    from gla.kernels.attention import flash

    real = flash._ForwardPlan.backward

    def no_kernels(self, dout, q, k, v, out, lse, gate=None, *args):
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                None if gate is None else torch.empty_like(gate))

    rows = ["| step | threads | flush | GPU ms (events) | host µs |", "|---|---|---|---|---|"]
    variants = [("gla", gla_step), ("gla, backward launching nothing", "stub"),
                ("sdpa", sdpa_step), ("do-nothing", nop_step)]
    for name, step in variants:
        for threads, wrap in (("device thread", lambda f: f), ("calling thread", single_thread)):
            for flush in (True, False):
                if step == "stub":
                    flash._ForwardPlan.backward = no_kernels
                    try:
                        ms, us = _event_loop(wrap(gla_step), flush=flush)
                    finally:
                        flash._ForwardPlan.backward = real
                else:
                    ms, us = _event_loop(wrap(step), flush=flush)
                rows.append(f"| {name} | {threads} | {'yes' if flush else 'no'} | {ms:.3f} | "
                            f"{us:.1f} |")
    return rows


def training_case(d: int, t: int, gated: bool):
    """One case's leaves ``q, k, v, g`` (``g`` None ungated; B=2 H=16 bf16 CUDA), output gradient
    ``do``, ``clear()`` (the gradients to None) and SDPA's step (+ the sigmoid gate)."""
    def mk(last=d):
        return torch.randn(B, H, t, last, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(), mk(), mk()
    g = mk() if gated else None
    ins = [q, k, v] + ([g] if gated else [])
    do = torch.randn_like(q)

    def clear():
        for x in ins:
            x.grad = None

    def sdpa_step():
        clear()
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if gated:
            o = o * torch.sigmoid(g)
        o.backward(do)
    return q, k, v, g, do, clear, sdpa_step


def run(out_dir: str) -> str:
    import triton

    from gla.kernels.attention import gated_attention

    lines = []
    for d, t, gated in CASES:
        q, k, v, g, do, clear, sdpa_step = training_case(d, t, gated)

        def gla_step():
            clear()
            gated_attention(q, k, v, gate=g, causal=True, impl="triton").backward(do)

        def nop_step():
            clear()
            _Nop.apply(q, k, v, g, None, None, None).backward(do)

        def unplanned(step):
            from gla.kernels.attention import flash

            def run_step():
                flash.PLANS = False
                try:
                    step()
                finally:
                    flash.PLANS = True
            return run_step

        def single_thread(step):
            def run_step():
                with torch.autograd.set_multithreading_enabled(False):
                    step()
            return run_step

        tag = f"D={d} T={t}{' gated' if gated else ''}"
        print(tag, flush=True)
        lines += [f"## {tag}", "", "| step | do_bench ms | host µs (no sync) | wall µs |",
                  "|---|---|---|---|"]
        for name, step in (("gla", gla_step), ("gla, no call plans", unplanned(gla_step)),
                           ("gla, backward in the calling thread",
                                               single_thread(gla_step)),
                           ("sdpa" + (" + gate" if gated else ""), sdpa_step),
                           ("sdpa, backward in the calling thread", single_thread(sdpa_step)),
                           ("do-nothing autograd.Function", nop_step),
                           ("do-nothing, backward in the calling thread",
                            single_thread(nop_step))):
            ms = _do_bench(step, None)
            host, wall = _time(step)
            lines.append(f"| {name} | {ms:.3f} | {host:.1f} | {wall:.1f} |")
        lines += ["", "gla step timeline (median µs after the step's start; `{` entered, "
                  "`}` left), the backward on the engine's device thread and in the calling "
                  "thread:", "", "| point | device thread | calling thread |", "|---|---|---|"]
        calling = dict(_timeline(single_thread(gla_step)))
        lines += [f"| {name} | {us:.1f} | "
                  f"{calling[name]:.1f} |" if name in calling else f"| {name} | {us:.1f} | |"
                  for name, us in _timeline(gla_step)]
        lines.append("")
        if (d, t, gated) in ((128, 1024, False), (64, 2048, True)):
            lines += ["do_bench's loop by hand (events around each call):", ""]
            lines += _handoff_rows(gla_step, sdpa_step, nop_step, single_thread) + [""]
        if (d, t, gated) in ((128, 1024, True), (64, 2048, False)):
            lines += ["```", _profile(gla_step).strip(), "```", ""]

    name = torch.cuda.get_device_name()
    text = "\n".join([f"# Host time of an eager attention training step on {name} (torch "
                      f"{torch.__version__}, triton {triton.__version__})", "",
                      f"benchmarks/attention_step_host.py; B={B} H={H} bf16 causal; do_bench "
                      "median (the attention table's timer: an L2 flush before each call), host "
                      "µs per call without a sync, wall µs with the final sync.", "",
                      *lines]) + "\n"
    write_table(out_dir, "attention-step-host", name, text)
    print(text)
    return text


def main(out_dir: str) -> str:
    require_cuda("attention_step_host.py")
    return run(out_dir)


if __name__ == "__main__":
    main(out_dir_arg(sys.argv))
