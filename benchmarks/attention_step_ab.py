"""Eager attention training steps of two or more versions of gla side by side, in one process
(host-bound shapes: T <= 2048), with SDPA (+ a separate gate) as the baseline.

    python benchmarks/attention_step_ab.py OUT_DIR [--tag TAG] [--rounds N]
        [--cases D:T[:gated],...] NAME=DIR ... [this] [this:triton-forward]
    # writes OUT_DIR/attention-step-ab-<device>[-TAG].md

Each ``NAME=DIR`` is a directory holding a copy of the ``gla`` package renamed ``NAME`` (e.g.
``git archive REV gla | tar -x -C DIR && mv DIR/gla DIR/gla_before``: the package imports
itself relatively, so a renamed copy runs side by side with this checkout's); ``this`` adds this
checkout's ``gla``, and ``this:triton-forward`` the same with ``flash.GLUON = False`` (the
Triton forward where the Hopper one would run). Versions compile the same Triton sources, so
they share Triton's cache.

Per case (B=2, H=16, bf16, causal): ``gated_attention(...).backward(do)`` with the gradients set
to None first, as do_bench (the attention table's timer) and host µs per call without a sync;
every version measured once per round, rounds alternated, the median of the rounds reported,
with each version's ratio to SDPA's step.
"""
from __future__ import annotations

import importlib
import os
import statistics
import sys

import torch
from attention_step_host import B, H, training_case
from host_overhead import _time
from results_io import require_cuda, write_table

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CASES = [(128, 1024, False), (128, 1024, True), (128, 2048, True), (64, 2048, True)]
ROUNDS = 5


def _versions(specs: list[str]) -> list[tuple[str, object, object]]:
    """(label, gated_attention, flash module, forward-on-Triton flag) per spec."""
    out = []
    for spec in specs:
        if spec.startswith("this"):
            package, label = "gla", spec
        else:
            package, path = spec.split("=", 1)
            sys.path.insert(0, os.path.abspath(path))
            label = package
        op = importlib.import_module(package + ".kernels.attention.op")
        flash = importlib.import_module(package + ".kernels.attention.flash")
        out.append((label, op.gated_attention, flash, spec == "this:triton-forward"))
    return out


def _do_bench(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def run(out_dir: str, specs: list[str], tag: str | None, rounds: int = ROUNDS,
        cases=CASES) -> str:
    import triton
    versions = _versions(specs)
    lines = []
    for d, t, gated in cases:
        q, k, v, g, do, clear, sdpa_step = training_case(d, t, gated)

        def gla_step(fn, flash, triton_forward):
            def step():
                clear()
                before = flash.GLUON
                flash.GLUON = before and not triton_forward
                try:
                    fn(q, k, v, gate=g, causal=True, impl="triton").backward(do)
                finally:
                    flash.GLUON = before
            return step

        steps = [("sdpa" + (" + gate" if gated else ""), sdpa_step)] + [
            (label, gla_step(fn, flash, tf)) for label, fn, flash, tf in versions]
        results = {name: ([], []) for name, _ in steps}
        for _ in range(rounds):
            for name, step in steps:
                results[name][0].append(_do_bench(step))
                results[name][1].append(_time(step)[0])
        base = statistics.median(results[steps[0][0]][0])
        tag_line = f"D={d} T={t}{' gated' if gated else ''}"
        print(tag_line, flush=True)
        lines += [f"## {tag_line}", "", "| step | do_bench ms | host µs (no sync) | "
                  "SDPA's do_bench / this |", "|---|---|---|---|"]
        for name, _ in steps:
            ms = statistics.median(results[name][0])
            us = statistics.median(results[name][1])
            lines.append(f"| {name} | {ms:.3f} | {us:.1f} | {base / ms:.2f}x |")
        lines.append("")
    name = torch.cuda.get_device_name()
    text = "\n".join([f"# Eager attention training steps, versions side by side, on {name} "
                      f"(torch {torch.__version__}, triton {triton.__version__})", "",
                      f"benchmarks/attention_step_ab.py {' '.join(specs)}; B={B} H={H} bf16 "
                      f"causal; medians of {rounds} alternated rounds (do_bench median with "
                      "its L2 flush; host µs per call without a sync).", "", *lines])
    stem = "attention-step-ab" + (f"-{tag}" if tag else "")
    write_table(out_dir, stem, name, text + "\n")
    print(text)
    return text


def _option(argv: list[str], name: str):
    """The value after ``name`` in ``argv`` (both removed), or None."""
    if name not in argv:
        return None
    i = argv.index(name)
    value = argv[i + 1]
    del argv[i:i + 2]
    return value


if __name__ == "__main__":
    require_cuda("attention_step_ab.py")
    argv = sys.argv[1:]
    tag, rounds, cases = (_option(argv, n) for n in ("--tag", "--rounds", "--cases"))
    if cases is not None:
        cases = [(int(c.split(":")[0]), int(c.split(":")[1]), c.endswith(":gated"))
                 for c in cases.split(",")]
    run(argv[0], argv[1:], tag, int(rounds or ROUNDS), cases or CASES)
