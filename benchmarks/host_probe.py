"""Where one gla attention training step spends its host time (one GPU, small shapes).

    python benchmarks/host_probe.py [out_dir]   # writes {out_dir}/host-probe-<device>.md

A one-off investigation beside ``host_overhead.py`` (whose timer it uses): launcher costs with
and without the cached launcher, the same with the kernels stubbed out (Python only), the step
through ``.backward`` with and without gradient accumulation and through ``autograd.grad``, a
do-nothing ``autograd.Function`` with our signature, the host timeline of one step (when each
launch is entered), and Flex / SDPA steps for scale. B=2 H=16 T=1024 D=128 bf16 causal; µs of
host time per call without a sync. (do_bench of the same calls both ways: ``launch_cache.py``.)
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from host_overhead import B, D, H, T, _time
from results_io import out_dir_arg, require_cuda, write_table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Nop9(torch.autograd.Function):
    """gla's eager autograd.Function signature (9 inputs, 8 saved tensors), doing nothing."""

    @staticmethod
    def forward(ctx, q, k, v, gate, bias, km, scale, causal, window):
        ctx.save_for_backward(q, k, v, q, q, gate, bias, km)
        ctx.args = (scale, causal, window)
        ctx.set_materialize_grads(False)
        return torch.empty_like(q)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, *_ = ctx.saved_tensors
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                None, None, None, None, None, None)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _timeline(step, launch, n=200, skip=50) -> dict[str, float]:
    """Median µs after the step's start at which each kernel's launch is entered, and its end."""
    orig, marks, seen = launch.Launcher.launch, [], {}

    def traced(self, grid, args, kwargs):
        marks.append((getattr(self.fn, "__name__", "kernel"), time.perf_counter()))
        return orig(self, grid, args, kwargs)

    launch.Launcher.launch = traced
    try:
        for i in range(n):
            marks.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            if i >= skip:
                for name, t in marks + [("end", t1)]:
                    seen.setdefault(name, []).append(1e6 * (t - t0))
    finally:
        launch.Launcher.launch = orig
    return {name: statistics.median(ts) for name, ts in seen.items()}


def run(out_dir: str) -> str:
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from gla.kernels import launch
    from gla.kernels.attention import flash, gated_attention
    from gla.kernels.attention.op import _TritonAttention

    mk = lambda: torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                             requires_grad=True)
    q, k, v = mk(), mk(), mk()
    do = torch.randn_like(q)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    scale = D ** -0.5
    o, lse = flash.attention_forward(qd, kd, vd, causal=True)

    def triton_path(fn):
        def call():
            with launch.triton_launches():
                fn()
        return call

    def step():
        gated_attention(q, k, v, causal=True).backward(do)

    def step_clear():
        q.grad = k.grad = v.grad = None
        step()

    def step_grad():
        torch.autograd.grad(gated_attention(q, k, v, causal=True), (q, k, v), do)

    def fwd():
        flash.attention_forward(qd, kd, vd, None, None, None, scale, True, 0)

    def bwd():
        flash.attention_backward(do, qd, kd, vd, o, lse, None, None, None, scale, True, 0)

    rows = [
        ("attention_forward (1 launch)", fwd), ("attention_forward, Triton path", triton_path(fwd)),
        ("attention_backward (3 launches)", bwd),
        ("attention_backward, Triton path", triton_path(bwd)),
        ("step .backward (grads accumulate)", step),
        ("step .backward, Triton path", triton_path(step)),
        ("step .backward, grads cleared", step_clear), ("step autograd.grad", step_grad),
        ("step autograd.grad via _TritonAttention.apply", lambda: torch.autograd.grad(
            _TritonAttention.apply(q, k, v, None, None, None, scale, True, 0), (q, k, v), do)),
        ("do-nothing autograd.Function with our signature, autograd.grad",
         lambda: torch.autograd.grad(_Nop9.apply(q, k, v, None, None, None, scale, True, 0),
                                     (q, k, v), do)),
    ]
    lines = ["| call | µs (issue, no sync) |", "|---|---|"]
    lines += [f"| {name} | {_time(fn)[0]:.1f} |" for name, fn in rows]
    kernels = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")
    saved = {n: getattr(flash, n) for n in kernels}
    for n in kernels:
        setattr(flash, n, _NoLaunch())
    try:
        lines.append(f"| attention_forward, kernels stubbed (Python only) | {_time(fwd)[0]:.1f} |")
        lines.append(f"| attention_backward, kernels stubbed (Python only) | {_time(bwd)[0]:.1f} |")
    finally:
        for n, f in saved.items():
            setattr(flash, n, f)
    lines += ["", "host timeline of one autograd.grad step (median µs after its start, launch "
              "entered):"]
    lines += [f"- {name}: {t:.1f}" for name, t in _timeline(step_grad, launch).items()]
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cuda")
    flex = torch.compile(flex_attention)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for label, attend in (("flex compiled", lambda: flex(q, k, v, block_mask=mask)),
                          ("sdpa", lambda: sdpa(q, k, v, is_causal=True))):
        us = _time(lambda: torch.autograd.grad(attend(), (q, k, v), do))[0]
        lines.append(f"| {label}, autograd.grad | {us:.1f} |")

    name = torch.cuda.get_device_name()
    text = "\n".join([f"# Host-time probe on {name} (torch {torch.__version__}, triton "
                      f"{triton.__version__})", "", f"benchmarks/host_probe.py; B={B} H={H} T={T} "
                      f"D={D} bf16 causal; host µs per call without a sync.", "", *lines]) + "\n"
    write_table(out_dir, "host-probe", name, text)
    print(text)
    return text


def main(out_dir: str) -> str:
    require_cuda("host_probe.py")
    return run(out_dir)


if __name__ == "__main__":
    main(out_dir_arg(sys.argv))
