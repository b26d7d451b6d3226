"""One request's position in its grammar: waits for the compiled grammar, writes the request's
row of allowed-token bits, advances by the chosen token."""

from __future__ import annotations

from concurrent.futures import Future

from loguru import logger
from torch import Tensor

from .spec import GrammarError


class GrammarState:
    """Created when the request's batch is built (the grammar compiling on a worker thread);
    lives on the request, so ``filter``/``concatenate`` and prefix caching (which only changes
    the prompt's KV) carry it unchanged.

    NOTE: as TGI's ``GrammarLogitProcessor`` (fsm state -1), a request whose matcher fails on a
    token stops being constrained instead of failing its batch; with the mask applied this only
    happens when a token the mask forbade is forced in (``ignore_eos_token`` past the grammar's
    end).
    """

    def __init__(self, request_id: int, compiled: Future, words: int, eos_token_ids):
        """``compiled``: the future of the compiled grammar (``GrammarCompiler.submit``);
        ``words``: int32 words of the tokenizer's allowed-token bits; ``eos_token_ids``: what a
        dead end allows (see ``fill``)."""
        self.request_id = request_id
        self._compiled = compiled
        self.words = words
        self.eos_token_ids = sorted(eos_token_ids)
        self._matcher = None
        self.broken = False

    @classmethod
    def start(cls, request_id: int, spec, compiler) -> GrammarState:
        """Start compiling ``spec`` (a :class:`GrammarSpec`) for the request; raises
        :class:`GrammarError` naming the request when the grammar is refused outright."""
        try:
            compiled = compiler.submit(spec)
        except GrammarError as e:
            raise GrammarError(f"request {request_id}: {e}") from None
        return cls(request_id, compiled, compiler.words, compiler.tokenizer.eos_tokens)

    @property
    def matcher(self):
        """The request's own matcher (a copy of the compiled grammar); waits for the compile.
        Raises :class:`GrammarError` naming the request when it failed."""
        if self._matcher is None:
            try:
                self._matcher = self._compiled.result().deep_copy()
            except GrammarError as e:
                raise GrammarError(f"request {self.request_id}: {e}") from None
        return self._matcher

    def fill(self, row: Tensor) -> None:
        """Write the allowed-token bits (bit ``t % 32`` of int32 word ``t // 32``) into ``row``,
        a contiguous host int32 tensor of ``words`` words (``GrammarMasks`` fills many rows in
        one parallel call instead); all ones once broken."""
        if self.broken:
            row.fill_(-1)
            return
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if not bool(row.any()):
            self.dead_end(row)

    def dead_end(self, row: Tensor) -> None:
        """A grammar that can be neither continued nor ended (an unsatisfiable schema, such as
        ``minimum`` above ``maximum``) allows nothing; the request then gets its EOS tokens, so
        it ends instead of choosing from an all ``-inf`` row."""
        logger.warning(f"request {self.request_id}: its grammar allows no token here; ending it")
        for t in self.eos_token_ids:
            bit = 1 << (t % 32)
            row[t // 32] |= bit - 2**32 if bit >= 2**31 else bit  # int32 two's complement

    def advance(self, token: int) -> None:
        """Consume the chosen token."""
        if self.broken:
            return
        if not self.matcher.consume_token(token):
            self.broken = True
            logger.warning(
                f"request {self.request_id}: token {token} is outside its grammar "
                f"({self.matcher.get_error()}); the rest of the request is unconstrained"
            )

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (EOS allowed)."""
        return not self.broken and self.matcher.is_accepting()
