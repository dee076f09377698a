"""Registers, spills, shared memory and compile time of gla's Triton kernels for sm_90, without a GPU.

    python benchmarks/kernel_resources.py [OUT_DIR]     # writes {OUT_DIR}/kernel-resources-sm90.md
    python benchmarks/kernel_resources.py --gluon       # the Hopper Gluon kernels only, as JSON

The launchers run as usual on CPU tensors (bf16, GLA at B=2 H=16 K=V=128 T=4096, attention at
B=2 H=16 T=4096 D=128 causal), with the device-dependent choices (block configs, dot precision)
made as on CUDA; every launch is captured instead of run, then compiled ahead of time for an H100
(``triton.compile`` with ``GPUTarget("cuda", 90, 32)``) and its PTX assembled by Triton's own
``ptxas -v``. Pointers and integers divisible by 16 are specialized as Triton does at a launch.
Figures come from this machine's Triton (not necessarily the GPU machine's), so they say which
kernels spill and roughly what a first call compiles, not how fast anything runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"     # real JITFunctions (nothing is launched)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gla.kernels.launch import Launcher  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
       torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class _Capture:
    """Stands in for ``kernel[grid]``: records the call instead of launching it."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def _signature(fn, args, kwargs):
    sig, consts, attrs = {}, {}, {}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    for i, name in enumerate(fn.arg_names):
        v = values[name]
        if name in kwargs or v is None or i in fn.constexprs:
            sig[name] = "constexpr"
            consts[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TY[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
            consts[name] = v
    return sig, consts, attrs


def _ptxas(ptx: str) -> str:
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    if not os.path.exists(exe):
        exe = exe.replace("ptxas-blackwell", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True)
    os.unlink(f.name)
    text = out.stderr + out.stdout
    regs = spill = "?"
    for line in text.splitlines():
        if "registers" in line:
            regs = line.split("Used")[1].split("registers")[0].strip()
        if "spill stores" in line:
            spill = line.split(",")[1].split("bytes")[0].strip()
    return regs, spill


def _compile(fn, args, kwargs):
    sig, consts, attrs = _signature(fn, args, kwargs)
    opts = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET, options=opts)
    dt = time.perf_counter() - t0
    regs, spill = _ptxas(k.asm["ptx"])
    cfg = ", ".join(f"{n}={consts[n]}" for n in ("BK", "BV", "BLOCK_M", "BLOCK_N") if n in consts)
    if "DT" in consts:   # the GLA kernels' dot operand dtype / precision
        cfg += f", dots {str(consts['DT']).replace('fp32', consts.get('PREC', 'fp32'))}"
    return dict(kernel=fn.__name__, cfg=cfg, key=(fn.__name__, repr(sorted(consts.items(), key=str))),
                warps=opts.get("num_warps", 4),
                stages=opts.get("num_stages", 3), regs=regs, spill=spill,
                smem=k.metadata.shared, compile_s=dt)


class _Patched:
    """Replace module attributes for the duration of a capture (the kernels' globals must be the
    real ones again when they compile)."""

    def __init__(self, module, **attrs):
        self.module, self.attrs, self.saved = module, attrs, {}

    def __enter__(self):
        for name, value in self.attrs.items():
            self.saved[name] = getattr(self.module, name)
            setattr(self.module, name, value)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.module, name, value)


def _captures(module, calls, keep):
    kernels = {name: getattr(obj, "fn", obj) for name, obj in vars(module).items()
               if isinstance(obj, Launcher)}
    return {name: _Capture(fn, calls) for name, fn in kernels.items() if keep(name)}


def _capture_gla(calls):
    from gla.kernels.linear_attention import chunk_parallel as cp

    cuda = torch.device("cuda")
    dot_cfg = cp._dot_cfg
    patch = _Patched(cp, **_captures(cp, calls, lambda n: n.endswith("_kernel")),
                     _blocks=lambda K, V, device, NH: cp._blocks_cached(K, V, "cuda", NH, None, None),
                     _dot_cfg=lambda kernel, dtype, device, modes=None: dot_cfg(kernel, dtype, cuda,
                                                                                 modes))
    B, T, H, D = 2, 4096, 16, 128
    q, k, v, do = (torch.randn(B, T, H, D).to(torch.bfloat16) for _ in range(4))
    g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, D)) / 16).to(torch.bfloat16)
    with patch:
        cp.chunk_gla_fwd(q, k, v, g, None, None, D ** -0.5, False)
        cp.chunk_gla_bwd(do, None, q, k, v, g, None, None, None, D ** -0.5)


