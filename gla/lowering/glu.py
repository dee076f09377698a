"""GLU and gates → ``gla.kernels.glu`` (act(a) ⊙ b fused, the activation recomputed in backward)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Config
from ..rewrite import Match, leaf
from ..rewrite.autocast import autocast_dtype
from ..rewrite.graph import tensor_meta
from .select import Decline, Selected


@leaf
def glu_linears_call(x, w_gate, b_gate, w_up, b_up, *, act, impl):
    """act(x W_gᵀ + b_g) ⊙ (x W_uᵀ + b_u): cuBLAS projections, one fused activation-multiply."""
    return _glu(F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up), act, impl)


@leaf
def glu_packed_call(gate_up, *, act, gate_first, impl):
    """act(gate) ⊙ up read from one packed [..., 2F] tensor, without chunk copies."""
    from ..kernels.glu import glu_packed, glu_packed_reference

    if impl == "reference":
        return glu_packed_reference(gate_up, act, gate_first=gate_first)
    return glu_packed(gate_up, act, gate_first=gate_first, impl=impl)


@leaf
def gate_call(g, y, *, act, out_dtype, impl):
    """act(g) ⊙ y for a gate g and another branch y (broadcast as the model does)."""
    g, y = torch.broadcast_tensors(g.to(out_dtype), y.to(out_dtype))
    return _glu(g, y, act, impl)


def _glu(a, b, act, impl):
    """The kernel op where one runs; where none does, plain PyTorch ops that Inductor fuses as before."""
    from ..kernels.glu import glu, glu_reference

    if impl == "reference":
        return glu_reference(a, b, act)
    return glu(a.contiguous(), b.contiguous(), act, impl=impl)


def choose_impl(config: Config, *tensors, act: str) -> str | Decline:
    """``"auto"`` leaves the elementwise GLU to Inductor when Inductor compiles the graph: it fuses
    ``act(a)·b`` (and its backward, recomputing the activation) into kernels as fast as gla's, and
    gla's op would add a custom-op call on the host per site. Measured on an H200
    (``benchmarks/results/model-glu-t*-nvidia-h200.md``, Llama-1B widths, 4 layers): at T=2048 the
    GLU's GPU time is the same either way (0.35 + 0.92 ms vs 1.25 ms of Triton kernels per
    training step); at T=256 the op made inference 1.47× and a training step 1.52× slower. Under
    ``inner="aot_eager"``/``"eager"`` (no fusion) gla's kernel runs on CUDA."""
    from ..kernels.glu import triton_unsupported_reason

    if config.kernels in ("reference", "pytorch") or (config.kernels == "auto" and config.inner == "inductor"):
        return "reference"
    reason = triton_unsupported_reason(*tensors, act=act)
    if config.kernels == "triton":
        return Decline(reason) if reason else "triton"
    return "triton" if reason is None and tensors[0].device.type == "cuda" else "reference"


class GLULowering:
    """``act(x W₁ + b₁) ⊙ (x W₃ + b₃)`` with two projections, or one packed projection split in two."""

    def __init__(self, act: str, packed: bool = False, gate_first: bool = True):
        self.act, self.packed, self.gate_first = act, packed, gate_first

    def select(self, match: Match, config: Config) -> Selected | Decline:
        c = match.captures
        root = tensor_meta(match.root)
        if self.packed:
            gu = tensor_meta(c["gate_up"])
            impl = choose_impl(config, gu, act=self.act)
            if isinstance(impl, Decline):
                return impl
            kwargs = dict(gate_up=c["gate_up"], act=self.act, gate_first=self.gate_first, impl=impl)
            return Selected(glu_packed_call, kwargs, f"gla::glu_packed[{impl}] ({self.act})")
        x = tensor_meta(c["x"])
        if x is None or root is None or (x.dtype != root.dtype and not _autocast_projections(match, x, root)):
            return Decline("the GLU changes dtype between its input and output")
        impl = choose_impl(config, x, tensor_meta(c["w_gate"]), act=self.act)
        if isinstance(impl, Decline):
            return impl
        kwargs = dict(x=c["x"], w_gate=c["w_gate"], b_gate=c["b_gate"], w_up=c["w_up"], b_up=c["b_up"],
                      act=self.act, impl=impl)
        where = "fused activation-multiply" if impl != "reference" else "left to Inductor"
        return Selected(glu_linears_call, kwargs, f"gla::glu[{impl}] ({self.act}, {where})")


def _autocast_projections(match: Match, x, root) -> bool:
    """The dtype change is autocast's: the projections run in its dtype, and so does the
    replacement's ``F.linear``, placed in the same region."""
    linears = [n for n in match.nodes if n.op == "call_function" and n.target is F.linear]
    return (autocast_dtype(match.nodes, x.device.type) == root.dtype and bool(linears)
            and all(tensor_meta(n) is not None and tensor_meta(n).dtype == root.dtype for n in linears))


class GateLowering:
    """``act(g) ⊙ y``: sigmoid gates (gated residuals, squeeze-excitation) and silu gates (gated RMSNorm)."""

    def __init__(self, act: str):
        self.act = act

    def select(self, match: Match, config: Config) -> Selected | Decline:
        g, y = tensor_meta(match.captures["g"]), tensor_meta(match.captures["y"])
        root = tensor_meta(match.root)
        if g is None or y is None or root is None:
            return Decline("the gate or the gated value is not a tensor")
        if not root.dtype.is_floating_point:
            return Decline(f"gate in {root.dtype}")
        impl = choose_impl(config, g, y, act=self.act)
        if isinstance(impl, Decline):
            return impl
        kwargs = dict(g=match.captures["g"], y=match.captures["y"], act=self.act, out_dtype=root.dtype, impl=impl)
        return Selected(gate_call, kwargs, f"gla::glu[{impl}] ({self.act} gate)")
