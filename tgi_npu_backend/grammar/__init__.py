"""Grammar-constrained decoding (JSON schema, regex) on llguidance.

``check_grammar`` is what the launcher calls before a request reaches Prefill; the shard
compiles with the same code (``compiler``), keeps each request's ``GrammarState`` on the
request, and masks the batch's logits with ``GrammarMasks`` (docs/grammar.md says why
llguidance).
"""

from .compiler import GrammarCompiler, compiler_for
from .mask import GrammarMasks
from .spec import GRAMMAR_TYPES, JSON, REGEX, GrammarError, GrammarSpec, check_grammar
from .state import GrammarState

__all__ = [
    "GRAMMAR_TYPES", "JSON", "REGEX", "GrammarCompiler", "GrammarError", "GrammarMasks",
    "GrammarSpec", "GrammarState", "check_grammar", "compiler_for",
]
