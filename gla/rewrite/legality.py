"""Is a match safe to replace? Internals used only inside it; no overlap; the graph stays acyclic."""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from .match import Match, describe_target


def outside_users_reason(match: Match) -> str | None:
    """Every matched node but the root must be used only inside the match (else its value escapes)."""
    inside = set(match.nodes)
    for node in match.nodes:
        if node is match.root:
            continue
        outside = [u for u in node.users if u not in inside]
        if outside:
            what = describe_target(node)
            return (f"{what} output `{node.name}` has {len(node.users)} users; "
                    f"{', '.join('`' + u.name + '`' for u in outside[:3])} outside the pattern would still need it")
    return None


def overlap_reason(match: Match, claimed: dict[fx.Node, str]) -> str | None:
    for node in match.nodes:
        if node in claimed:
            return f"overlaps `{node.name}`, already rewritten by {claimed[node]}"
    return None


def convexity_reason(match: Match, graph: fx.Graph) -> str | None:
    """No path may leave the matched nodes and re-enter them: the fused op could not be placed.

    Nodes a lowering only reads (``extra_nodes``, e.g. a shared mask) stay in the graph and are not
    part of the region. Only matches whose internals have outside users pay for the graph walk.
    """
    region = set(match.nodes)
    if all(u in region for n in region if n is not match.root for u in n.users):
        return None
    g = nx.DiGraph()
    for n in graph.nodes:
        for u in n.users:
            g.add_edge(n, u)
    frontier = {u for n in region for u in n.users if u not in region}
    reach = set()
    for f in frontier:
        if f in reach:
            continue
        reach |= nx.descendants(g, f) | {f}
    back = reach & region
    if back:
        n = next(iter(back))
        return f"not convex: `{n.name}` is reached again from outside the pattern"
    return None
