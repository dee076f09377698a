"""What a compile did: every rewrite, every near miss with its reason, and the figures.

Counts also go to ``torch._dynamo.utils.counters["gla"]``, as Inductor does for its passes, and
events are logged on the ``gla`` logger.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch.fx as fx

from .rewrite.pattern import KINDS

log = logging.getLogger("gla")


def source_location(node: fx.Node) -> str:
    """``module.path (file.py:line)`` of the user code that produced a node, as well as known."""
    module = ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        module = path[0] if isinstance(path, tuple) else str(path)
        module = module.replace("L['self'].", "").replace("L['self']", "self")
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    where = ""
    if lines:
        last = lines[-1]
        try:
            fname = last.split('"')[1].rsplit("/", 1)[-1]
            line = last.split("line ")[1].split(",")[0]
            where = f"{fname}:{line}"
        except IndexError:
            where = last
    return " ".join(p for p in (module, f"({where})" if where else "") if p) or node.name


@dataclass
class Rewrite:
    kind: str
    pattern: str
    location: str
    shapes: dict[str, tuple]
    dtypes: dict[str, str]
    kernel: str
    verification: dict[str, Any] = field(default_factory=dict)


@dataclass
class NearMiss:
    kind: str
    pattern: str
    location: str
    reason: str
    depth: int = field(default=99, repr=False, compare=False)  # how far a partial match got; deepest wins


@dataclass
class Report:
    rewrites: list[Rewrite] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    graphs: int = 0
    canonicalized: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # Dynamo's graph breaks while collecting (reason -> count): code past a break runs outside
    # the graphs gla sees, so nothing there is rewritten
    graph_breaks: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        counts = {k: 0 for k in KINDS if k != "custom"}
        for r in self.rewrites:
            counts[r.kind] = counts.get(r.kind, 0) + 1
        return counts

    def extend(self, other: "Report") -> None:
        self.rewrites += other.rewrites
        self.near_misses += other.near_misses
        self.graphs += other.graphs
        self.seconds += other.seconds
        for k, v in other.canonicalized.items():
            self.canonicalized[k] = self.canonicalized.get(k, 0) + v

    def __str__(self) -> str:
        out = [f"gla report: {self.graphs} graph(s), {len(self.rewrites)} rewrite(s), "
               f"{len(self.near_misses)} near miss(es), {self.seconds * 1e3:.0f} ms in gla passes"]
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items() if v)
        out.append(f"counts: {counts or 'none'}")
        if self.rewrites:
            rows = [("kind", "pattern", "where", "shapes", "dtype", "kernel", "verified")]
            for r in self.rewrites:
                shapes = " ".join(f"{k}{list(v)}" for k, v in r.shapes.items())
                dtypes = ",".join(sorted(set(r.dtypes.values())))
                v = r.verification
                ver = v.get("summary", "-")
                rows.append((r.kind, r.pattern, r.location, shapes, dtypes, r.kernel, ver))
            out.append(_table(rows))
        if self.near_misses:
            out.append("near misses:")
            rows = [("kind", "pattern", "where", "reason")]
            rows += [(m.kind, m.pattern, m.location, m.reason) for m in self.near_misses]
            out.append(_table(rows))
        if self.graph_breaks:
            out.append("graph breaks (code past them ran outside the graphs gla sees):")
            out += [f"  {n} x {_break_summary(reason)}" for reason, n in self.graph_breaks.items()]
        return "\n".join(out)

    __repr__ = __str__


def _table(rows: list[tuple]) -> str:
    rows = [tuple(str(c) for c in r) for r in rows]
    # every column but the last is capped; the last (the reason, the figures) is never cut
    n = len(rows[0])
    widths = [min(48, max(len(r[i]) for r in rows)) for i in range(n)]
    fmt = lambda r: "  ".join((c[:48] if i < n - 1 else c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(rows[0]), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows[1:]])


def _break_summary(reason: str) -> str:
    """A Dynamo graph-break reason's first line and its hint, if it gives one."""
    lines = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    hint = next((ln for ln in lines[1:] if ln.startswith("Hint:")), None)
    return " ".join(ln for ln in (lines[0] if lines else reason, hint) if ln)


_collectors: list[Report] = []


@contextlib.contextmanager
def collect() -> Iterator[Report]:
    """Gather the reports of every graph compiled inside the block (used by ``gla.explain``),
    and the graph breaks Dynamo counted meanwhile."""
    from torch._dynamo.utils import counters

    report = Report()
    before = dict(counters["graph_break"])
    _collectors.append(report)
    try:
        yield report
    finally:
        _collectors.remove(report)
        for reason, n in counters["graph_break"].items():
            if n > before.get(reason, 0):
                report.graph_breaks[reason] = n - before.get(reason, 0)


def publish(report: Report) -> None:
    from torch._dynamo.utils import counters

    for kind, n in report.counts.items():
        if n:
            counters["gla"][kind] += n
    counters["gla"]["near_miss"] += len(report.near_misses)
    for c in _collectors:
        c.extend(report)
    for r in report.rewrites:
        log.info("rewrote %s at %s with %s (%s)", r.pattern, r.location, r.kernel, r.verification.get("summary", "-"))
    for m in report.near_misses:
        log.info("near miss %s at %s: %s", m.pattern, m.location, m.reason)
