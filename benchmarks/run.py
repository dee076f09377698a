"""Benchmarks: ``python benchmarks/run.py {attention|attention_choice|attention_chunked|attention_dkdv_split|attention_profile|cudnn_stale_plan|host_overhead|launch_cache|linear_attention|glu|model_gpu|cpu|matching|distributed} [--out DIR]``.

GPU benchmarks time gla's kernels side by side with their baselines in one run and write a table
(device, torch and triton versions, ratios) under ``benchmarks/results/``.
"""
import argparse
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

WHAT = ("attention", "attention_choice", "attention_chunked", "attention_dkdv_split", "attention_profile", "cudnn_stale_plan", "host_overhead", "launch_cache", "linear_attention", "glu", "model_gpu", "cpu", "matching", "distributed")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("what", choices=WHAT, nargs="+")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for what in args.what:
        module = importlib.import_module(what if what not in ("cpu", "matching") else f"{what}_bench")
        print(module.main(args.out))


if __name__ == "__main__":
    main()
