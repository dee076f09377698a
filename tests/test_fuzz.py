"""Fuzzing: random attention / GLU / gate modules compiled with backend="gla" against eager.

Each example either rewrites the expected kind and matches eager, or leaves a near miss with a
reason and still matches eager: never a wrong result. Profiles (env ``HYPOTHESIS_PROFILE``):

* ``ci`` (default): a few hundred examples in all, derandomized, CPU-sized (~2 minutes on 2 cores);
* ``long``: 25× the examples, random seeds, larger shapes: for GPU machines,
  ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py``.

``GLA_FUZZ_SCALE=N`` multiplies the examples of either profile by N instead.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gla.testing import assert_rewrites  # noqa: E402
from helpers import position_mask  # noqa: E402

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", deadline=None, derandomize=True, suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile("long", deadline=None, derandomize=False, suppress_health_check=_HEALTH, print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    PROFILE = "ci"
LONG = PROFILE == "long"
SCALE = int(os.environ.get("GLA_FUZZ_SCALE", 25 if LONG else 1))  # examples × this
DEVICE = "cuda" if LONG and torch.cuda.is_available() else "cpu"
OPTIONS = {"inner": "aot_eager"}


def examples(n: int) -> settings:
    return settings(settings.get_profile(PROFILE), max_examples=n * SCALE)


def check(model, inputs, kind: str, grad: bool):
    """Compiled vs eager must match; the kind was rewritten, or a near miss says why not.

    ``GLA_FUZZ_DEBUG=1`` (with ``-s``) prints each example's counts and near-miss reasons."""
    report = assert_rewrites(model, *inputs, expect={}, grad=grad, options=OPTIONS)  # raises on wrong numbers
    if report.counts.get(kind, 0) == 0:
        assert report.near_misses and all(m.reason for m in report.near_misses), \
            f"no {kind} rewrite and no near miss saying why:\n{report}"
    if os.environ.get("GLA_FUZZ_DEBUG"):
        print(kind, {k: v for k, v in report.counts.items() if v}, [m.reason for m in report.near_misses])
    return report


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
class Attention(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, q, k, v, extra, gate):
        c = self.c
        d, n = q.shape[-1], c["ratio"]
        if c["layout"] == "bthd":  # [B, T, H, D] inputs, transposed as models do after the projections
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if c["sdpa"]:
            mask = None
            if c["mask"] in ("padding", "padding_min"):
                mask = ~extra[:, None, None, :]
            elif c["mask"] == "bias":
                mask = extra
            elif c["mask"] == "positions":  # transformers' causal mask from position ids
                t = q.shape[-2]
                mask = position_mask(torch.arange(t, device=q.device)[None].expand(q.shape[0], -1)).to(q.dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=c["mask"] == "causal",
                                               scale=None if c["scale"] == "div" else 0.3, enable_gqa=n > 1)
        else:
            if n > 1:
                if c["gqa"] == "repeat_kv":
                    b, h, t, dd = k.shape
                    k = k[:, :, None].expand(b, h, n, t, dd).reshape(b, h * n, t, dd)
                    v = v[:, :, None].expand(b, h, n, t, v.shape[-1]).reshape(b, h * n, t, v.shape[-1])
                else:
                    k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
            if c["scale"] == "fold":
                w = (q * 0.3) @ k.transpose(-2, -1)
            elif c["scale"] == "div":
                w = q @ k.transpose(-2, -1) / math.sqrt(d)
            elif c["scale"] == "mul":
                w = torch.matmul(q, k.transpose(-2, -1)) * 0.3
            else:
                w = torch.einsum("bhqd,bhkd->bhqk", q, k)
            t = w.shape[-1]
            if c["mask"] == "causal":
                i = torch.arange(t, device=w.device)
                w = w + torch.where(i[None, :] <= i[:, None], 0.0, float("-inf")).to(w.dtype)
            elif c["mask"] == "causal_fill":
                i = torch.arange(t, device=w.device)
                w = w.masked_fill(i[None, :] > i[:, None], float("-inf"))
            elif c["mask"] == "padding":
                w = w.masked_fill(extra[:, None, None, :], float("-inf"))
            elif c["mask"] == "padding_min":
                w = w.masked_fill(extra[:, None, None, :], torch.finfo(w.dtype).min)
            elif c["mask"] == "bias":
                w = w + extra
            elif c["mask"] == "positions":
                w = w + position_mask(torch.arange(t, device=w.device)[None].expand(w.shape[0], -1)).to(w.dtype)
            if c["upcast"]:
                o = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype) @ v
            else:
                o = torch.softmax(w, dim=-1) @ v
        if c["gate"] == "none":
            return o
        o = o.transpose(1, 2)  # [B, T, H, Dv]
        if c["gate"] == "flat":
            b, t, h, dv = o.shape
            return o.reshape(b, t, h * dv) * torch.sigmoid(gate.reshape(b, t, h * dv))
        return o * torch.sigmoid(gate)


@st.composite
def attention_cases(draw):
    dtype = draw(st.sampled_from([torch.float32] * 4 + [torch.float16]))
    hkv = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([8, 16, 24, 40, 64, 72] + ([96, 128] if LONG else [])))
    t = draw(st.integers(1, 80 if LONG else 24))
    c = dict(
        ratio=ratio,
        sdpa=draw(st.booleans()),
        gqa=draw(st.sampled_from(["repeat_kv", "repeat_interleave"])),
        scale=draw(st.sampled_from(["mul", "div", "fold", "none"])),
        mask=draw(st.sampled_from(["none", "causal", "causal_fill", "padding", "padding_min", "bias",
                                   "positions"])),
        upcast=draw(st.booleans()) and dtype != torch.float32,
        layout=draw(st.sampled_from(["bhtd", "bthd"])),
        gate=draw(st.sampled_from(["none", "none", "elementwise", "headwise", "flat"])),
    )
    if c["sdpa"]:
        c["scale"] = draw(st.sampled_from(["div", "mul"]))
        if c["mask"] == "causal_fill":
            c["mask"] = "causal"
    grad = draw(st.booleans()) and dtype == torch.float32 and t <= 16
    seed = draw(st.integers(0, 2**16))
    return c, dtype, (hkv, ratio, d, t), grad, seed


