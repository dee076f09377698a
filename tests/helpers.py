"""Shared test helpers: compile with gla and compare with eager; masks as real models build them."""
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


def position_mask(positions, *, prepend_shift=1, index_shift=0, spelling="operators", chunk=0,
                  left_padding=None, key_chunk=None):
    """The causal mask transformers (5.x) builds from position ids ``[B, T]``: ``kv_pos <= q_pos``
    over ``positions[batch, q]`` / ``positions[batch, kv]``, and the packed-sequence ids
    ``cumsum(diff(positions) != 1)`` equal between query and key; additive, ``[B, 1, T, T]``.

    ``chunk``: Llama 4's chunked overlay as well, ``(kv_pos - pad) // chunk == (q_pos - pad) //
    chunk`` with ``pad = left_padding[batch]`` (integer zeros by default, as transformers makes
    them without a padding mask); ``key_chunk``: another divisor on the key side (a look-alike).

    ``spelling``: the comparisons and ``&`` as operators, as tensor methods (``a.__eq__(b)``, how
    torch 2.11's Dynamo records ``a == b`` inside transformers 5.17), or as ``torch.le``-style
    functions."""
    le, eq, and_ = {
        "operators": (lambda a, b: a <= b, lambda a, b: a == b, lambda a, b: a & b),
        "methods": (lambda a, b: a.__le__(b), lambda a, b: a.__eq__(b), lambda a, b: a.__and__(b)),
        "functions": (torch.le, torch.eq, torch.logical_and),
    }[spelling]
    b, t = positions.shape
    first = positions[:, :1] - prepend_shift
    packed = (torch.diff(positions, prepend=first, dim=-1) != 1).cumsum(-1)
    bi = torch.arange(b, device=positions.device)[:, None, None, None]
    qi = (torch.arange(t, device=positions.device) + index_shift)[None, None, :, None]
    ki = (torch.arange(t, device=positions.device) + index_shift)[None, None, None, :]
    allowed = qi.new_ones((), dtype=torch.bool)
    allowed = and_(allowed, le(positions[bi, ki], positions[bi, qi]).to(positions.device))
    allowed = and_(allowed, eq(packed[bi, qi], packed[bi, ki]).to(positions.device))
    if chunk:
        pad = torch.zeros(b, device=positions.device, dtype=int) if left_padding is None \
            else left_padding
        floordiv = (lambda a, c: a // c) if spelling == "operators" else \
            (lambda a, c: a.__floordiv__(c)) if spelling == "methods" else torch.floor_divide
        same = eq(floordiv(positions[bi, ki] - pad[bi], key_chunk or chunk),
                  floordiv(positions[bi, qi] - pad[bi], chunk))
        allowed = and_(allowed, same.to(positions.device))
    return torch.where(allowed.expand(b, -1, t, t), torch.zeros((), device=positions.device),
                       torch.finfo(torch.float32).min)
