"""Where the time of gla's chunked GLA goes, kernel by kernel (GPU only), and block-size sweeps.

    main(out_dir) -> str     # writes {out_dir}/linear_attention-profile-<device>.md
    python benchmarks/linear_attention_profile.py [OUT_DIR] [--sweep]

bf16, B=2, H=16, K=V=128, per-channel log gate. For T in ``T_LIST``: device time per call of
every kernel of ``chunk_gla_fwd`` and ``chunk_gla_bwd`` (torch.profiler, CUDA activity, mean of
``N_PROF`` calls), their sum, and the end-to-end do_bench time of each. ``--sweep`` also times
each kernel under candidate block configs (``GLA_LINEAR_BLOCKS``) at ``SWEEP_T`` and under the
dot-precision modes of ``GLA_LINEAR_DOT`` (with the error of o / dq against the default), one
line per candidate, so a config change is read off one run.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from results_io import require_cuda, write_table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, H, D = 2, 16, 128
T_LIST = (1024, 4096, 16384)
SWEEP_T = 16384
N_PROF = 10

# kernel -> [(BK, BV, num_warps, num_stages)], the default first (filled in at run time)
SWEEP_CANDS = {
    "h": [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 8, 3),
          (128, 32, 8, 2), (128, 64, 8, 2)],
    "dh": [(64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2)],
    "A": [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3)],
    "o": [(64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2)],
    "dA": [(32, 128, 8, 2), (32, 64, 4, 2), (32, 128, 4, 3)],
    "dv": [(64, 64, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2)],
    "dqk": [(32, 64, 8, 1), (64, 64, 8, 1), (32, 128, 8, 1), (64, 64, 4, 1), (32, 64, 4, 2),
            (64, 128, 8, 1), (16, 64, 4, 1)],
}
# which launch each sweep entry times (the profiler name of its Triton kernel)
KERNEL_NAME = {"h": "_h_kernel", "dh": "_dh_kernel", "A": "_A_kernel", "o": "_o_kernel",
               "dA": "_dA_kernel", "dv": "_dv_kernel", "dqk": "_dqkg_kernel"}
BWD_KERNELS = ("dh", "dA", "dv", "dqk")


def _inputs(T, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen).to(dt) for _ in range(3))
    g = (F.logsigmoid(torch.randn(B, T, H, D, device="cuda", generator=gen)) / 16).to(dt)
    do = torch.randn(B, T, H, D, device="cuda", generator=gen).to(dt)
    return q, k, v, g, do


def _calls(T):
    from gla.kernels.linear_attention import chunk_parallel as cp

    q, k, v, g, do = _inputs(T)
    scale = D ** -0.5

    def fwd():
        return cp.chunk_gla_fwd(q, k, v, g, None, None, scale, False)[0]

    def bwd():
        return cp.chunk_gla_bwd(do, None, q, k, v, g, None, None, None, scale)

    return fwd, bwd


def _kernel_times(fn) -> dict:
    """{kernel name: (µs per call, launches per call)} over N_PROF calls after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(N_PROF):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        if t > 0:
            out[e.key] = (t / N_PROF, e.count / N_PROF)
    return out


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _short(name: str) -> str:
    return name if len(name) <= 48 else name[:45] + "..."


def profile_table() -> str:
    lines = [f"B={B} H={H} K=V={D} bf16, per-channel gate; µs per call per kernel "
             f"(torch.profiler, mean of {N_PROF})", ""]
    for T in T_LIST:
        fwd, bwd = _calls(T)
        for what, fn in (("fwd", fwd), ("bwd", bwd)):
            kt = _kernel_times(fn)
            total = sum(t for t, _ in kt.values())
            e2e = _bench(fn)
            lines.append(f"### T={T} {what}: kernels {total:.0f} µs, do_bench {e2e * 1e3:.0f} µs")
            lines.append("| kernel | µs | launches | share |")
            lines.append("|---|---|---|---|")
            for name, (t, n) in sorted(kt.items(), key=lambda x: -x[1][0]):
                lines.append(f"| {_short(name)} | {t:.1f} | {n:g} | {t / total:.0%} |")
            lines.append("")
        print("\n".join(lines[-40:]), flush=True)
    return "\n".join(lines)


