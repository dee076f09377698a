"""GPU, model level: decoders under backend="gla" (three kernel choices) vs "inductor" vs eager.

    python benchmarks/model_gpu.py [out_dir]   # writes {out_dir}/model-<device>.md

Two models at Llama-1B-like widths (hidden 2048, 16 query / 4 kv heads of 128, FFN 5632, 4
layers, vocabulary 8192), bf16, B=2, T=2048 (``GLA_MODEL_T`` / ``GLA_MODEL_LAYERS`` change them):

* ``tiny_llama``: ``examples/tiny_llama.py``, attention hand-written the way model code writes it
  (RoPE, ``repeat_kv`` GQA, an ``arange`` causal mask added as finfo.min, fp32-upcast softmax, a
  sigmoid output gate from extra ``q_proj`` columns, SwiGLU);
* ``hf_llama``: transformers' ``LlamaForCausalLM`` from a config (random weights) with its default
  SDPA attention, no gate (skipped where transformers is missing).

Each backend compiles first (first call timed, with what gla rewrote), then inference (no grad)
and a training step (forward, cross-entropy, backward; grads set to None) are timed in
``ROUNDS`` interleaved rounds, each round in a rotated backend order, do_bench medians per
round; the table gives the median round and the spread (max/min − 1). A kernel-time breakdown of
one training step per backend (torch.profiler, CUDA kernels only) says where the GPU time goes.
Errors are relative to the same model in fp32 with SDPA's math kernel (the gradients: all
parameters' together, and the worst single tensor), copied right after the checked step's backward.

gla's rows: ``gla`` = ``kernels="auto"`` (the lowering picks per call: SDPA where it would run
cuDNN, gla's Triton kernels elsewhere); ``kernels=triton`` forces gla's kernels everywhere;
``kernels=pytorch`` lowers the same verified rewrites without Triton (SDPA for attention, the gate
and GLU as PyTorch ops that Inductor fuses).

``GLA_MODEL_SET`` picks the backends (``BACKEND_SETS``): ``kernels`` (the default, above),
``cudagraphs`` (inductor and gla with and without CUDA graphs: Inductor's
``mode="reduce-overhead"``, gla's option ``inductor_mode``; at short sequences the host, not the
GPU, sets the pace) or ``glu`` (GLU sites as gla's op or left to Inductor); other sets write
``model-<set>-t<T>-<device>.md``.
``GLA_MODEL_MODELS=tiny_llama`` (or ``hf_llama``) runs one model. ``GLA_MODEL_AMP=1`` keeps the
weights in fp32 and runs every call under ``torch.autocast("cuda", torch.bfloat16)`` (mixed-precision
training as most training scripts write it); it writes ``model-amp-<set>-t<T>-<device>.md``.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from results_io import out_dir_arg, require_cuda, write_table

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

from gla.config import FAMILIES  # noqa: E402

B = 2
T = int(os.environ.get("GLA_MODEL_T", "2048"))
LAYERS = int(os.environ.get("GLA_MODEL_LAYERS", "4"))
ROUNDS = int(os.environ.get("GLA_MODEL_ROUNDS", "5"))
AMP = os.environ.get("GLA_MODEL_AMP", "0") == "1"
WEIGHTS = torch.float32 if AMP else torch.bfloat16  # under AMP autocast picks each op's dtype
DEVICE = "cuda"
_NO_GLU = [f for f in FAMILIES if f != "glu"]  # every pattern family but GLU
BACKEND_SETS = {  # name -> torch.compile keywords; None = eager
    # the default: gla's three kernel choices
    "kernels": {
        "eager": None,
        "inductor": dict(backend="inductor"),
        "gla": dict(backend="gla"),
        "gla kernels=triton": dict(backend="gla", options={"kernels": "triton"}),
        "gla kernels=pytorch": dict(backend="gla", options={"kernels": "pytorch"}),
    },
    # with and without CUDA graphs (Inductor's "reduce-overhead"; gla's option inductor_mode)
    "cudagraphs": {
        "eager": None,
        "inductor": dict(backend="inductor"),
        "inductor reduce-overhead": dict(backend="inductor", mode="reduce-overhead"),
        "gla": dict(backend="gla"),
        "gla reduce-overhead": dict(backend="gla", options={"inductor_mode": "reduce-overhead"}),
        "gla kernels=triton reduce-overhead": dict(
            backend="gla", options={"kernels": "triton", "inductor_mode": "reduce-overhead"}),
    },
    # GLU sites as gla's op or left to Inductor's own fusion
    "glu": {
        "eager": None,
        "inductor": dict(backend="inductor"),
        "gla": dict(backend="gla"),
        "gla no GLU rewrite": dict(backend="gla", options={"patterns": _NO_GLU}),
        "gla kernels=pytorch": dict(backend="gla", options={"kernels": "pytorch"}),
    },
}
SET = os.environ.get("GLA_MODEL_SET", "kernels")
BACKENDS = BACKEND_SETS[SET]
CATEGORIES = (  # kernel-name fragments, first match wins
    ("gla attention", ("_attn_",)),
    ("SDPA attention", ("fmha", "flash", "sdpa", "cudnn", "attention")),
    ("gla GLU", ("_glu",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
    ("Inductor Triton", ("triton_",)),
)


def tiny_llama():
    from tiny_llama import TinyLlama, TinyLlamaConfig
    torch.manual_seed(0)
    cfg = TinyLlamaConfig(vocab_size=8192, hidden=2048, layers=LAYERS, heads=16, kv_heads=4,
                          ffn=5632, gated_attention=True)
    return TinyLlama(cfg).to(device=DEVICE, dtype=WEIGHTS), cfg.vocab_size


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=LAYERS, num_attention_heads=16, num_key_value_heads=4,
                      max_position_embeddings=max(4096, T), attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device=DEVICE, dtype=WEIGHTS)

    class Logits(torch.nn.Module):  # the same call signature as tiny_llama: ids -> logits
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits
    return Logits(model), cfg.vocab_size


def raise_recompile_limits() -> None:
    """Five backends x (inference, training) graphs of one forward: keep Dynamo from falling back."""
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)


def _category(kernel: str) -> str:
    low = kernel.lower()
    for name, parts in CATEGORIES:
        if any(p in low for p in parts):
            return name
    return "other"


def _breakdown(step) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """GPU ms per category and the five longest kernels of one step (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]  # (CPU: smoke runs)
    with profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            per_kernel[e.name] += e.device_time_total / 1e3
    cats: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        cats[_category(name)] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:5]
    return dict(cats), top


