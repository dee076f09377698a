"""Time gla's passes (canonicalize + match + legality, no verification) on 8- and 32-layer graphs."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def main(out_dir: str) -> str:
    from tiny_llama import TinyLlama, TinyLlamaConfig

    import gla
    from gla.config import Config
    from gla.pipeline import rewrite_graph

    gla.registered_patterns()  # trace the built-in patterns once, outside the timing
    rows = ["| layers | graph nodes | gla passes (ms) | ms per 1,000 nodes | rewrites |", "|---|---|---|---|---|"]
    for layers in (1, 8, 32):  # the 1-layer row carries one-time costs (kernel module imports)
        torch._dynamo.reset()
        graphs = []
        model = TinyLlama(TinyLlamaConfig(layers=layers, hidden=64, ffn=96)).eval()
        torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm)(torch.randint(0, 100, (1, 16)))
        gm = graphs[0]
        nodes = len(gm.graph.nodes)
        t0 = time.perf_counter()
        report = rewrite_graph(gm, Config(verify="off", inner="eager"))
        ms = (time.perf_counter() - t0) * 1e3
        rows.append(f"| {layers} | {nodes} | {ms:.1f} | {ms / nodes * 1e3:.1f} | {len(report.rewrites)} |")
    table = "\n".join([f"# gla matching time (CPU, torch {torch.__version__}, verify off)", ""] + rows)
    with open(os.path.join(out_dir, "matching-cpu.md"), "w") as f:
        f.write(table + "\n")
    return table
