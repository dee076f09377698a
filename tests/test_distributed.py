"""Distributed training under backend="gla" (issue 8): DDP and FSDP2, two gloo processes on the CPU.

Each test starts two worker processes (this file run as a script, 127.0.0.1 only). Every rank trains
the same small TinyLlama (examples/tiny_llama.py) for a few SGD steps on its own data, first eagerly
and then compiled with backend="gla" (inner="aot_eager"), in the same process group and from the
same seed. The ranks write per-step losses, parameter updates, ``counters["gla"]``, gla's report
and the gla ops that ran in the last step (profiler) to a file; the parent asserts that the compiled
run matches the eager one in fp32 and that every block ran gla's rewrites.

- DDP: 1 MiB buckets (the least DDPOptimizer accepts: DDP's first bucket is 1 MiB) make Dynamo's
  DDPOptimizer split the graph at bucket boundaries and call the backend once per bucket subgraph.
- FSDP2: ``fully_shard`` on every block and on the root. FSDP2's hooks are not traced, so Dynamo
  compiles each block separately and the graphs see plain (unsharded) parameters.
- DTensors inside the graph (tensor parallelism): gla's ops have no sharding rules, so gla keeps
  the original subgraphs and reports why, instead of failing the compile.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time

if __name__ == "__main__":  # a worker: the same set-up as the suite's conftest, before triton loads
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    if shutil.which("nvidia-smi") is None:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORLD = 2
STEPS = 4
LAYERS = 2
WORKER_TIMEOUT_S = 120  # a hung collective must fail the test, not the suite

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


# ----------------------------------------------------------------------------------------------- worker
def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # pragma: no cover - older layouts
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _model():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from tiny_llama import TinyLlama, TinyLlamaConfig

    torch.manual_seed(0)
    # ~3 MB of fp32 parameters: DDPOptimizer needs buckets of at least 1 MiB (DDP's first bucket)
    cfg = TinyLlamaConfig(vocab_size=128, hidden=128, layers=LAYERS, heads=4, kv_heads=2, ffn=688)
    return TinyLlama(cfg)


def _batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    return [torch.randint(0, 128, (2, 17), generator=g) for _ in range(STEPS)]


def _train(kind: str, backend: str | None, rank: int) -> dict:
    """Train ``STEPS`` SGD steps: losses, parameter updates (full tensors), gla ops run in the last step."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    if kind == "ddp":
        # 1 MiB buckets (the least DDPOptimizer allows): about three, split inside the blocks, so
        # Dynamo's DDPOptimizer hands gla one subgraph per bucket
        wrapped = DDP(model, bucket_cap_mb=1)
    else:
        fully_shard = _fully_shard()
        for blk in model.blocks:
            fully_shard(blk)
        fully_shard(model)
        wrapped = model
    if backend is not None:
        wrapped = torch.compile(wrapped, backend=backend, options={"inner": "aot_eager"})
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses, ran = [], {}
    for step, ids in enumerate(_batches(rank)):
        # the last step runs under the profiler: which gla ops actually ran, and how often
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if step == STEPS - 1 \
                else contextlib.nullcontext() as prof:
            logits = wrapped(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
        if prof is not None:
            for e in prof.events():
                if e.name.startswith("gla::") or e.name.startswith("aten::_scaled_dot_product"):
                    ran[e.name] = ran.get(e.name, 0) + 1
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(loss.item())

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    update = {n: (full(p.detach()) - start[n]) for n, p in model.named_parameters()}
    return {"losses": losses, "update": update, "ran": ran}


def _dtensor(rank: int, world: int) -> dict:
    """Tensor-parallel attention (heads sharded) and a replicated SwiGLU: DTensors inside the graph."""
    import math

    import torch.nn.functional as F
    from torch._dynamo.utils import counters
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import gla

    mesh = init_device_mesh("cpu", (world,))

    def attention(q, k, v, g):
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        return torch.matmul(p, v) * torch.sigmoid(g)

    def swiglu(x, w1, w3):
        return F.silu(x @ w1) * (x @ w3)

    torch.manual_seed(0)
    cases = {"attention": (attention, [torch.randn(2, 4, 8, 16) for _ in range(4)], Shard(1)),
             "swiglu": (swiglu, [torch.randn(8, 16), torch.randn(16, 32), torch.randn(16, 32)], Replicate())}
    result = {}
    for name, (fn, args, placement) in cases.items():
        dargs = [distribute_tensor(t, mesh, [placement]).requires_grad_() for t in args]
        ref = fn(*dargs)
        ref_grads = torch.autograd.grad(ref.sum(), dargs)
        torch._dynamo.reset()
        counters.clear()
        with gla.report.collect() as report:
            out = torch.compile(fn, backend="gla", options={"inner": "aot_eager"})(*dargs)
        grads = torch.autograd.grad(out.sum(), dargs)
        result[name] = {"type": type(out).__name__, "report": str(report), "counters": dict(counters["gla"]),
                        "err": max(_rel(out.full_tensor(), ref.full_tensor()),
                                   *(_rel(a.full_tensor(), b.full_tensor()) for a, b in zip(grads, ref_grads)))}
    return result


def _worker(kind: str, rank: int, world: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from gla.report import collect

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=WORKER_TIMEOUT_S))
    try:
        if kind == "dtensor":
            torch.save(_dtensor(rank, world), os.path.join(out, f"rank{rank}.pt"))
            return
        t0 = time.perf_counter()
        result = {"eager": _train(kind, None, rank)}
        t1 = time.perf_counter()
        torch._dynamo.reset()
        counters.clear()
        with collect() as report:
            result["gla"] = _train(kind, "gla", rank)
        result["counters"] = dict(counters["gla"])
        result["graphs"] = report.graphs
        result["report"] = str(report)
        result["seconds"] = {"eager": t1 - t0, "gla": time.perf_counter() - t1}
        dist.barrier()
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- parent
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(kind: str, tmp_path) -> list[dict]:
    port = _free_port()
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, __file__, kind, str(r), str(WORLD), str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(WORLD)]
    logs = []
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{kind} workers did not finish in {WORKER_TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed (exit {p.returncode}):\n{log[-4000:]}"
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(WORLD)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(results: list[dict]) -> None:
    for r, res in enumerate(results):
        eager, compiled = res["eager"], res["gla"]
        for step, (a, b) in enumerate(zip(compiled["losses"], eager["losses"])):
            assert abs(a - b) <= 1e-5 * abs(b), f"rank {r} step {step}: loss {a} vs eager {b}"
        for n, ref in eager["update"].items():
            assert ref.norm() > 0, f"{n} never moved: the check would prove nothing"
            err = _rel(compiled["update"][n], ref)
            assert err <= 1e-4, f"rank {r}: update of {n} differs from eager by rel {err:.2e}"
        c = res["counters"]
        assert c.get("gated_attention", 0) >= 1 and c.get("glu", 0) >= 1, f"rank {r}: {c}\n{res['report']}"
        assert not c.get("near_miss"), f"rank {r}:\n{res['report']}"
        # every block ran the fused attention gla chose, forward and backward, in a training step
        # (on a CPU: PyTorch's SDPA kernels, with their own backward; on CUDA: gla::attention)
        ran = compiled["ran"]
        fwd = sum(n for name, n in ran.items() if "backward" not in name and "scaled_dot" in name)
        bwd = sum(n for name, n in ran.items() if "backward" in name and "scaled_dot" in name)
        assert fwd == LAYERS and bwd == LAYERS and not any(k.startswith("gla::") for k in ran), ran
        assert not eager["ran"]
    # the ranks saw different data but hold the same model: synchronized updates
    for n, u in results[0]["gla"]["update"].items():
        assert _rel(results[1]["gla"]["update"][n], u) <= 1e-6, n
    assert results[0]["gla"]["losses"] != results[1]["gla"]["losses"], "the ranks should see different data"


def test_ddp_matches_eager(tmp_path):
    results = _launch("ddp", tmp_path)
    _check(results)
    for res in results:
        # DDPOptimizer split the graph at bucket boundaries and called gla once per bucket subgraph;
        # together they hold every block's gated attention and SwiGLU, each rewritten once
        assert res["graphs"] >= 2, f"DDPOptimizer did not split the graph:\n{res['report']}"
        c = res["counters"]
        assert c.get("gated_attention") == LAYERS and c.get("glu") == LAYERS, f"{c}\n{res['report']}"


def test_fsdp2_matches_eager(tmp_path):
    # FSDP2's hooks are not traced: Dynamo breaks the graph at every fully_shard module, and the
    # blocks share one compiled graph (one rewrite per site, run by every block: `ran` counts them)
    results = _launch("fsdp2", tmp_path)
    _check(results)


def test_dtensor_inputs_keep_the_original(tmp_path):
    """gla's ops have no DTensor sharding rules: a graph that computes on DTensors (tensor
    parallelism) compiles, keeps the original subgraphs, and says why."""
    for r, res in enumerate(_launch("dtensor", tmp_path)):
        for name, case in res.items():
            assert case["type"] == "DTensor", (r, name, case)
            assert case["err"] <= 1e-6, (r, name, case["err"])
            assert sum(v for k, v in case["counters"].items() if k != "near_miss") == 0, case["report"]
            assert case["counters"].get("near_miss", 0) >= 1 and "DTensor" in case["report"], case["report"]


if __name__ == "__main__":
    _kind, _rank, _world, _port, _out = sys.argv[1:6]
    _worker(_kind, int(_rank), int(_world), int(_port), _out)