def _capture_attention(calls):
    from gla.kernels.attention import flash

    B, T, H, D = 2, 4096, 16, 128
    q, k, v, do = (torch.randn(B, H, T, D).to(torch.bfloat16) for _ in range(4))
    with _Patched(flash, **_captures(flash, calls, lambda n: n.startswith("_attn"))):
        o, lse = flash.attention_forward(q, k, v, None, None, None, D ** -0.5, True, 0)
        flash.attention_backward(do, q, k, v, o, lse, None, None, None, D ** -0.5, True, 0)


_GLUON_VARIANTS = [  # head dim, causal, gate, q/k/v/out in [B, T, H, D] order
    (128, True, "elementwise", True), (128, False, None, False), (64, True, "headwise", True)]


def _compile_gluon(fn, sig, consts, num_warps):
    """A Gluon kernel compiled for sm_90: (kernel, seconds, registers, spill bytes)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    sig = dict(sig, **{name: "constexpr" for name in consts})
    t0 = time.perf_counter()
    k = triton.compile(GluonASTSource(fn, sig, constexprs=consts), target=TARGET,
                       options={"num_warps": num_warps})
    dt = time.perf_counter() - t0
    return (k, dt, *_ptxas(k.asm["ptx"]))


def _tensordesc(rows, d, t_major=True, dtype=torch.bfloat16) -> str:
    """The signature type of a TMA descriptor parameter as a launch would specialize it: boxes
    of ``rows`` rows of one head, in ``hopper``'s box order and shared-memory layout."""
    from gla.kernels.attention import hopper
    box = (1, rows, 1, d) if t_major else (1, 1, rows, d)
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    return f"tensordesc<{name}[{','.join(map(str, box))}],{hopper._smem_layout(box, dtype)!r}>"


def _compile_gluon_attention(d, causal, gate, t_major):
    """The Hopper Gluon forward (``hopper._attn_fwd_sm90``) at one variant, as a launch would
    specialize it."""
    from gla.kernels.attention import hopper

    def desc(rows):
        return _tensordesc(rows, d, t_major)

    sig = {"q_desc": desc(hopper.HALF), "k_desc": desc(hopper.BLOCK_N),
           "v_desc": desc(hopper.BLOCK_N), "o_desc": desc(hopper.HALF), "LSE": "*fp32",
           "GATE": "*bf16", **{f"stride_g{c}": "i64" for c in "bhmd"}, "qk_scale": "fp32",
           "TQ": "i32", "TK": "i32", "H": "i32", "GROUP": "i32", "GROUP_HEADS": "i32"}
    consts = dict(D=d, BLOCK_N=hopper.BLOCK_N, STAGES=hopper.STAGES, CAUSAL=causal,
                  Q_T_MAJOR=t_major, K_T_MAJOR=t_major, V_T_MAJOR=t_major, O_T_MAJOR=t_major,
                  HAS_GATE=gate is not None, GATE_HEADWISE=gate == "headwise")
    k, dt, regs, spill = _compile_gluon(hopper._attn_fwd_sm90, sig, consts, num_warps=4)
    cfg = (f"D={d}, BLOCK_M={hopper.BLOCK_M}, BLOCK_N={hopper.BLOCK_N}, "
           f"{'causal' if causal else 'full'}, gate {gate}, {'bthd' if t_major else 'bhtd'}")
    return dict(kernel="_attn_fwd_sm90 (Gluon)", cfg=cfg, warps="4+4+1", stages=hopper.STAGES,
                regs=regs, spill=spill, smem=k.metadata.shared, compile_s=dt)


# (D, causal, partials, a partition per warpgroup (None: as a launch picks it))
_GLUON_BWD_VARIANTS = [(128, True), (128, False, True), (64, True), (64, True, True),
                       (64, True, False, False)]


