"""GPU: chunk_gla fwd+bwd time and bf16 accuracy for dot-precision settings (GLA_LINEAR_DOT).

    python benchmarks/linear_attention_dots.py OUT_DIR
"""
import os
import sys

import torch
import torch.nn.functional as F
import triton


def main(out_dir: str) -> str:
    from gla.kernels.linear_attention import chunk_gla, gla_recurrent_reference
    from gla.testing import rel_rms_error

    settings = ["", "bh=native,dh=native,dqk=native", "native"]
    lines = [f"# chunk_gla dot precision, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}, bf16 B=2 H=16 K=V=128", "",
             "| GLA_LINEAR_DOT | worst rel RMS (o, dq, dk, dv, dg) T=1000 | fwd+bwd ms T=4096 | fwd+bwd ms T=16384 |",
             "|---|---|---|---|"]
    g0 = torch.Generator(device="cuda").manual_seed(0)
    for setting in settings:
        os.environ["GLA_LINEAR_DOT"] = setting
        q, k, v = (torch.randn(2, 1000, 16, 128, device="cuda", generator=g0) for _ in range(3))
        g = F.logsigmoid(torch.randn(2, 1000, 16, 128, device="cuda", generator=g0)) / 16
        ins = [t.bfloat16().requires_grad_() for t in (q, k, v, g)]
        o, _ = chunk_gla(*ins)
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, ins, do)
        ref_in = [t.detach().double().requires_grad_() for t in ins]
        ro, _ = gla_recurrent_reference(*ref_in)
        rgrads = torch.autograd.grad(ro, ref_in, do.double())
        worst = max([rel_rms_error(o, ro)] + [rel_rms_error(a, b) for a, b in zip(grads, rgrads)])
        times = []
        for t in (4096, 16384):
            xs = [torch.randn(2, t, 16, 128, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3)]
            gg = (F.logsigmoid(torch.randn(2, t, 16, 128, device="cuda")) / 16).bfloat16().requires_grad_()
            def step():
                out, _ = chunk_gla(*xs, gg)
                out.backward(torch.ones_like(out))
            times.append(triton.testing.do_bench(step, warmup=25, rep=100))
        lines.append(f"| `{setting or '(default)'}` | {worst:.2e} | {times[0]:.3f} | {times[1]:.3f} |")
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "linear_attention-dots.md"), "w") as f:
        f.write(table + "\n")
    return table


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "."))
