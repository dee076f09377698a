"""GPU: the attention backward with the GQA group of the dK/dV kernel split over 1, 2, 4, 8
programs (``flash.DKDV_SPLIT``), causal bf16, B=2, 16 query heads over 4 or 2 kv heads,
D = 128 / 64, T = 512 … 8192.

    python benchmarks/run.py attention_dkdv_split   # writes results/attention-dkdv-split-<device>.md

Per line: GPU time of the whole backward (preprocess, dK/dV [+ the partial sum], dQ) from
CUDA-graph replays, wall time of eager calls (host included), and the gradients' difference from
split 1. ``(auto)`` marks what ``flash.dkdv_split`` picks.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_io import out_dir_arg, require_cuda, write_table  # noqa: E402


def main(out_dir: str) -> str:
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    from gla.kernels.attention import flash
    from gla.testing import rel_rms_error

    require_cuda("attention_dkdv_split.py")
    name = torch.cuda.get_device_name()
    lines = [f"# dK/dV with the GQA group split over programs on {name}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; causal bf16, B=2, 16 query "
             "heads. gpu: CUDA-graph replay of the whole backward; wall: eager calls (host "
             "included); two alternating rounds, min; `(auto)`: flash.dkdv_split's pick.", ""]
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    B, H = 2, 16
    for HK in (4, 2):
        for D in (128, 64):
            for T in (512, 1024, 2048, 4096, 8192):
                mk = lambda h: torch.randn(B, T, h, D, device="cuda",  # noqa: E731
                                           dtype=torch.bfloat16).transpose(1, 2)
                q, k, v, do = mk(H), mk(HK), mk(HK), mk(H)
                out, lse = flash.attention_forward(q, k, v, causal=True)
                programs = triton.cdiv(T, 64) * B * HK
                flash.DKDV_SPLIT = None
                auto = flash.dkdv_split(H // HK, programs, q.device)
                rows: dict[int, list] = {}
                for _ in range(2):  # two rounds, alternating
                    for split in (s for s in (1, 2, 4, 8) if s <= H // HK):
                        flash.DKDV_SPLIT = split
                        f = lambda: flash.attention_backward(do, q, k, v, out, lse,  # noqa: E731
                                                             causal=True)
                        grads = f()
                        rows.setdefault(split, []).append(
                            (do_bench_cudagraph(f, rep=100),
                             do_bench(f, warmup=25, rep=100, return_mode="median"), grads))
                base = min(r[0] for r in rows[1])
                for split, res in rows.items():
                    gpu, wall = min(r[0] for r in res), min(r[1] for r in res)
                    diff = [rel_rms_error(a, b) for a, b in zip(res[0][2][:3], rows[1][0][2][:3])]
                    lines.append(f"- HK={HK} group={H // HK} D={D} T={T} programs={programs} "
                          f"({programs / n_sm:.1f}/SM) split={split}{' (auto)' if split == auto else ''}: "
                          f"gpu {gpu * 1e3:7.1f} us (x{base / gpu:.3f} vs split 1)  wall "
                          f"{wall * 1e3:7.1f} us  diff vs split 1 dq/dk/dv "
                          + "/".join(f"{e:.0e}" for e in diff))
                    print(lines[-1], flush=True)
    flash.DKDV_SPLIT = None
    text = "\n".join(lines) + "\n"
    write_table(out_dir, "attention-dkdv-split", name, text)
    return text


if __name__ == "__main__":
    main(out_dir_arg(sys.argv))
