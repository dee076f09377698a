"""Host time of the attention backward, Triton vs Gluon path (a session-12 probe).

    python benchmarks/attention_bwd_host.py     # prints; results/attention-bwd-host-*.md

µs of host time per call without a sync (``host_overhead._time``), the Gluon path's pieces, and a
cProfile of 300 Gluon backward calls. B=2 H=16 D=128 bf16 causal, T = 1024 and 2048.
"""
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from host_overhead import _time
from gla.kernels.attention import flash, hopper_bwd, hopper

B, H, D = 2, 16, 128
for T in (1024, 2048):
    mk = lambda: torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    q, k, v, dout = mk(), mk(), mk(), mk()
    out, lse = flash.attention_forward(q, k, v, causal=True)
    for gluon in (False, True):
        flash.GLUON_BACKWARD = gluon
        host, wall = _time(lambda: flash.attention_backward(dout, q, k, v, out, lse, causal=True), 200)
        print(f"T={T} bwd {'gluon' if gluon else 'triton'}: host {host:.0f} us/call, wall {wall:.0f} us/call", flush=True)
    host, wall = _time(lambda: flash.attention_forward(q, k, v, causal=True), 200)
    print(f"T={T} fwd (gluon): host {host:.0f} wall {wall:.0f}")
    # pieces of the Gluon path
    delta = torch.empty(B, H, T, device="cuda"); dq_acc = torch.zeros(B, T, H, D, device="cuda").transpose(1, 2)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    host, wall = _time(lambda: hopper_bwd.attention_backward(q, k, v, dout, lse, delta, dq_acc, dk, dv, 0.088, True), 200)
    print(f"T={T} gluon kernel launch alone: host {host:.0f} wall {wall:.0f}")
    host, wall = _time(lambda: torch.zeros(B, T, H, D, device="cuda"), 200)
    print(f"T={T} torch.zeros dq_acc: host {host:.0f} wall {wall:.0f}")
    descs = lambda: [hopper._descriptor(x, r, checked=False) for x, r in ((k,128),(v,128),(q,64),(dout,64),(dq_acc,64),(dk,128),(dv,128))]
    t0 = time.perf_counter(); [descs() for _ in range(1000)]; print(f"7 unchecked descriptors: {(time.perf_counter()-t0)*1e3:.1f} us")
flash.GLUON_BACKWARD = True
pr = cProfile.Profile(); pr.enable()
for _ in range(300):
    flash.attention_backward(dout, q, k, v, out, lse, causal=True)
pr.disable(); torch.cuda.synchronize()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18); print(s.getvalue()[-4500:])