@examples(200)
@given(attention_cases())
def test_fuzz_attention(case):
    c, dtype, (hkv, ratio, d, t), grad, seed = case
    g = torch.Generator().manual_seed(seed)
    hq, b = hkv * ratio, 1

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    if c["layout"] == "bthd":
        q, k, v = rnd(b, t, hq, d), rnd(b, t, hkv, d), rnd(b, t, hkv, d)
    else:
        q, k, v = rnd(b, hq, t, d), rnd(b, hkv, t, d), rnd(b, hkv, t, d)
    extra = torch.zeros(())
    if c["mask"] in ("padding", "padding_min"):
        pad = torch.rand(b, t, generator=g) < 0.3
        pad[:, 0] = False  # every query sees at least one key (a fully masked row is NaN in eager)
        extra = pad.to(DEVICE)
    elif c["mask"] == "bias":
        extra = rnd(b, 1 if c["sdpa"] else hq, t, t)
    gate = torch.zeros(())
    if c["gate"] != "none":
        gate = rnd(b, t, hq, 1 if c["gate"] == "headwise" else d)
    kind = "attention" if c["gate"] == "none" else "gated_attention"
    report = check(Attention(c), (q, k, v, extra, gate), kind, grad)
    if os.environ.get("GLA_FUZZ_DEBUG") and report.near_misses:
        print("CASE", case)


# ------------------------------------------------------------------------------------------------
# GLU
# ------------------------------------------------------------------------------------------------
ACTS = {
    "silu": F.silu,
    "silu_mul": lambda t: t * torch.sigmoid(t),
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
}


class GLU(torch.nn.Module):
    def __init__(self, act, form, d, f, bias, down):
        super().__init__()
        self.act, self.form, self.f = ACTS[act], form, f
        if form == "separate":
            self.gate, self.up = torch.nn.Linear(d, f, bias=bias), torch.nn.Linear(d, f, bias=bias)
        else:
            self.gate_up = torch.nn.Linear(d, 2 * f, bias=bias)
        self.down = torch.nn.Linear(f, d, bias=False) if down else None

    def forward(self, x):
        if self.form == "separate":
            h = self.act(self.gate(x)) * self.up(x)
        elif self.form == "F.glu":
            h = F.glu(self.gate_up(x), dim=-1)
        else:
            gu = self.gate_up(x)
            g, u = gu.chunk(2, dim=-1) if self.form == "chunk" else gu.split(self.f, dim=-1)
            h = self.act(g) * u
        return self.down(h) if self.down is not None else h


@examples(120)
@given(act=st.sampled_from(list(ACTS)), form=st.sampled_from(["separate", "separate", "chunk", "split", "F.glu"]),
       d=st.integers(1, 48), f=st.integers(1, 64), bias=st.booleans(), down=st.booleans(),
       lead=st.sampled_from([(3,), (2, 5), (1, 1, 4)]), dtype=st.sampled_from([torch.float32] * 3 + [torch.bfloat16]),
       grad=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_glu(act, form, d, f, bias, down, lead, dtype, grad, seed):
    torch.manual_seed(seed)
    model = GLU(act, form, d, f, bias, down).to(device=DEVICE, dtype=dtype)
    x = torch.randn(*lead, d).to(device=DEVICE, dtype=dtype)
    check(model, (x,), "glu", grad and dtype == torch.float32)


# ------------------------------------------------------------------------------------------------
# gates
# ------------------------------------------------------------------------------------------------
class Gate(torch.nn.Module):
    def __init__(self, form, act, d):
        super().__init__()
        self.form, self.act = form, torch.sigmoid if act == "sigmoid" else F.silu
        self.proj = torch.nn.Linear(d, 1 if form == "scalar" else d)
        self.norm = torch.nn.RMSNorm(d)

    def forward(self, x, y):
        if self.form == "se":  # squeeze-excitation over [N, C, L]. (Indexing *after* the activation,
            # act(...)[:, :, None] * y, is not matched today and leaves no near miss: a known gap.)
            return self.act(self.proj(y.mean(-1))[:, :, None]) * y
        if self.form == "norm":  # gated RMSNorm
            return self.norm(y) * self.act(self.proj(x))
        return self.act(self.proj(x)) * y  # "full" / "scalar" (broadcast [.., 1])


@examples(80)
@given(form=st.sampled_from(["full", "scalar", "se", "norm"]), act=st.sampled_from(["sigmoid", "silu"]),
       d=st.integers(1, 40), n=st.integers(1, 6), dtype=st.sampled_from([torch.float32] * 3 + [torch.float16]),
       grad=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_gate(form, act, d, n, dtype, grad, seed):
    torch.manual_seed(seed)
    model = Gate(form, act, d).to(device=DEVICE, dtype=dtype)
    x = torch.randn(n, d).to(device=DEVICE, dtype=dtype)
    y = torch.randn(n, d, 5).to(device=DEVICE, dtype=dtype) if form == "se" else torch.randn(n, d).to(device=DEVICE, dtype=dtype)
    check(model, (x, y), "gate", grad and dtype == torch.float32)
