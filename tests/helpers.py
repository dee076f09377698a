"""Shared test helpers: compile with gla and compare with eager."""
import torch

import gla

FAST = {"inner": "aot_eager"}


def run_gla(fn, *args, options=None, grad=False):
    """(report, compiled output, eager output[, grads]) for fn(*args) under backend='gla'."""
    opts = dict(FAST, **(options or {}))
    with torch.set_grad_enabled(grad):
        report = gla.explain(fn, *args, options=opts)
        torch._dynamo.reset()
        from gla.backend import gla_backend
        import functools
        compiled = torch.compile(fn, backend=functools.partial(gla_backend, options=opts), fullgraph=True)
        out = compiled(*args)
        ref = fn(*args)
    return report, out, ref
