"""Which autocast (automatic mixed precision) state each node of a Dynamo graph runs under.

``with torch.autocast("cuda", dtype=torch.bfloat16):`` inside the compiled code appears in the graph
as an ``_enter_autocast`` node and its ``_exit_autocast``; autocast entered around the call to the
compiled function is in effect while Dynamo traces and the backend runs (the ambient state). Under
autocast a matmul casts its floating inputs to the autocast dtype, so a pattern whose q, k, v
differ in dtype may still compute in one dtype: the lowerings ask :func:`autocast_dtype`.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.fx as fx

UNKNOWN = object()  # an autocast-like node this module does not read: no answer at all
_DEVICES = ("cuda", "cpu")
_states: "weakref.WeakKeyDictionary[fx.Graph, dict]" = weakref.WeakKeyDictionary()
_initial: "weakref.WeakKeyDictionary[fx.Graph, object]" = weakref.WeakKeyDictionary()


def _ambient() -> dict[str, torch.dtype | None]:
    return {d: torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None for d in _DEVICES}


def _enter(node: fx.Node) -> tuple[str, torch.dtype | None] | None:
    """(device type, dtype or None when disabled) of an ``_enter_autocast`` node, else None."""
    if node.op != "call_function" or getattr(node.target, "__name__", "") != "_enter_autocast":
        return None
    args = list(node.args)
    device = args[0] if args else node.kwargs.get("device_type")
    dtype = args[1] if len(args) > 1 else node.kwargs.get("dtype")
    enabled = args[2] if len(args) > 2 else node.kwargs.get("enabled", True)
    if not isinstance(device, str):
        return None
    if dtype is None:
        dtype = torch.get_autocast_dtype(device)
    return device, (dtype if enabled else None)


def _states_of(graph: fx.Graph, nodes: list[fx.Node]) -> dict[fx.Node, object]:
    """Every node's autocast state: ``{device type: dtype or None}``, or ``UNKNOWN``; read again
    when one of ``nodes`` is new (a replacement inserted since)."""
    found = _states.get(graph)
    if found is not None and all(n in found for n in nodes):
        return found
    states: dict[fx.Node, object] = {}
    stack: list[object] = [_initial.get(graph) or _ambient()]
    for n in graph.nodes:
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        entered = _enter(n)
        if entered is not None:
            top = stack[-1]
            stack.append(UNKNOWN if top is UNKNOWN else {**top, entered[0]: entered[1]})
        elif name == "_exit_autocast" and len(stack) > 1:
            stack.pop()
        elif "autocast" in name:  # (a spelling not read here: say nothing rather than guess)
            stack.append(UNKNOWN)
        states[n] = stack[-1]
    _states[graph] = states
    return states


def inherit(body: fx.Graph, call: fx.Node) -> None:
    """``body`` (a higher-order op's subgraph) runs under the autocast state of ``call``, its call."""
    _initial[body] = _states_of(call.graph, [call]).get(call, UNKNOWN)
    _states.pop(body, None)


def autocast_dtype(nodes: list[fx.Node], device_type: str) -> torch.dtype | None | object:
    """The dtype autocast runs matmuls in on ``device_type`` at every one of ``nodes``; None when
    autocast is off for them; ``UNKNOWN`` when they sit in different states or one this module
    cannot read (a pattern crossing a region's boundary)."""
    states = _states_of(nodes[0].graph, nodes)
    seen = {id(s): s for s in (states.get(n, UNKNOWN) for n in nodes)}
    if len(seen) != 1:
        return UNKNOWN
    (state,) = seen.values()
    if state is UNKNOWN:
        return UNKNOWN
    return state.get(device_type)


def state_key(node: fx.Node) -> tuple:
    """The autocast state at ``node`` as a hashable value (for caches of computed example values)."""
    state = _states_of(node.graph, [node]).get(node, UNKNOWN)
    return ("unknown",) if state is UNKNOWN else tuple(sorted((d, str(t)) for d, t in state.items()))


@contextlib.contextmanager
def autocast_at(node: fx.Node):
    """Run the block under the autocast state ``node`` runs under (to compute the example values of
    nodes inserted next to it as autocast will compute them)."""
    state = _states_of(node.graph, [node]).get(node, UNKNOWN)
    with contextlib.ExitStack() as stack:
        if state is not UNKNOWN:
            for device, dtype in state.items():
                if dtype is not None:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
                elif torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
        yield
