"""Host time of the attention calls on Hopper: the Gluon launches with their TMA descriptors
encoded once per address (``hopper._EncodedLaunch``) or at every call (Triton's launcher), and the
Triton backward beside them.

    python benchmarks/attention_bwd_host.py     # prints the table of results/attention-host-encoded-*.md

µs per call (``host_overhead._time``: host = N calls without a sync, wall = with the final sync),
B=2 H=16 D=128 bf16 causal, T = 1024 and 2048, every path in one process, alternated:

* the Gluon forward's launch alone (``hopper.attention_forward``), and ``flash.attention_forward``;
* the Gluon backward's launch alone (``hopper_bwd.attention_backward``), and
  ``flash.attention_backward`` (preprocess, kernel, cast) with the Gluon and the Triton kernels;
* a training step through ``gated_attention`` (forward and ``backward``), Gluon both ways.

Each call allocates its outputs afresh, as a training step does: PyTorch's caching allocator then
hands out the same addresses call after call. The Gluon backward is forced at both lengths
(``flash.gluon_backward_pays`` keeps eager calls at T=1024 on the Triton kernels).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from host_overhead import _time  # noqa: E402
from gla.kernels.attention import flash, gated_attention, hopper, hopper_bwd  # noqa: E402

B, H, D, N = 2, 16, 128, 300


def calls(T):
    mk = lambda: torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # noqa
    q, k, v, dout = mk(), mk(), mk(), mk()
    out, lse = flash.attention_forward(q, k, v, causal=True)
    delta = torch.randn(B, H, T, device="cuda")
    dq_acc = torch.zeros(B, T, H, D, device="cuda").transpose(1, 2)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd_launch():
        hopper.attention_forward(q, k, v, flash._empty_bthd(B, H, T, D, q.dtype, q.device),
                                 torch.empty(B, H, T, device="cuda"), None, (0, 0, 0, 0), False,
                                 D ** -0.5, True)

    def step():
        gated_attention(*leaves, causal=True).backward(dout)
        for x in leaves:
            x.grad = None

    def triton_bwd():
        flash.GLUON_BACKWARD = False
        try:
            flash.attention_backward(dout, q, k, v, out, lse, causal=True)
        finally:
            flash.GLUON_BACKWARD = True

    return {
        "Gluon forward launch": fwd_launch,
        "flash.attention_forward (Gluon)": lambda: flash.attention_forward(q, k, v, causal=True),
        "Gluon backward launch": lambda: hopper_bwd.attention_backward(
            q, k, v, dout, lse, delta, dq_acc, dk, dv, D ** -0.5, True),
        "flash.attention_backward (Gluon)": lambda: flash.attention_backward(
            dout, q, k, v, out, lse, causal=True),
        "gated_attention fwd+bwd step": step,
    }, triton_bwd


def main():
    import triton
    flash.gluon_backward_pays = lambda *args: True
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
             f"{triton.__version__}; B={B} H={H} D={D} bf16 causal; µs per call, {N} calls", "",
             "| T | call | encoded once: host | wall | encoded per call: host | wall |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for T in (1024, 2048):
        fns, triton_bwd = calls(T)
        for name, fn in fns.items():
            res = {}
            for rep in range(2):  # alternated twice: the second pair is reported
                for once in (True, False):
                    hopper.ENCODE_ONCE = once
                    res[once] = _time(fn, N)
            hopper.ENCODE_ONCE = True
            line = (f"| {T} | {name} | {res[True][0]:.0f} | {res[True][1]:.0f} | "
                    f"{res[False][0]:.0f} | {res[False][1]:.0f} |")
            lines.append(line)
            print(line, flush=True)
        host, wall = _time(triton_bwd, N)
        line = f"| {T} | flash.attention_backward (Triton kernels) | {host:.0f} | {wall:.0f} | | |"
        lines.append(line)
        print(line, flush=True)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
