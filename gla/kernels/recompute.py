"""Re-enabling autograd inside a custom op's body, for backward ops that recompute their forward.

The ``torch.library`` machinery excludes the autograd dispatch keys while an op body runs; a
reference/SDPA backward that differentiates its own forward with torch autograd needs them back.
"""
import contextlib

import torch


@contextlib.contextmanager
def autograd_reenabled():
    """Grad mode plus the autograd dispatch keys, for the duration of the block."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        with torch.enable_grad():
            yield


def owned_grads(inputs, grads):
    """Gradients as fresh tensors (zeros where autograd gave None): a custom op's outputs may not
    alias its inputs or each other."""
    out = []
    for t, g in zip(inputs, grads):
        buf = torch.empty_like(t)
        if g is None:
            buf.zero_()
        else:
            buf.copy_(g)
        out.append(buf)
    return out
