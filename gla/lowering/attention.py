"""Softmax attention → ``gla.kernels.attention.gated_attention``: layouts, GQA, masks, kernel choice."""
from __future__ import annotations

import math
import operator
import warnings

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import Config
from ..rewrite import Match, leaf, ops
from ..rewrite.autocast import UNKNOWN, autocast_dtype
from ..rewrite.graph import tensor_meta
from .masks import NEG_LIMIT, keep_form, mask_form, masked_form
from .select import Decline, Selected

MAX_HEAD_DIM = 256


@leaf
def attention_call(q, k, v, *, kt=False, bias=None, keep=None, masked=None, fill=None, key_mask=None, gate=None, scale=1.0,
                   causal=False, window=0, chunk=0, flat_heads=False, out_dtype=None, impl="auto", nan_rows=False,
                   cast_to=None):
    """The one graph node a matched attention becomes (traced through by AOT autograd into gla::attention).

    q [B, Hq, Tq, D]; k [B, Hkv, Tk, D] (or kᵀ when ``kt``); v [B, Hkv, Tk, Dv]; ``flat_heads``:
    the model works on [B·H, T, D] and a batch axis of 1 is added around the kernel. ``nan_rows``:
    a query row holding NaN/±inf gives NaN, as eager softmax attention does (PyTorch's CPU SDPA gives 0).
    ``cast_to``: the dtype autocast ran the original's matmuls in (q, k, v are cast to it first).
    """
    from ..kernels.attention import gated_attention

    if cast_to is not None:
        q, k, v = (x if x.dtype == cast_to else x.to(cast_to) for x in (q, k, v))
    if kt:
        k = k.transpose(-2, -1)
    # Rows whose every score the model replaced with a finite ``fill`` (a -inf fill leaves them
    # undefined: NaN in eager softmax, 0 from SDPA and the kernels).
    empty_rows = None
    # A where-mask over a biased score replaces it: where(mask, fill, s + bias) = s + where(mask,
    # fill, bias) wherever it matters (fill ≤ -1e4 swamps s). fp32: finfo(fp32).min is -inf in bf16.
    if keep is not None or masked is not None:
        base = 0.0 if bias is None else bias.float()
        if keep is not None:
            bias = torch.where(keep, base, fill).to(torch.float32)
            if math.isfinite(fill):
                empty_rows = ~keep.any(-1, keepdim=True)
        else:
            bias = torch.where(masked, fill, base).to(torch.float32)
            if math.isfinite(fill):
                empty_rows = masked.all(-1, keepdim=True)
    v_model, gate_model = v, gate
    if flat_heads:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if bias is not None and bias.dim() == 3:
            bias = bias.unsqueeze(0)
        if gate is not None:
            gate = gate.unsqueeze(0)
    out = gated_attention(q, k, v, gate=gate, bias=bias, key_mask=key_mask, scale=scale, causal=causal,
                          window=window, chunk=chunk, impl=impl)
    if nan_rows:
        # PyTorch's CPU SDPA returns 0 for a query row holding NaN (eager softmax, the reference and
        # the Triton kernel give NaN; a row with ±inf gives NaN in eager too): propagate like eager.
        out = torch.where(torch.isfinite(q).all(-1, keepdim=True), out, float("nan"))
    if flat_heads:
        out = out.squeeze(0)
    if empty_rows is not None:
        out = torch.where(empty_rows, _uniform_rows(v_model, gate_model, out.shape[-3]).to(out.dtype), out)
    return out if out_dtype is None else out.to(out_dtype)


def _position_form(causal: bool, window: int, chunk: int) -> str:
    """How the report names a proved position mask: "causal", "causal, window 8, chunk 16"."""
    return "causal" + (f", window {window}" if window else "") + (f", chunk {chunk}" if chunk else "")


