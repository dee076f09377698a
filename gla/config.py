"""The backend's options, validated once: ``torch.compile(m, backend="gla", options={...})``."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .rewrite.pattern import KINDS as FAMILIES

_CHOICES = {
    "verify": ("once", "always", "off"),
    "inner": ("inductor", "aot_eager", "eager"),
    "mode": ("exact", "linearize"),
    "kernels": ("auto", "triton", "pytorch", "reference"),
}


class ConfigError(ValueError):
    """An unknown option or value; the message lists the valid ones."""


@dataclass(frozen=True)
class Config:
    """
    patterns: pattern families that may rewrite (``"all"`` or a subset of FAMILIES; ``"custom"`` is
              the user registry).
    verify:   ``"once"`` checks each distinct match signature at its first compile, ``"always"`` at
              every compile, ``"off"`` never (not recommended).
    inner:    what compiles the rest of the graph.
    mode:     ``"exact"`` rewrites only what computes the same function; ``"linearize"`` (planned)
              will convert softmax attention into gated linear attention.
    kernels:  ``"auto"`` (Triton on GPUs — attention without grad takes PyTorch's SDPA where it
              would run cuDNN, see ``gla.lowering.attention.choose_impl``; GLU and gate sites
              stay plain PyTorch when Inductor compiles, ``gla.lowering.glu.choose_impl`` — fused
              PyTorch/reference elsewhere), ``"triton"`` (force
              the Triton kernels; the interpreter on a CPU), ``"pytorch"`` (no Triton: PyTorch's
              fused SDPA for softmax attention, the reference elsewhere, what a CPU runs under
              "auto"), ``"reference"`` (pure PyTorch).
    inductor_mode: torch.compile's ``mode`` for the inner Inductor compile (one of Inductor's
              ``list_mode_options()``), for use together with
              gla's options (``torch.compile`` refuses ``mode=`` and ``options=`` in one call);
              ``"reduce-overhead"`` records the compiled graph, gla's ops included, in CUDA graphs.
    """

    patterns: tuple[str, ...] = FAMILIES
    verify: str = "once"
    inner: str = "inductor"
    mode: str = "exact"
    kernels: str = "auto"
    inductor_mode: str | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "Config":
        options = dict(options or {})
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ConfigError(f"unknown gla option(s) {unknown}; valid options: {sorted(valid)}")
        choices = dict(_CHOICES)
        if options.get("inductor_mode") is not None:  # Inductor's own list (imported only here)
            import torch._inductor
            choices["inductor_mode"] = (None, *torch._inductor.list_mode_options())
        for key, allowed in choices.items():
            if key in options and options[key] not in allowed:
                raise ConfigError(f"gla option {key}={options[key]!r} is invalid; choose one of {list(allowed)}")
        if "patterns" in options:
            options["patterns"] = _families(options["patterns"])
        return cls(**options)


def _families(value: Any) -> tuple[str, ...]:
    if value == "all":
        return FAMILIES
    if isinstance(value, str):
        value = (value,)
    try:
        families = tuple(value)
    except TypeError:
        raise ConfigError(f"gla option patterns={value!r}: give 'all' or a list of {list(FAMILIES)}") from None
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ConfigError(f"gla option patterns: unknown families {bad}; valid: {list(FAMILIES)}")
    return families
