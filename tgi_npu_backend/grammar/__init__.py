"""Grammar-constrained decoding (JSON schema, regex) on llguidance.

``check_grammar`` is what the launcher calls before a request reaches Prefill; the shard
compiles with the same code (docs/grammar.md says why llguidance).
"""

from .spec import GRAMMAR_TYPES, JSON, REGEX, GrammarError, GrammarSpec, check_grammar

__all__ = ["GRAMMAR_TYPES", "JSON", "REGEX", "GrammarError", "GrammarSpec", "check_grammar"]
