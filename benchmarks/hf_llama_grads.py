"""GPU check, one fresh process: transformers' Llama (SDPA attention, ``model_gpu.py``'s widths) —
each path's bf16 training gradients against the same model in fp32 with SDPA's math kernel, same
weights and tokens: eager under each SDPA backend, then every compiled backend of model_gpu.py.

    python benchmarks/hf_llama_grads.py     # prints one line per path
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_gpu  # noqa: E402  (the model, its sizes, the recompile limits)
from results_io import require_cuda  # noqa: E402

EAGER_BACKENDS = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def main() -> None:
    from gla.testing import rel_rms_error

    require_cuda("hf_llama_grads.py")
    model_gpu.raise_recompile_limits()
    model, vocab = model_gpu.hf_llama()
    ref_model = copy.deepcopy(model).float()
    ids = torch.randint(0, vocab, (model_gpu.B, model_gpu.T + 1), device="cuda")
    x, y = ids[:, :-1], ids[:, 1:]

    def grads_of(fn, m):
        loss = F.cross_entropy(fn(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        grads = [p.grad.detach().float().clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        return loss.item(), grads

    with sdpa_kernel([SDPBackend.MATH]):
        ref_loss, ref = grads_of(ref_model, ref_model)
    names = [n for n, _ in model.named_parameters()]
    flat_ref = torch.cat([r.flatten() for r in ref])

    def report(tag, loss, grads):
        every = rel_rms_error(torch.cat([g.flatten() for g in grads]), flat_ref)
        worst = sorted(((rel_rms_error(g, r), n) for g, r, n in zip(grads, ref, names)), reverse=True)[:3]
        print(f"{tag:28s} loss {loss:.5f} (fp32 {ref_loss:.5f})  grads rel err all {every:.2e}  worst "
              + ", ".join(f"{e:.2e} {n}" for e, n in worst), flush=True)

    report("eager bf16", *grads_of(model, model))
    for name, backend in EAGER_BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                report(f"eager {name} bf16", *grads_of(model, model))
        except RuntimeError as e:
            print(f"eager {name}: not runnable: {str(e).splitlines()[0][:120]}")
    for tag, spec in model_gpu.BACKENDS.items():
        if spec is not None:  # eager was timed above, under each SDPA backend
            report(tag, *grads_of(torch.compile(model, backend=spec[0], options=spec[1]), model))


if __name__ == "__main__":
    main()
