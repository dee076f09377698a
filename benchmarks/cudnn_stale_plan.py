"""GPU diagnostic: does cuDNN's SDPA backward go wrong after a same-shape call with other strides?

    python benchmarks/cudnn_stale_plan.py [out_dir]   # writes {out_dir}/cudnn-stale-plan-<device>.md

Why: in ``benchmarks/model_gpu.py`` (one process: tiny_llama, then transformers' Llama, both at
B=2, 16/4 heads of 128, T=2048) the Llama training gradients of every path through cuDNN's
``is_causal`` kernel — eager PyTorch included — were ~130% off an fp32 reference, while Inductor's
cuDNN-with-mask path and gla's Triton kernel matched it to 1.6e-2; the same model alone in a fresh
process matched fp32 on every path. The two models' q/k/v (and so dO) have the same shapes and
stride order but different strides (tiny_llama's q is a slice of a wider projection), which fits
PyTorch reusing a cuDNN backward graph cached for the first layout (pytorch/pytorch#191576 changes
that key for dO). This script isolates that: one process runs cuDNN's backward on a sequence of
same-shape calls whose layouts change (q/k/v and dO together, then dO alone), a fresh process
runs the mismatched layouts first, and every call's gradients are compared against float64.

Measured on the H200 (torch 2.11, cuDNN 9.19; ``results/cudnn-stale-plan-nvidia-h200.md``): the
calls that change only dO's strides are 130–140% off, the same layouts first in a fresh process are
right. gla's ``kernels="auto"`` therefore trains with its own kernel.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from results_io import out_dir_arg, require_cuda, write_table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, H, HKV, T, D = 2, 16, 4, 2048, 128


def _qkv(layout: str, grad: bool = True):
    """q [B, H, T, D], k/v [B, HKV, T, D] as views with the given memory layout."""
    def make(heads, wide):
        x = torch.randn(B, T, heads * wide, D, device="cuda", dtype=torch.bfloat16)
        x = x[:, :, :heads] if wide > 1 else x      # a slice of a wider projection (a gate beside q)
        return x.transpose(1, 2).detach().requires_grad_(grad)
    if layout == "bthd":
        return make(H, 1), make(HKV, 1), make(HKV, 1)
    if layout == "bthd-wide-q":
        return make(H, 2), make(HKV, 1), make(HKV, 1)
    if layout == "bhtd":
        return tuple(torch.randn(B, h, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
                     for h in (H, HKV, HKV))
    raise ValueError(layout)


def _dout(layout: str):
    """The output gradient [B, H, T, D]: [B, T, H, D] memory (what a model's ``transpose(1, 2)``
    hands back), contiguous (bhtd), or a slice of a wider [B, T, 2H, D] buffer."""
    if layout == "bhtd":
        return torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    if layout == "bthd-wide":
        return torch.randn(B, T, 2 * H, D, device="cuda", dtype=torch.bfloat16)[:, :, :H].transpose(1, 2)
    return torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)


def _grads(q, k, v, dout, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([backend]):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return torch.autograd.grad(o, (q, k, v), dout)


# (q/k/v layout, dO layout). Calls 2, 3, 7, 9 change only dO's layout: a cached backward graph
# keyed without dO's strides would be reused there.
SEQUENCE = [("bthd", "bthd"), ("bthd", "bhtd"), ("bthd", "bthd-wide"), ("bthd", "bthd"),
            ("bthd-wide-q", "bthd"), ("bhtd", "bhtd"), ("bhtd", "bthd"), ("bthd-wide-q", "bthd"),
            ("bthd", "bhtd"), ("bthd", "bthd")]


# The same mismatched layouts as the first call of a fresh process: wrong there too would mean
# cuDNN mishandles a dO whose strides differ from O's; right means a graph reused from call 1.
FRESH = [("bthd", "bhtd"), ("bthd", "bthd"), ("bhtd", "bthd")]


def _calls(sequence) -> list:
    from torch.nn.attention import SDPBackend

    from gla.testing import rel_rms_error

    rows = []
    torch.manual_seed(0)
    for i, (layout, dlayout) in enumerate(sequence):  # one process, in this order, each checked
        q, k, v = _qkv(layout)
        dout = _dout(dlayout)
        got = _grads(q, k, v, dout, SDPBackend.CUDNN_ATTENTION)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        ref = torch.autograd.grad(od, (qd, kd, vd), dout.double())
        strides = "; ".join(str(tuple(t.stride())) for t in (q, k, dout))
        rows.append((i + 1, f"{layout}, dO {dlayout}", strides, *(rel_rms_error(g, r) for g, r in zip(got, ref))))
        print(rows[-1], flush=True)
    return rows


def _fresh_process_rows() -> list:
    """:data:`FRESH` run in a new interpreter (no cuDNN graph cached yet)."""
    import json
    import subprocess
    code = ("import json, sys; sys.path.insert(0, %r); import cudnn_stale_plan as c; "
            "print('ROWS' + json.dumps(c._calls(c.FRESH)))" % os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("ROWS"))
    return json.loads(line[4:])


def _table(rows) -> list[str]:
    return ["| call | layout | strides q; k; dO | dq | dk | dv |", "|---|---|---|---|---|---|"] + \
        [f"| {i} | {lay} | {st} | {dq:.1e} | {dk:.1e} | {dv:.1e} |" for i, lay, st, dq, dk, dv in rows]


def run(out_dir: str) -> str:
    rows = _calls(SEQUENCE)
    fresh = _fresh_process_rows()
    name = torch.cuda.get_device_name()
    lines = [f"# cuDNN SDPA backward, same shapes, calls with other strides in between, {name}", "",
             f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; B={B}, heads {H}/{HKV}, "
             f"T={T}, D={D}, bf16, causal, enable_gqa; each call's gradients vs float64 (relative RMS; "
             "bf16 gives ~1e-2), calls in the order listed, one process.", ""]
    lines += _table(rows) + ["", "A fresh process, the same checks:", ""] + _table(fresh)
    text = "\n".join(lines) + "\n"
    write_table(out_dir, "cudnn-stale-plan", name, text)
    return text


def main(out_dir: str) -> str:
    require_cuda("cudnn_stale_plan.py")
    return run(out_dir)


if __name__ == "__main__":
    print(main(out_dir_arg(sys.argv)))