def _with_env(name, value, fn):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def sweep() -> str:
    from gla.kernels.linear_attention import chunk_parallel as cp

    fwd, bwd = _calls(SWEEP_T)
    o_ref = fwd()
    dq_ref = bwd()[0]
    defaults = cp._blocks(D, D, torch.device("cuda"), B * H)
    lines = [f"## Block sweep, T={SWEEP_T} (µs per call of the one kernel; * = default)"]
    for kern, cands in SWEEP_CANDS.items():
        fn = bwd if kern in BWD_KERNELS else fwd
        res = []
        for cand in [defaults[kern]] + [c for c in cands if c != defaults[kern]]:
            spec = f"{kern}={','.join(str(x) for x in cand)}"
            try:
                kt = _with_env("GLA_LINEAR_BLOCKS", spec, lambda: _kernel_times(fn))
                t = kt.get(KERNEL_NAME[kern], (float("nan"), 0))[0]   # "h": forward's pass
                out = _with_env("GLA_LINEAR_BLOCKS", spec, fn)
                err = _rel(out if kern not in BWD_KERNELS else out[0],
                           o_ref if kern not in BWD_KERNELS else dq_ref)
            except Exception as e:  # a config that does not compile (registers, smem)
                t, err = float("nan"), float("nan")
                print(f"  {spec}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            res.append((t, cand, err))
        res.sort(key=lambda r: (r[0] != r[0], r[0]))
        line = f"{kern:4s} " + "  ".join(
            f"{'x'.join(map(str, c[:2]))}w{c[2]}s{c[3]}{'*' if c == defaults[kern] else ''} "
            f"{t:.0f}" + ("" if e < 1e-3 else f"(err {e:.1e})") for t, c, e in res)
        print(line, flush=True)
        lines.append(line)
    # the exact sub-block form every chunk takes when its gate span exceeds SPAN_MAX
    span_max = cp.SPAN_MAX
    cp.SPAN_MAX = -1.0
    try:
        kf, kb = _kernel_times(fwd), _kernel_times(bwd)
        err = _rel(fwd(), o_ref), _rel(bwd()[0], dq_ref)
    finally:
        cp.SPAN_MAX = span_max
    line = (f"sub-block form everywhere (SPAN_MAX=-1): fwd {sum(t for t, _ in kf.values()):.0f} µs "
            f"(_A_kernel {kf.get('_A_kernel', (0, 0))[0]:.0f}), bwd {sum(t for t, _ in kb.values()):.0f}"
            f" µs (_dqkg_kernel {kb.get('_dqkg_kernel', (0, 0))[0]:.0f}); o err {err[0]:.1e}, "
            f"dq err {err[1]:.1e} vs the default")
    print(line, flush=True)
    lines += ["", line]
    lines += ["", f"## Dot precision (GLA_LINEAR_DOT), T={SWEEP_T}: µs per kernel, rel err vs default"]
    for mode in ("native", "tf32", "bh=native,dh=native,dqk=native", "dqk=native"):
        kf = _with_env("GLA_LINEAR_DOT", mode, lambda: _kernel_times(fwd))
        kb = _with_env("GLA_LINEAR_DOT", mode, lambda: _kernel_times(bwd))
        o = _with_env("GLA_LINEAR_DOT", mode, fwd)
        dq = _with_env("GLA_LINEAR_DOT", mode, bwd)[0]
        line = (f"{mode}: fwd {sum(t for t, _ in kf.values()):.0f} µs, bwd "
                f"{sum(t for t, _ in kb.values()):.0f} µs; "
                + ", ".join(f"{KERNEL_NAME[k]} {kb.get(KERNEL_NAME[k], (0, 0))[0]:.0f}"
                            for k in BWD_KERNELS)
                + f"; o err {_rel(o, o_ref):.1e}, dq err {_rel(dq, dq_ref):.1e}")
        print(line, flush=True)
        lines.append(line)
    return "\n".join(lines)


def main(out_dir: str, do_sweep: bool = False) -> str:
    require_cuda("linear_attention_profile.py")
    import triton

    name = torch.cuda.get_device_name()
    head = (f"# gla chunked GLA: kernel profile\n\ndevice: {name}; torch {torch.__version__}; "
            f"triton {triton.__version__}\n\n")
    text = head + profile_table()
    if do_sweep:
        text += "\n\n" + sweep()
    write_table(out_dir, "linear_attention-profile", name, text + "\n")
    return text


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0] if args else os.path.join(os.path.dirname(__file__), "results"),
         do_sweep="--sweep" in sys.argv)