def _compile_gluon_attention_bwd(d, causal, partials=False, per_warpgroup=None):
    """The Hopper Gluon backward (``hopper_bwd._attn_bwd_sm90``), [B, T, H, D] tensors."""
    from gla.kernels.attention import hopper_bwd

    def desc(rows, dtype=torch.bfloat16):
        return _tensordesc(rows, d, True, dtype)

    if per_warpgroup is None:
        per_warpgroup = d in hopper_bwd.PER_WARPGROUP_HEAD_DIMS
    n, m = hopper_bwd.BLOCK_N, hopper_bwd.BLOCK_M
    kv = n // 2 if per_warpgroup else n
    sig = {"k_desc": desc(kv), "v_desc": desc(kv), "q_desc": desc(m), "do_desc": desc(m),
           "dq_desc": desc(m, torch.float32), "dk_desc": desc(kv), "dv_desc": desc(kv),
           "LSE": "*fp32", "DELTA": "*fp32", "PART_K": "*fp32", "PART_V": "*fp32",
           "qk_scale": "fp32", "sm_scale": "fp32", "TQ": "i32", "TK": "i32", "H": "i32",
           "HK": "i32", "GROUP": "i32", "SPLIT": "i32", "GROUP_HEADS": "i32"}
    consts = dict(D=d, BLOCK_M=m, BLOCK_N=n, STAGES=hopper_bwd.STAGES, CAUSAL=causal,
                  **{f"{t}_T_MAJOR": True for t in ("K", "V", "Q", "DO", "DQ", "DK", "DV")},
                  PARTIALS=partials, PER_WARPGROUP=per_warpgroup,
                  LSE_SMEM=hopper_bwd.LSE_IN_SMEM)
    k, dt, regs, spill = _compile_gluon(hopper_bwd._attn_bwd_sm90, sig, consts,
                                        num_warps=4 if per_warpgroup else 8)
    cfg = (f"D={d}, BLOCK_N={n}, BLOCK_M={m}, {'causal' if causal else 'full'}, bthd"
           + (", fp32 partials" if partials else "")
           + (", a partition per warpgroup" if per_warpgroup else ""))
    return dict(kernel="_attn_bwd_sm90 (Gluon)", cfg=cfg, warps="4+4+1" if per_warpgroup else "8+1",
                stages=hopper_bwd.STAGES, regs=regs, spill=spill, smem=k.metadata.shared,
                compile_s=dt)


def _gluon_rows():
    for variant in _GLUON_VARIANTS:
        yield "attention fwd on Hopper, bf16", _compile_gluon_attention(*variant)
    for variant in _GLUON_BWD_VARIANTS:
        yield "attention bwd on Hopper, bf16", _compile_gluon_attention_bwd(*variant)


def main(out_dir: str) -> str:
    rows = []
    for what, capture in (("GLA chunk fwd+bwd, bf16 K=V=128", _capture_gla),
                          ("attention fwd+bwd, bf16 D=128 causal", _capture_attention)):
        calls = []
        capture(calls)
        seen = set()
        for fn, args, kwargs in calls:
            r = _compile(fn, args, kwargs)
            if r["key"] in seen:
                continue
            seen.add(r["key"])
            rows.append((what, r))
            print(f"{what}: {r['kernel']} {r['cfg']}: {r['regs']} registers, {r['spill']} B "
                  f"spilled, {r['compile_s']:.1f} s", flush=True)
    for what, r in _gluon_rows():
        rows.append((what, r))
        print(f"Gluon: {r['cfg']}: {r['regs']} registers, {r['spill']} B spilled, "
              f"{r['compile_s']:.1f} s", flush=True)
    head = (f"# gla Triton kernels on sm_90: resources (compiled ahead of time, no GPU)\n\n"
            f"triton {triton.__version__}, torch {torch.__version__}; default configs at "
            "the shapes in `benchmarks/kernel_resources.py`; compile time on this machine.\n\n"
            "| call | kernel | config | warps | stages | registers | spill stores (B) | "
            "shared (B) | compile s |\n|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {w} | `{r['kernel']}` | {r['cfg']} | {r['warps']} | {r['stages']} | "
                   f"{r['regs']} | {r['spill']} | {r['smem']} | {r['compile_s']:.1f} |\n"
                   for w, r in rows)
    total = {w: sum(r["compile_s"] for ww, r in rows if ww == w) for w, _ in rows}
    tail = "\n" + "".join(f"- {w}: {t:.1f} s of compilation in all\n" for w, t in total.items())
    text = head + body + tail
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernel-resources-sm90.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    if "--gluon" in sys.argv:  # only the Gluon kernels, one JSON line per variant (tests)
        import json
        for _, r in _gluon_rows():
            print(json.dumps(r), flush=True)
        sys.exit(0)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(main(args[0] if args else os.path.join(os.path.dirname(__file__), "results")))