def _uniform_rows(v, gate, heads: int):
    """The output of a query row whose every score was set to the same fill value: softmax is
    uniform there, so the row is the mean of v (gated). An additive bias keeps the scores'
    differences instead (``fill + s`` with ``s`` still visible once the sum is rounded to fp32),
    so those rows are set explicitly. v ``[..., Hkv, Tk, Dv]``, returned ``[..., Hq, 1, Dv]``."""
    mean = v.float().mean(-2, keepdim=True)
    if v.dim() == 4 and mean.shape[-3] != heads:  # GQA: query head h reads kv head h // group
        mean = mean.repeat_interleave(heads // mean.shape[-3], dim=-3)
    if gate is not None:
        mean = mean * torch.sigmoid(gate.float())
    return mean


def choose_impl(config: Config, q, k, v, *, masked=False, **case) -> str | Decline:
    """Which implementation runs. ``"auto"``: PyTorch's SDPA for inference where it would run
    cuDNN's kernel (see :func:`sdpa_runs_cudnn`), else Triton on CUDA where it can, else SDPA
    (CPU) — or what ``config.kernels`` forces. ``masked``: a mask the kernel gets as a bias.

    Training (q, k or v requires grad) keeps gla's kernel: with torch 2.11 and cuDNN 9.19 (H200)
    cuDNN's SDPA backward reuses the graph it built for the first call at a shape and q/k/v/out
    layout when a later call's dO has other strides, and returns gradients 130–140% off
    (``benchmarks/cudnn_stale_plan.py``, ``benchmarks/results/cudnn-stale-plan-nvidia-h200.md``);
    a model's dO layout is not ours to fix. ``kernels="pytorch"`` still takes SDPA, with a
    warning when that may run cuDNN's backward."""
    from ..kernels.attention import triton_unsupported_reason

    if config.kernels == "reference":
        return "reference"
    plain = not masked and case.get("bias") is None and not case.get("window") and not case.get("chunk") \
        and not case.get("key_mask")
    grad = q.requires_grad or k.requires_grad or v.requires_grad
    if config.kernels == "pytorch":
        if grad and plain and sdpa_runs_cudnn(q, k, v, causal=case.get("causal", False)):
            warnings.warn(_CUDNN_BACKWARD_WARNING, stacklevel=2)
        return "sdpa"
    reason = triton_unsupported_reason(q, k, v, **case)
    if config.kernels == "triton":
        return Decline(reason) if reason else "triton"
    if q.device.type != "cuda" or reason is not None:
        return "sdpa"
    if plain and not grad and sdpa_runs_cudnn(q, k, v, causal=case.get("causal", False)):
        return "sdpa"
    return "triton"


_CUDNN_BACKWARD_WARNING = (
    "gla: kernels='pytorch' lowers a trained attention to SDPA, which runs cuDNN's backward "
    "here. With torch 2.11 / cuDNN 9.19 that backward returned wrong gradients when dO's strides "
    "changed between same-shape calls (benchmarks/cudnn_stale_plan.py); kernels='auto' trains "
    "with gla's kernel.")


def sdpa_runs_cudnn(q, k, v, *, causal: bool) -> bool:
    """True where ``F.scaled_dot_product_attention`` would run cuDNN's fused kernel for this call
    (plain or causal with Tq = Tk; PyTorch picks cuDNN first on Hopper and newer).

    Why inference takes cuDNN there: when this rule was set (H200, commit 5c30083,
    ``benchmarks/attention_choice.py``) cuDNN's kernels beat gla's Triton kernel at every length
    timed, forward 0.83–0.96× and forward+backward 0.79–0.89× (gla / cuDNN speed), and SDPA plus a
    gate that Inductor fuses beat the gate fused into the Triton kernel at D=128 and tied at D=64.
    Since then the Hopper Gluon forward runs 1.06–1.22× cuDNN's at D=128 and 0.95–1.03× at D=64
    (``benchmarks/results/attention-nvidia-h200.md``, session 17); the rule has not been re-timed
    at model level, so it stands. Where SDPA would run its FlashAttention-2, memory-efficient or
    math kernel, gla's kernel is faster (1.25–1.7× FlashAttention-2), and windows, biases and
    padding masks are gla's alone (block skipping, no dense mask).
    """
    from ..kernels.attention import sdpa_backend

    if causal and not statically_known_true(q.shape[-2] == k.shape[-2]):
        return False  # SDPA's is_causal is top-left aligned: it would need a mask
    return sdpa_backend(q, k, v, causal=causal, enable_gqa=q.shape[-3] != k.shape[-3]) == "cudnn"


def kernel_name(impl: str) -> str:
    """What runs, as the report names it."""
    return "F.scaled_dot_product_attention" if impl == "sdpa" else f"gla::attention[{impl}]"


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _ungroup(x: fx.Node) -> tuple[fx.Node, int]:
    """``repeat_heads(x0, n, dim=1)`` → (x0, n): GQA without materializing the repeat."""
    if _is(x, ops.repeat_heads) and x.args[2] == 1 and tensor_meta(x) is not None and tensor_meta(x).dim() == 4:
        return x.args[0], x.args[1]
    return x, 1


_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)  # (autocast leaves float64 alone)


