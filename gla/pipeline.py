"""One direction: canonical graph → matches → legality → lowering → verification → replacement."""
from __future__ import annotations

import logging
import time
import warnings

import torch
import torch.fx as fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from .config import Config
from .lowering.select import Decline, select
from .lowering.verify import verify
from .patterns.registry import registered_patterns
from .report import NearMiss, Report, Rewrite, source_location
from .rewrite import (Match, Miss, ReplacementError, canonicalize, convexity_reason, index_graph, match_at,
                      outside_users_reason, overlap_reason, replace_match, root_key)
from .rewrite.autocast import inherit
from .rewrite.graph import tensor_meta
from .rewrite.mutation import GraphWrites, eliminate_dead_code, is_impure

log = logging.getLogger("gla")

NEAR_MISS_DEPTH = 2  # a partial match that got this many pattern nodes deep is worth reporting
_warned: set[str] = set()


def rewrite_graph(gm: fx.GraphModule, config: Config) -> Report:
    """Rewrite ``gm`` in place; return what was done and what was declined."""
    t0 = time.perf_counter()
    report = Report(graphs=1)
    report.canonicalized = canonicalize(gm)
    graph = gm.graph
    writes = GraphWrites.of(graph)  # (read by canonicalize; rewrites add or remove none)
    index = index_graph(graph)
    claimed: dict[fx.Node, str] = {}
    misses: dict[fx.Node, NearMiss] = {}
    rewrite_of: dict[fx.Node, Rewrite] = {}

    def miss(root: fx.Node, kind: str, pattern: str, reason: str, depth: int = 99):
        prev = misses.get(root)
        if prev is None or depth > prev.depth:
            misses[root] = NearMiss(kind, pattern, source_location(root), reason, depth)

    for pattern in registered_patterns(config.patterns):
        for alt in range(len(pattern.search)):
            for root in index.get(root_key(pattern, alt), ()):
                if getattr(root, "_erased", False) or root in claimed:
                    continue
                m = match_at(pattern, alt, root)
                if isinstance(m, Miss):
                    if m.depth >= NEAR_MISS_DEPTH:
                        at = f" at `{m.at.name}`" if isinstance(m.at, fx.Node) else ""
                        miss(root, pattern.kind, pattern.name,
                             f"expected {m.expected}{at}, found {m.found}", m.depth)
                    continue
                if pattern.decline:
                    miss(root, pattern.kind, pattern.name, pattern.decline)
                    continue
                reason = overlap_reason(m, claimed) or outside_users_reason(m)
                reason = reason or next((r for g in pattern.guards if (r := g(m))), None)
                reason = reason or _subclass_reason(m)
                if reason:
                    miss(root, pattern.kind, pattern.name, reason)
                    continue
                selected = select(m, config)
                if selected is None:  # the lowering says "not mine": no near miss
                    continue
                if isinstance(selected, Decline):
                    miss(root, pattern.kind, pattern.name, selected.reason)
                    continue
                m.extra_nodes = list(selected.extra_nodes)
                reads = [v for v in tree_leaves(selected.kwargs) if isinstance(v, fx.Node)]
                reason = convexity_reason(m, graph) or _subclass_reason(m)
                reason = reason or writes.reason([*m.nodes, *m.extra_nodes], m.root, reads)
                if reason:
                    miss(root, pattern.kind, pattern.name, reason)
                    continue
                figures = verify(gm, m, selected, config.verify)
                if isinstance(figures, Decline):
                    _warn_once(pattern.name, figures.reason)
                    miss(root, pattern.kind, pattern.name, figures.reason)
                    continue
                where = source_location(root)
                shapes, dtypes = _signature(m)
                try:
                    new = replace_match(graph, m, selected.fn, selected.kwargs)
                except ReplacementError as e:
                    miss(root, pattern.kind, pattern.name, str(e))
                    continue
                _erase_dead(graph, m.extra_nodes)  # consumed nodes now dead: no later pattern may match them
                for n in m.nodes:
                    claimed[n] = pattern.name
                claimed[new] = pattern.name
                misses.pop(root, None)
                record = Rewrite(pattern.kind, pattern.name, where, shapes, dtypes, selected.kernel, figures)
                for absorbed in selected.absorbs:  # a gated attention counts once
                    if absorbed in rewrite_of:
                        record.location = rewrite_of[absorbed].location
                        report.rewrites.remove(rewrite_of.pop(absorbed))
                rewrite_of[new] = record
                report.rewrites.append(record)
    report.near_misses = [m for root, m in misses.items() if root not in claimed]
    for body in _bodies(gm):
        report.extend(rewrite_graph(body, config))
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
    report.seconds = time.perf_counter() - t0
    return report


# Higher-order ops whose body graph runs as written where the op is called: activation
# checkpointing (``torch.utils.checkpoint``, transformers' gradient_checkpointing; the body is run
# again in the backward, gla's ops with it).
_BODY_OPS = (torch.ops.higher_order.tag_activation_checkpoint,)


def _bodies(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The body graphs of ``gm``'s checkpointed regions, each once, told the autocast state they
    run under (the state at their call)."""
    found: dict[int, fx.GraphModule] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _BODY_OPS and n.args \
                and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
            body = getattr(gm, n.args[0].target, None)
            if isinstance(body, fx.GraphModule) and id(body) not in found:
                inherit(body.graph, n)
                found[id(body)] = body
    return list(found.values())


def _subclass_reason(m: Match) -> str | None:
    """gla's ops have no DTensor sharding rules (nor rules for other tensor subclasses): a match
    that reads a DTensor (tensor parallelism; FSDP2 only when its hooks are traced) keeps the original."""
    for n in (*m.nodes, *m.extra_nodes):
        for a in (n, *n.all_input_nodes):
            t = tensor_meta(a)
            if t is not None and is_traceable_wrapper_subclass(t):
                return (f"`{a.name}` is a {type(t).__name__}: gla's ops have no rules for tensor subclasses "
                        f"(DTensor sharding), so the original subgraph stays")
    return None


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the nodes among ``nodes`` that no longer have users (and, in turn, their dead inputs among them)."""
    among = {n for n in nodes if n.graph is graph}
    stack = [n for n in among if not n.users]
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or n.users or n.op in ("placeholder", "output") or is_impure(n):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(a for a in inputs if a in among and not a.users)


def _signature(m: Match) -> tuple[dict, dict]:
    shapes, dtypes = {}, {}
    for name, v in m.captures.items():
        t = tensor_meta(v)
        if t is not None:
            shapes[name] = tuple(int(s) if isinstance(s, int) else str(s) for s in t.shape)
            dtypes[name] = str(t.dtype).replace("torch.", "")
    return shapes, dtypes


def _warn_once(pattern: str, reason: str) -> None:
    key = f"{pattern}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"gla kept the original subgraph for {pattern}: {reason}", stacklevel=2)
