"""The pattern library (one module per family) and the user registry, on the same public API."""
from .registry import pattern_scope, register_pattern, registered_patterns, unregister_pattern

__all__ = ["pattern_scope", "register_pattern", "registered_patterns", "unregister_pattern"]
