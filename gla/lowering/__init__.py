"""The bridge from a match to a gla op: layouts, GQA, mask and gate forms, kernel choice, proof."""
from .select import Decline, Selected, select
from .verify import verify

__all__ = ["Decline", "Selected", "select", "verify"]