def _autocast_compute_dtype(match: Match, metas, computing: list[fx.Node]) -> torch.dtype | None | Decline:
    """The dtype the original computes q·kᵀ and p·v in when it runs under autocast and its inputs
    are not already in it (None: no cast needed). Read off the graph: the region's autocast dtype,
    and the outputs of the nodes ``computing`` them (matmuls, SDPA) in that dtype (what autocast
    did to them when Dynamo traced)."""
    amp = autocast_dtype(match.nodes, metas[0].device.type)
    if amp is UNKNOWN:
        return Decline("the pattern crosses the boundary of an autocast region (or one gla cannot read)")
    if amp is None or all(t.dtype == amp for t in metas):
        return None
    if not computing or any(tensor_meta(n) is None or tensor_meta(n).dtype != amp for n in computing):
        return Decline(f"under autocast to {amp}, the pattern's matmuls do not all run in {amp}")
    if any(t.dtype not in _AUTOCAST_ELIGIBLE for t in metas):
        return None  # (float64 stays float64: the dtype check that follows declines the mix)
    return amp


def _as_dtype(t, dtype):
    """A FakeTensor like ``t`` in ``dtype`` (what the kernel choice reads)."""
    if t is None or dtype is None or t.dtype == dtype:
        return t
    with t.fake_mode:
        return t.to(dtype)


def _scale_arg(value) -> float | fx.Node | Decline:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node):
        v = value.meta.get("example_value")
        if isinstance(v, (torch.SymFloat, torch.SymInt, float, int)):
            return value
        if isinstance(v, torch.Tensor):
            return Decline(f"the scale is a tensor of shape {tuple(v.shape)} (a learned temperature?); "
                           "the kernel takes a number")
    return Decline(f"cannot read the scale {value!r}")


