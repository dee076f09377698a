"""What host work costs inside a Python backward on the autograd engine's device thread, against
the same work in the calling thread (one GPU).

    python benchmarks/autograd_thread_cost.py [out_dir] [--tag TAG]
    # writes {out_dir}/autograd-thread-cost-<device>[-TAG].md

The autograd engine runs a CUDA node's backward on its device thread; gla's attention backward
is Python, and a training step whose backward hands off to that thread took ~2x the host time of
one whose backward stays in the calling thread (``results/attention-step-host-*.md``). This asks
whether the work itself runs slower there. Each row here is one kind of host work, done ``n`` times
inside a backward (timed inside it with ``perf_counter``), as µs per repetition, median over
steps:

* ``device thread``: ``loss.backward()`` as usual;
* ``calling thread``: the same under ``torch.autograd.set_multithreading_enabled(False)``;
* ``no autograd``: the same work called directly, outside any backward.

Run it under ``taskset`` to see whether where the threads run matters (``--tag`` names the file).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl
from results_io import out_dir_arg, require_cuda, write_table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@triton.jit
def _tiny(X, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)


def _work(name: str):
    """(repetitions, fn) doing one kind of host work that many times."""
    from gla.kernels import launch

    x = torch.zeros(1024, device="cuda")
    table = {(i, 1): i for i in range(64)}

    if name == "python (dict get + tuple)":
        def fn(n):
            for i in range(n):
                table.get((i & 63, 1))
        return 200, fn
    if name == "torch.empty (1 MiB, CUDA)":
        def fn(n):
            keep = [torch.empty(1 << 18, device="cuda") for _ in range(n)]
            del keep
        return 20, fn
    if name == "tensor.stride() + data_ptr()":
        def fn(n):
            for _ in range(n):
                x.stride()
                x.data_ptr()
        return 100, fn
    if name == "torch kernel launch (x.add_(1))":
        def fn(n):
            for _ in range(n):
                x.add_(1)
        return 20, fn
    kernel = _tiny[(1,)](x, 1024, BLOCK=1024)
    stream = torch.cuda.current_stream().cuda_stream
    if name == "triton launch (kernel.run)":
        def fn(n):
            for _ in range(n):
                kernel.run(1, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None,
                           None, x, 1024, 1024)
        return 20, fn
    if name == "triton launch (C launch)":
        direct = launch.c_launch(kernel)
        if direct is None:
            return None
        c, leading = direct

        def fn(n):
            for _ in range(n):
                c(1, 1, 1, stream, *leading, x, 1024, 1024)
        return 20, fn
    raise KeyError(name)


WORK = ["python (dict get + tuple)", "tensor.stride() + data_ptr()", "torch.empty (1 MiB, CUDA)",
        "torch kernel launch (x.add_(1))", "triton launch (kernel.run)", "triton launch (C launch)"]


class _Timed(torch.autograd.Function):
    """Its backward does the work and records how long it took."""

    @staticmethod
    def forward(ctx, x, work, times):
        ctx.work, ctx.times = work, times
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        n, fn = ctx.work
        t0 = time.perf_counter()
        fn(n)
        ctx.times.append((time.perf_counter() - t0) / n * 1e6)
        return g, None, None


def _median_us(step, times, steps=200) -> float:
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    times.clear()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return statistics.median(times)


def run(out_dir: str, tag: str | None) -> str:
    require_cuda("autograd_thread_cost.py")
    leaf = torch.randn(1024, device="cuda", requires_grad=True)
    rows = []
    for name in WORK:
        work = _work(name)
        if work is None:
            rows.append(f"| {name} | n/a (launcher laid out otherwise) | | |")
            continue
        times: list = []

        def step():
            _Timed.apply(leaf, work, times).sum().backward()

        def calling_thread():
            with torch.autograd.set_multithreading_enabled(False):
                step()

        def direct():
            t0 = time.perf_counter()
            work[1](work[0])
            times.append((time.perf_counter() - t0) / work[0] * 1e6)

        dev, call, plain = (_median_us(f, times) for f in (step, calling_thread, direct))
        rows.append(f"| {name} | {dev:.2f} | {call:.2f} | {plain:.2f} |")
        print(rows[-1], flush=True)
    try:
        numa = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        numa = [ln.strip() for ln in numa.splitlines()
                if ln.startswith(("Model name", "Socket(s)", "NUMA node", "CPU(s)"))]
    except OSError:
        numa = ["(lscpu not found)"]
    name = torch.cuda.get_device_name()
    lines = [f"# Host work inside a backward, by thread, on {name} (torch {torch.__version__}, "
             f"triton {triton.__version__})", "",
             f"benchmarks/autograd_thread_cost.py; CPUs this process may run on: "
             f"{sorted(os.sched_getaffinity(0))}" + (f" (`{tag}`)" if tag else ""), "",
             *[f"- {ln}" for ln in numa], "",
             "µs per repetition, median of 200 steps.", "",
             "| work | device thread | calling thread | no autograd |", "|---|---|---|---|",
             *rows, ""]
    stem = "autograd-thread-cost" + (f"-{tag}" if tag else "")
    return write_table(out_dir, stem, name, "\n".join(lines))


if __name__ == "__main__":
    args = sys.argv[1:]
    tag = None
    if "--tag" in args:
        i = args.index("--tag")
        tag = args[i + 1]
        del args[i:i + 2]
    print(run(out_dir_arg([sys.argv[0], *args]), tag))
