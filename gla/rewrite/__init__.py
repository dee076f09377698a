"""Graph machinery, knowing nothing of attention: canonicalize, match, check legality, replace."""
from .canonicalize import RULES, Rule, canonicalize
from .legality import convexity_reason, outside_users_reason, overlap_reason
from .match import Match, Miss, index_graph, match_at, root_key
from .pattern import KINDS, Pattern, PatternError
from .replace import ReplacementError, insert_call, leaf, replace_match

__all__ = [
    "RULES", "Rule", "canonicalize", "Match", "Miss", "index_graph", "match_at", "root_key",
    "KINDS", "Pattern", "PatternError", "ReplacementError", "insert_call", "leaf", "replace_match",
    "convexity_reason", "outside_users_reason", "overlap_reason",
]