class AttentionLowering:
    """Hand-written softmax attention (the ``softmax_attention`` pattern's captures)."""

    @staticmethod
    def signature(q, kt, v, scale=1.0, bias=None, mask=None, keep=None, fill=None):
        """The captures this lowering takes (checked against each search alternative)."""

    def select(self, match: Match, config: Config) -> Selected | Decline:
        c = match.captures
        q, kt, v = c["q"], c["kt"], c["v"]
        tq, tkt, tv = (tensor_meta(x) for x in (q, kt, v))
        if None in (tq, tkt, tv):
            return Decline("q, k or v is not a tensor with known shape")
        if tq.dim() not in (3, 4) or tkt.dim() != tq.dim() or tv.dim() != tq.dim():
            return Decline(f"attention on rank-{tq.dim()} tensors; the kernel takes [B, H, T, D] or [B·H, T, D]")
        cast_to = _autocast_compute_dtype(match, (tq, tkt, tv),
                                          [n for n in match.nodes if _is(n, torch.matmul)])
        if isinstance(cast_to, Decline):
            return cast_to
        if cast_to is not None:
            tq, tkt, tv = (_as_dtype(t, cast_to) for t in (tq, tkt, tv))
        if len({tq.dtype, tkt.dtype, tv.dtype}) != 1:
            return Decline(f"q, k, v have mixed dtypes {tq.dtype}, {tkt.dtype}, {tv.dtype}")
        if not tq.dtype.is_floating_point:
            return Decline(f"attention in {tq.dtype}")
        # K: take its real layout; a transpose(-2, -1) node is undone, anything else is transposed back.
        kt_transposed = not (_is(kt, torch.transpose) and kt.args[1:] == (-2, -1))
        k = kt if kt_transposed else kt.args[0]
        groups_k = groups_v = 1
        if not kt_transposed:
            k, groups_k = _ungroup(k)
        v, groups_v = _ungroup(v)
        if groups_k != groups_v:
            k = kt if kt_transposed else kt.args[0]
            v = c["v"]
            groups_k = groups_v = 1
        scale = _scale_arg(c.get("scale", 1.0))
        if isinstance(scale, Decline):
            return scale
        scores = list(tq.shape[:-1]) + [tkt.shape[-1]]
        kwargs = dict(q=q, k=k, v=v, kt=kt_transposed, scale=scale, flat_heads=tq.dim() == 3,
                      out_dtype=tensor_meta(match.root).dtype, cast_to=cast_to)
        extra: list[fx.Node] = []
        bias = c.get("bias")
        causal, window, chunk = False, 0, 0
        if "mask" in c or "keep" in c:
            fill = c["fill"]
            if not (isinstance(fill, (int, float)) and fill <= NEG_LIMIT):
                return Decline(f"masked scores are set to {fill!r}, not a mask value (≤ {NEG_LIMIT:g} or -inf)")
            if "keep" in c:
                form = keep_form(c["keep"], scores) if tq.dim() == 4 else None
                if form:
                    causal, window, chunk, extra = True, form.window, form.chunk, list(form.nodes)
                else:
                    kwargs.update(keep=c["keep"], fill=float(fill))
            else:
                form = masked_form(c["mask"], scores) if tq.dim() == 4 else None
                if form:
                    causal, window, chunk, extra = True, form.window, form.chunk, list(form.nodes)
                else:
                    kwargs.update(masked=c["mask"], fill=float(fill))
        if bias is not None:
            tb = tensor_meta(bias)
            if tb is None or not tb.dtype.is_floating_point:
                return Decline("the additive mask is not a floating-point tensor")
            form = mask_form(bias, scores) if tq.dim() == 4 and not causal else None
            if form:
                causal, window, chunk, extra = True, form.window, form.chunk, list(form.nodes)
            else:
                kwargs["bias"] = bias
        kwargs.update(causal=causal, window=window, chunk=chunk)
        k_meta, v_meta = (_as_dtype(tensor_meta(x), cast_to) for x in (k, v))
        if tq.shape[-1] > MAX_HEAD_DIM:
            return Decline(f"head dim {tq.shape[-1]} > {MAX_HEAD_DIM}")
        case = dict(bias=tensor_meta(kwargs.get("bias")), causal=causal, window=window, chunk=chunk)
        impl = choose_impl(config, tq, k_meta if not kt_transposed else tkt.transpose(-2, -1), v_meta,
                           masked="keep" in kwargs or "masked" in kwargs, **case)
        if isinstance(impl, Decline):
            return impl
        kwargs["impl"] = impl
        if impl == "sdpa":  # hand-written softmax attention propagates NaN rows; CPU SDPA does not
            kwargs["nan_rows"] = True
        form = _position_form(causal, window, chunk) if causal else \
            ("bias" if {"bias", "keep", "masked"} & kwargs.keys() else "no mask")
        gqa = f", GQA {groups_v}:1" if groups_v > 1 else ""
        return Selected(attention_call, kwargs, f"{kernel_name(impl)} ({form}{gqa})", extra)


