"""Session 11: where the Gluon forward pays, through gla's launcher (flash.attention_forward).

For each shape: the Triton forward (GLUON off) and the Gluon forward (forced on), CUDA-graph replays
and eager calls, same process.
"""
import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from gla.kernels.attention import flash

SHAPES = [  # B, H, HK, TQ, TK, D, causal, gate
    (2, 16, 16, 256, 256, 128, True, None), (2, 16, 16, 512, 512, 128, True, None),
    (1, 8, 8, 512, 512, 128, True, None), (1, 8, 8, 2048, 2048, 128, True, None),
    (2, 16, 16, 512, 512, 64, True, None), (2, 16, 16, 1024, 1024, 64, True, None),
    (2, 16, 16, 2048, 2048, 64, True, None), (2, 16, 16, 4096, 4096, 64, True, None),
    (8, 32, 8, 1, 4096, 128, True, None), (8, 32, 8, 16, 4096, 128, True, None),
    (4, 32, 8, 128, 4096, 128, True, None), (4, 32, 8, 1024, 4096, 128, True, None),
    (2, 16, 16, 4096, 4096, 128, False, None), (2, 16, 16, 4096, 4096, 64, False, None),
    (2, 16, 4, 4096, 4096, 128, True, None), (2, 16, 4, 8192, 8192, 64, True, None),
    (2, 16, 16, 1024, 1024, 128, True, "elem"), (2, 16, 16, 4096, 4096, 128, True, "elem"),
    (2, 16, 16, 8192, 8192, 128, True, "elem"), (2, 16, 16, 4096, 4096, 64, True, "elem"),
    (2, 16, 16, 4096, 4096, 128, True, "head"), (2, 16, 16, 1024, 1024, 64, True, "elem"),
]


def main():
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print("bf16; flash.attention_forward with flash.GLUON off (triton) / on (gluon, gluon_pays "
          "forced); ms; graph = do_bench_cudagraph, eager = do_bench; ratio = triton / gluon")
    flash.gluon_pays = lambda *a: True
    for B, H, HK, TQ, TK, D, causal, gate in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa
        q = mk(B, TQ, H, D).transpose(1, 2)  # the projection's layout, as models give it
        k, v = mk(B, TK, HK, D).transpose(1, 2), mk(B, TK, HK, D).transpose(1, 2)
        gt = None if gate is None else mk(B, TQ, H, D if gate == "elem" else 1).transpose(1, 2)
        res = {}
        outs = {}
        for name, on in (("triton", False), ("gluon", True)):
            flash.GLUON = on
            fn = lambda: flash.attention_forward(q, k, v, gt, causal=causal)  # noqa: E731
            outs[name] = fn()[0].float()
            res[name + " graph"] = do_bench_cudagraph(fn)
            res[name + " eager"] = do_bench(fn)
        diff = ((outs["gluon"] - outs["triton"]).pow(2).mean().sqrt()
                / outs["triton"].pow(2).mean().sqrt()).item()
        print(f"B={B} H={H}/{HK} Tq={TQ} Tk={TK} D={D} causal={causal} gate={gate}: "
              + "  ".join(f"{n} {t:.4f}" for n, t in res.items())
              + f"  ratio graph {res['triton graph'] / res['gluon graph']:.2f}"
              f" eager {res['triton eager'] / res['gluon eager']:.2f}  rel diff {diff:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