def _amp(fn):
    """``fn`` under bf16 autocast when ``GLA_MODEL_AMP=1`` (else ``fn`` itself)."""
    if not AMP:
        return fn

    def call(*args):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(*args)
    return call


def bench_model(label: str, build, bench) -> list[str]:
    from gla.report import collect
    from gla.testing import rel_rms_error

    model, vocab = build()
    ids = torch.randint(0, vocab, (B, T + 1), device=DEVICE)
    x, y = ids[:, :-1], ids[:, 1:]

    def train_step(fn, m=model, keep=False):
        def step():
            torch.compiler.cudagraph_mark_step_begin()  # (a no-op without CUDA graphs)
            logits = fn(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            # copies, taken before the grads are dropped (keep: the step whose grads are checked)
            grads = [p.grad.detach().float().clone() for p in m.parameters()] if keep else None
            m.zero_grad(set_to_none=True)
            return loss.detach(), grads
        return step

    # The reference: the same weights in fp32, SDPA's math kernel (what every bf16 row is held to)
    ref_model = copy.deepcopy(model).float()
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = ref_model(x)
    with sdpa_kernel([SDPBackend.MATH]):
        ref_loss, ref_grads = train_step(ref_model, ref_model, keep=True)()
    del ref_model
    fns, info, counts = {}, {}, {}
    for name, spec in BACKENDS.items():  # compile everything first, then time interleaved
        fn = _amp(model if spec is None else torch.compile(model, **spec))
        with torch.no_grad():
            t0 = time.perf_counter()
            with collect() as report:
                out = fn(x)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            err = rel_rms_error(out, ref)  # now: a CUDA graph's output is overwritten by its next run
        step = train_step(fn)
        t0 = time.perf_counter()
        with collect() as train_report:
            loss, grads = train_step(fn, keep=True)()
        torch.cuda.synchronize()
        first_train = time.perf_counter() - t0
        if spec is not None and spec["backend"] == "gla":
            counts[name] = ({k: v for k, v in report.counts.items() if v},
                            sorted({r.kernel for r in train_report.rewrites}))
        pairs = [(g.flatten(), r.flatten()) for g, r in zip(grads, ref_grads)]
        gerr = rel_rms_error(torch.cat([g for g, _ in pairs]), torch.cat([r for _, r in pairs]))
        worst = max(rel_rms_error(g, r) for g, r in pairs)
        info[name] = (first, err, first_train, gerr, worst, abs(loss - ref_loss).item())
        fns[name] = (fn, step)
        print(label, name, "compiled", info[name], flush=True)
    names = list(BACKENDS)
    infer, train = defaultdict(list), defaultdict(list)
    for r in range(ROUNDS):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, step = fns[name]
            with torch.no_grad():
                infer[name].append(bench(lambda: (torch.compiler.cudagraph_mark_step_begin(), fn(x))))
            train[name].append(bench(step))
        print(label, "round", r, {n: (round(infer[n][-1], 2), round(train[n][-1], 2)) for n in names},
              flush=True)
    med = lambda v: statistics.median(v)  # noqa: E731
    spread = lambda v: max(v) / min(v) - 1  # noqa: E731
    lines = [f"## {label}", ""]
    for name, (kinds, kernels) in counts.items():
        lines.append(f"- {name} rewrote {kinds}; training graph kernels: {'; '.join(kernels)}")
    lines += ["", "| backend | inference ms (spread) | vs eager | vs inductor | train step ms (spread) "
              "| vs eager | vs inductor | first call s | first step s | logits rel err vs fp32 "
              "| grads rel err vs fp32 (all / worst tensor) | loss diff vs fp32 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ie, ii = med(infer["eager"]), med(infer["inductor"])
    te, ti = med(train["eager"]), med(train["inductor"])
    for name in names:
        first, err, first_train, gerr, worst, dl = info[name]
        i, t = med(infer[name]), med(train[name])
        lines.append(f"| {name} | {i:.2f} ({spread(infer[name]):.0%}) | {ie / i:.2f}x | {ii / i:.2f}x | "
                     f"{t:.2f} ({spread(train[name]):.0%}) | {te / t:.2f}x | {ti / t:.2f}x | {first:.1f} | "
                     f"{first_train:.1f} | {err:.1e} | {gerr:.1e} / {worst:.1e} | {dl:.1e} |")
    cats = [c for c, _ in CATEGORIES] + ["other"]
    lines += ["", "GPU time of one training step by kernel kind (ms, torch.profiler):", "",
              "| backend | total | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
    tops = []
    for name in names:
        by, top = _breakdown(fns[name][1])
        lines.append(f"| {name} | {sum(by.values()):.2f} | "
                     + " | ".join(f"{by.get(c, 0.0):.2f}" for c in cats) + " |")
        tops.append(f"- {name}: " + "; ".join(f"`{k[:60]}` {ms:.2f}" for k, ms in top))
    lines += ["", "Longest kernels of that step (ms):", ""] + tops + [""]
    del fns
    torch.cuda.empty_cache()
    return lines


def run(out_dir: str) -> str:
    import triton
    from triton.testing import do_bench

    raise_recompile_limits()
    bench = lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))  # noqa: E731
    name = torch.cuda.get_device_name()
    precision = "fp32 weights under torch.autocast(bf16)" if AMP else "bf16"
    lines = [f"# Model level on {name}: backend gla vs inductor vs eager (backend set {SET!r})", "",
             f"torch {torch.__version__}, triton {triton.__version__}; hidden 2048, 16/4 heads of 128, "
             f"FFN 5632, {LAYERS} layers, vocab 8192; {precision}, B={B}, T={T}; {ROUNDS} interleaved rounds "
             "(rotated order), each a do_bench median; the table gives the median round and its "
             "spread (max/min - 1). `vs X` = X's time / this one's. benchmarks/model_gpu.py.", ""]
    models = [("tiny_llama (hand-written attention, gated, SwiGLU)", tiny_llama)]
    try:
        import transformers  # noqa: F401
        models.append((f"hf_llama (transformers {transformers.__version__} LlamaForCausalLM, SDPA "
                       "attention)", hf_llama))
    except ImportError:
        lines.append("(transformers is not installed here: hf_llama skipped)")
    only = os.environ.get("GLA_MODEL_MODELS")  # e.g. "tiny_llama": a subset, by builder name
    if only:
        models = [(label, build) for label, build in models if build.__name__ in only.split(",")]
    t0 = time.perf_counter()
    for label, build in models:
        lines += bench_model(label, build, bench)
        torch._dynamo.reset()
    lines.append(f"total benchmark time {time.perf_counter() - t0:.0f} s")
    text = "\n".join(lines) + "\n"
    stem = "model" if SET == "kernels" else f"model-{SET}-t{T}"
    if AMP:
        stem = f"model-amp-{SET}-t{T}"
    write_table(out_dir, stem, name, text)
    print(text)
    return text


def main(out_dir: str) -> str:
    require_cuda("model_gpu.py")
    return run(out_dir)


if __name__ == "__main__":
    main(out_dir_arg(sys.argv))