class SDPALowering:
    """``F.scaled_dot_product_attention``: the same kernel, with GQA, masks and causal taken as given."""

    @staticmethod
    def signature(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        """The captures this lowering takes."""

    def select(self, match: Match, config: Config) -> Selected | Decline:
        c = match.captures
        if c["dropout_p"] != 0:
            return Decline(f"dropout_p={c['dropout_p']} (training dropout) is not supported by the kernel")
        if not isinstance(c["is_causal"], bool) or not isinstance(c["enable_gqa"], bool):
            return Decline("is_causal / enable_gqa are not constants")
        q, k, v = c["q"], c["k"], c["v"]
        tq, tk, tv = (tensor_meta(x) for x in (q, k, v))
        if None in (tq, tk, tv) or tq.dim() != 4 or tk.dim() != 4:
            return Decline("SDPA on tensors that are not [B, H, T, D]")
        cast_to = _autocast_compute_dtype(match, (tq, tk, tv), [match.root])
        if isinstance(cast_to, Decline):
            return cast_to
        if cast_to is not None:
            tq, tk, tv = (_as_dtype(t, cast_to) for t in (tq, tk, tv))
        if len({tq.dtype, tk.dtype, tv.dtype}) != 1:
            return Decline("q, k, v have mixed dtypes")
        if not (tq.shape[0] == tk.shape[0] == tv.shape[0]):
            return Decline("k / v broadcast over the batch")
        if tq.shape[-3] != tk.shape[-3] and not c["enable_gqa"] and not (tk.shape[-3] == tv.shape[-3] == 1):
            # (one kv head broadcast over the query heads is MQA: Falcon calls SDPA so)
            return Decline("different head counts without enable_gqa")
        k, gk = _ungroup(k)
        v, gv = _ungroup(v)
        if gk != gv:
            k, v = c["k"], c["v"]
        causal = c["is_causal"]
        if causal and not statically_known_true(tq.shape[-2] == tk.shape[-2]):
            return Decline("is_causal with Tq ≠ Tk (SDPA aligns it top-left; the kernel bottom-right)")
        scale = c["scale"]
        if scale is None:
            scale = float(tq.shape[-1]) ** -0.5 if isinstance(tq.shape[-1], int) else None
            if scale is None:
                return Decline("symbolic head dim")
        scale = _scale_arg(scale)
        if isinstance(scale, Decline):
            return scale
        kwargs = dict(q=q, k=k, v=v, scale=scale, causal=causal, out_dtype=None, cast_to=cast_to)
        mask = c["attn_mask"]
        window, chunk, extra = 0, 0, []
        if mask is not None:
            tm = tensor_meta(mask)
            if tm is None:
                return Decline("attn_mask is not a tensor")
            scores = list(tq.shape[:-1]) + [tk.shape[-2]]
            is_bool = tm.dtype == torch.bool
            form = None if causal else (keep_form if is_bool else mask_form)(mask, scores)
            if form:
                kwargs.update(causal=True, window=form.window, chunk=form.chunk)
                window, chunk, extra = form.window, form.chunk, list(form.nodes)
            elif is_bool:
                kwargs.update(keep=mask, fill=float("-inf"))
            else:
                kwargs["bias"] = mask
        case = dict(bias=tensor_meta(kwargs.get("bias")), causal=kwargs["causal"], window=window, chunk=chunk)
        impl = choose_impl(config, tq, _as_dtype(tensor_meta(k), cast_to), _as_dtype(tensor_meta(v), cast_to),
                           masked="keep" in kwargs, **case)
        if isinstance(impl, Decline):
            return impl
        kwargs["impl"] = impl
        form_s = _position_form(True, window, chunk) if kwargs["causal"] else \
            ("bias" if {"bias", "keep", "masked"} & kwargs.keys() else "no mask")
        return Selected(attention_call, kwargs, f"{kernel_name(impl)} ({form_s})", extra)
