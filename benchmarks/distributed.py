"""Distributed training with backend="gla" (issue 8): DDP and FSDP2 on ≥2 CUDA GPUs.

    torchrun --nproc-per-node 2 benchmarks/distributed.py [--out DIR] [--steps 300] ...
    main(out_dir) -> str     # re-launches itself under torchrun on 2 GPUs (main(..., nproc=N) for
                             # more), returns the table and writes {out_dir}/distributed-<device>.md
                             # (and .json with every loss)

A Llama-style model (examples/tiny_llama.py scaled up: hidden 1024, 8 layers, 16 heads / 4 KV heads,
SwiGLU 2816, gated attention, vocab 8192), bf16 parameters, AdamW, T=1024, batch 8 per GPU, trained
for ``--steps`` steps on a learnable synthetic stream (a fixed random Markov chain with 4 successors
per token: the loss falls from ln 8192 ≈ 9.0 towards ln 4 ≈ 1.4). Each rank draws its own data; every
backend sees the same batches from the same initial weights.

For each wrapper (DDP — Dynamo's DDPOptimizer splits the graph per 25 MB bucket and calls the backend
per bucket — and FSDP2, ``fully_shard`` per block and on the root) it trains with
``eager`` (no compile), ``gla`` (backend="gla", inner Inductor, Triton kernels) and ``inductor``,
and reports:
- loss curves of gla and inductor against eager: the largest |Δloss| over the first 20 steps, and the
  mean loss over the last 10% of steps (bf16 training is chaotic over hundreds of steps; the curves
  must stay within ``--tol`` relative of eager's: PASS/FAIL in the table, exit status 1 on a FAIL);
- median step time after ``--warmup`` steps (forward, backward, optimizer; synchronized), tokens/s
  over all ranks, and ratios against eager and against inductor;
- time to the first step (compile), and gla's rewrite counts (``counters["gla"]``) on rank 0.

Without ≥2 CUDA GPUs it raises. ``GLA_DIST_BENCH_CPU_SMOKE=1`` runs a tiny configuration on the CPU
over gloo with inner="aot_eager" — only to smoke-test this script's logic; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

SMOKE = os.environ.get("GLA_DIST_BENCH_CPU_SMOKE") == "1"
BACKENDS = ("eager", "gla", "inductor")
MODES = ("ddp", "fsdp2")


def _require_gpus(n: int = 2) -> int:
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < n and not SMOKE:
        raise RuntimeError(f"benchmarks/distributed.py needs at least {n} CUDA GPUs (NCCL, one process per GPU); "
                           f"this machine has {have}. Run it on a multi-GPU machine, e.g. "
                           f"`torchrun --nproc-per-node 2 benchmarks/distributed.py`.")
    return have


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the step-time median")
    ap.add_argument("--batch", type=int, default=8, help="sequences per GPU")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--tol", type=float, default=0.02, help="relative tolerance on the late mean loss")
    ap.add_argument("--early-tol", type=float, default=5e-2,
                    help="largest |Δloss| allowed over the first 20 steps (same weights, kernel rounding only)")
    args = ap.parse_args(argv)
    if "eager" not in args.backends:
        args.backends = ["eager"] + list(args.backends)  # the reference
    if SMOKE:
        args.batch, args.seq, args.hidden, args.layers = 2, 32, 64, 2
        args.steps, args.warmup = min(args.steps, 6), min(args.warmup, 2)
    return args


# ------------------------------------------------------------------------------------------- worker
def _config(args):
    from tiny_llama import TinyLlamaConfig

    heads = max(4, args.hidden // 64)
    vocab = 256 if SMOKE else 8192
    return TinyLlamaConfig(vocab_size=vocab, hidden=args.hidden, layers=args.layers, heads=heads,
                           kv_heads=max(1, heads // 4), ffn=int(args.hidden * 2.75) // 64 * 64 or 64,
                           gated_attention=True)


def _data(cfg, args, rank: int, device) -> torch.Tensor:
    """[steps, batch, seq+1] token ids from a fixed random Markov chain (the same chain on every rank,
    different walks per rank)."""
    chain = torch.randint(0, cfg.vocab_size, (cfg.vocab_size, 4), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1000 + rank)
    n = args.steps * args.batch
    tok = torch.randint(0, cfg.vocab_size, (n,), generator=g)
    seqs = [tok]
    for _ in range(args.seq):
        tok = chain[tok, torch.randint(0, 4, (n,), generator=g)]
        seqs.append(tok)
    return torch.stack(seqs, 1).view(args.steps, args.batch, args.seq + 1).to(device)


def _build(cfg, mode: str, backend: str, device, dtype, args):
    import torch.distributed as dist
    from tiny_llama import TinyLlama

    torch.manual_seed(0)
    model = TinyLlama(cfg).to(device=device, dtype=dtype)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # older layouts
            from torch.distributed._composable.fsdp import fully_shard
        for blk in model.blocks:
            fully_shard(blk)
        fully_shard(model)
        wrapped = model
    if backend == "gla":
        opts = {"inner": "aot_eager"} if SMOKE else {}
        wrapped = torch.compile(wrapped, backend="gla", options=opts)
    elif backend == "inductor":
        wrapped = torch.compile(wrapped, backend="aot_eager" if SMOKE else "inductor")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    dist.barrier()
    return model, wrapped, opt


def _train(cfg, mode: str, backend: str, data: torch.Tensor, device, dtype, args) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, wrapped, opt = _build(cfg, mode, backend, device, dtype, args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses, times = [], []
    t_start = time.perf_counter()
    first_step_s = None
    for step in range(args.steps):
        ids = data[step]
        sync()
        t0 = time.perf_counter()
        logits = wrapped(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach())
        if first_step_s is None:
            first_step_s = time.perf_counter() - t_start
    losses = [x.item() for x in losses]
    # losses of all ranks, averaged: the global training loss
    tl = torch.tensor(losses, device=device, dtype=torch.float64)
    dist.all_reduce(tl)
    tl /= dist.get_world_size()
    step_ms = statistics.median(times[args.warmup:] or times) * 1e3
    out = {"losses": tl.tolist(), "step_ms": step_ms, "first_step_s": first_step_s,
           "gla": dict(counters["gla"]) if backend == "gla" else {},
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0}
    del model, wrapped, opt
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    return out


def _compare(ref: list[float], got: list[float], tol: float, early_tol: float) -> dict:
    n = len(ref)
    k = max(1, n // 10)
    early = max(abs(a - b) for a, b in zip(got[:20], ref[:20]))
    late_ref, late_got = sum(ref[-k:]) / k, sum(got[-k:]) / k
    rel = abs(late_got - late_ref) / abs(late_ref)
    return {"early_max_abs": early, "late_ref": late_ref, "late": late_got, "late_rel": rel,
            "ok": rel <= tol and early <= early_tol}


def run(args) -> str | None:
    import datetime

    import torch.distributed as dist

    if SMOKE:
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if SMOKE:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    else:
        _require_gpus()
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(seconds=900))
    try:
        dtype = getattr(torch, args.dtype)
        cfg = _config(args)
        data = _data(cfg, args, rank, device)
        results: dict[str, dict[str, dict]] = {}
        for mode in args.modes:
            results[mode] = {}
            for backend in args.backends:
                if rank == 0:
                    print(f"[distributed] {mode} / {backend}: {args.steps} steps", flush=True)
                results[mode][backend] = _train(cfg, mode, backend, data, device, dtype, args)
        if rank != 0:
            return None
        text = _table(results, cfg, args, world, device)
        os.makedirs(args.out, exist_ok=True)
        name = "cpu-smoke" if SMOKE else torch.cuda.get_device_name(device).lower().replace(" ", "-")
        path = os.path.join(args.out, f"distributed-{name}.md")
        with open(path, "w") as f:
            f.write(text)
        with open(os.path.join(args.out, f"distributed-{name}.json"), "w") as f:
            json.dump({"args": vars(args), "world": world, "results": results}, f)
        print(text, flush=True)
        return text
    finally:
        dist.destroy_process_group()


def _table(results, cfg, args, world, device) -> str:
    import triton

    from tiny_llama import TinyLlama

    with torch.device("meta"):
        params = sum(p.numel() for p in TinyLlama(cfg).parameters())
    dev = "CPU (smoke test, gloo)" if SMOKE else torch.cuda.get_device_name(device)
    tokens = args.batch * args.seq * world
    lines = [f"# Distributed training, backend=\"gla\" vs eager vs inductor — {world} × {dev}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; TinyLlama hidden {cfg.hidden}, "
             f"{cfg.layers} layers, {cfg.heads}/{cfg.kv_heads} heads, ffn {cfg.ffn}, vocab {cfg.vocab_size} "
             f"({params / 1e6:.1f}M parameters), {args.dtype}, AdamW lr {args.lr}, batch {args.batch}×{args.seq} "
             f"per GPU, {args.steps} steps (step time: median after {args.warmup}).", "",
             "| wrapper | backend | loss step 0 | late mean loss | Δ late vs eager | max abs Δ, first 20 | loss check "
             "| step ms | tokens/s | vs eager | vs inductor | first step s | peak GiB | gla rewrites |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failed = False
    for mode, by in results.items():
        ref = by["eager"]
        for backend, r in by.items():
            if backend == "eager":
                cmp = _compare(ref["losses"], ref["losses"], args.tol, args.early_tol)
                check, d_late, early = "reference", "—", "—"
            else:
                cmp = _compare(ref["losses"], r["losses"], args.tol, args.early_tol)
                failed |= not cmp["ok"]
                check = "PASS" if cmp["ok"] else "**FAIL**"
                d_late, early = f"{cmp['late_rel']:.2%}", f"{cmp['early_max_abs']:.2e}"
            vs_ind = (f"{by['inductor']['step_ms'] / r['step_ms']:.2f}×" if "inductor" in by else "—")
            rewrites = ", ".join(f"{k}={v}" for k, v in r["gla"].items() if v) or "—"
            lines.append(f"| {mode} | {backend} | {r['losses'][0]:.4f} | {cmp['late']:.4f} | {d_late} | {early} | "
                         f"{check} | {r['step_ms']:.1f} | {tokens / r['step_ms'] * 1e3:,.0f} | "
                         f"{ref['step_ms'] / r['step_ms']:.2f}× | {vs_ind} | {r['first_step_s']:.1f} | "
                         f"{r['peak_gib']:.1f} | {rewrites} |")
    lines += ["", "Speed ratios are speed-ups (>1 is faster). Loss check: late mean loss within "
              f"{args.tol:.0%} of eager's and every |Δloss| over the first 20 steps ≤ {args.early_tol:.0e}.",
              f"Overall: {'FAIL' if failed else 'PASS'}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- entry
def main(out_dir: str, extra_args: list[str] | None = None, nproc: int | None = None) -> str:
    """Launch this file under torchrun (one process per GPU; 2 unless ``nproc``) and return the table."""
    have = _require_gpus(nproc or 2)
    n = nproc or 2
    if n > have and not SMOKE:
        raise RuntimeError(f"nproc={n} but only {have} CUDA GPUs are visible")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "examples"),
                                                       os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           os.path.abspath(__file__), "--out", out_dir, *(extra_args or [])]
    print("[distributed]", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, timeout=3600)
    name = "cpu-smoke" if SMOKE else torch.cuda.get_device_name(0).lower().replace(" ", "-")
    path = os.path.join(out_dir, f"distributed-{name}.md")
    text = open(path).read() if os.path.exists(path) else ""
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}" + (f"; partial table:\n{text}" if text else ""))
    return text


if __name__ == "__main__":
    if "RANK" not in os.environ:  # plain `python benchmarks/distributed.py`: launch torchrun ourselves
        a = _args()
        main(a.out, sys.argv[1:])  # rank 0 prints the table
        sys.exit(0)
    a = _args()
    text = run(a)
    sys.exit(1 if text is not None and "Overall: FAIL" in text else 0)
