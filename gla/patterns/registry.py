"""The pattern registry: built-in families and user patterns, on one public API."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

from ..rewrite import Pattern, PatternError

_registry: dict[str, Pattern] = {}


def register_pattern(name_or_pattern: str | Pattern | None = None, search: Callable | Sequence[Callable] | None = None,
                     replacement: Any = None, *, kind: str = "custom", guards: Sequence[Callable] = (),
                     priority: int = 0, decline: str | None = None, description: str = ""):
    """Register a rewrite that then fires under ``backend="gla"``.

    Three forms::

        register_pattern(Pattern(...))
        register_pattern("sigmoid_mul", search=fn, replacement=fused)
        @register_pattern(replacement=fused)      # the decorated function is the search function
        def sigmoid_mul(x, y): return torch.sigmoid(x) * y

    ``search`` is ordinary PyTorch and is the numerical reference; ``replacement`` takes the same
    parameters. Registering a name twice is an error; use ``pattern_scope()`` in tests.
    """
    if isinstance(name_or_pattern, Pattern):
        return _add(name_or_pattern)
    if search is None:  # decorator form
        def decorate(fn: Callable) -> Callable:
            _add(Pattern(name_or_pattern or fn.__name__, fn, replacement, kind=kind, guards=guards,
                         priority=priority, decline=decline, description=description or (fn.__doc__ or "").strip()))
            return fn
        return decorate
    if not name_or_pattern:
        raise PatternError("register_pattern needs a name")
    return _add(Pattern(name_or_pattern, search, replacement, kind=kind, guards=guards, priority=priority,
                        decline=decline, description=description))


def _add(pattern: Pattern) -> Pattern:
    if pattern.name in _registry:
        raise PatternError(f"a pattern named {pattern.name!r} is already registered; "
                           f"unregister_pattern({pattern.name!r}) first, or register inside gla.pattern_scope()")
    pattern.graphs()  # trace now: a pattern that cannot be traced fails at registration, not at compile
    _registry[pattern.name] = pattern
    return pattern


def unregister_pattern(name: str) -> None:
    if name not in _registry:
        raise KeyError(f"no pattern named {name!r}")
    del _registry[name]


def registered_patterns(kinds: Sequence[str] | None = None) -> list[Pattern]:
    """Registered patterns, highest priority first (then registration order)."""
    _load_builtins()
    pats = [p for p in _registry.values() if kinds is None or p.kind in kinds]
    return sorted(pats, key=lambda p: -p.priority)


@contextlib.contextmanager
def pattern_scope() -> Iterator[None]:
    """Patterns registered inside the block are gone after it (keeps tests from leaking)."""
    _load_builtins()
    saved = dict(_registry)
    try:
        yield
    finally:
        _registry.clear()
        _registry.update(saved)


_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import attention, gated_attention, gates, glu, linear_attention  # noqa: F401  (they register)
